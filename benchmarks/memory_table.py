"""Per-GPU memory of a full finetune, computed from the parameter counts of the published-size models.

    python benchmarks/memory_table.py                       # bf16-mixed, 8 GPUs, markdown on stdout
    python benchmarks/memory_table.py --gpus 4 --precision 32-true --json table.json

Each model is built at its published size (`model=<name>_scale`: random initialisation, `source: sizes`) on the
`meta` device, so nothing is allocated, with the trainable set its published recipe trains (the system's own
`apply_mode` / `apply_freeze`: minDALL-E and Mega finetune everything but the VQGANs, AR-LDM everything but the
VAE). Text embedding tables are counted at the published tokenizers' sizes (`PUBLISHED_TEXT_ROWS`): a
`source: sizes` model writes its tokenizer from the data's word list.

What is counted, in bytes per parameter (P = all, T = trainable, N = GPUs):

    strategy           weights                      gradients            AdamW (m, v) + fp32 master
    ddp                4P (bf16 autocast keeps      4T fp32              8T
                       fp32 weights)
    fsdp FULL_SHARD    4P/N fp32 shards             4P/N (FSDP keeps a   8T/N
                                                    grad for every element of a flat parameter, frozen too)
    deepspeed zero2    2P bf16 module               2T/N                 8T/N + 4T/N master
    deepspeed zero3    2P/N                         2T/N                 8T/N + 4T/N master
    zero3 + offload    0 (gathered per layer)       0 (sent to the CPU)  0 (on the CPU: see the CPU column)

With 32-true there is no master copy and DeepSpeed's weights and gradients are 4 bytes. Activations are excluded
(they depend on batch, frames and resolution; `activation_checkpointing=true` cuts them to about one block's worth
plus each block's input); so are the CUDA context (~0.5 GiB), the NCCL buffers, DeepSpeed's reduce buckets and
allocator fragmentation. The `gathered` column is the transient extra of the sharded strategies: FSDP keeps the
root unit (what is not a declared block) gathered in the compute dtype plus about two block units (one running, one
prefetched) with their gradients; for ZeRO-3 the same block units. Measured figures: benchmarks/gpu_check_scale.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MODELS = ("mindalle", "mega", "arldm")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true")
GIB = 1024**3
CONF = Path(__file__).resolve().parents[1] / "conf"

# text embedding tables whose rows follow the tokenizer: the published tokenizers' sizes (storydalle.md 2.1 and
# 2.3, arldm.md 3.6), counted instead of the rows a `source: sizes` model gets from its word list
PUBLISHED_TEXT_ROWS = {
    "mindalle": {"net.stage2.tok_emb_txt.weight": 16384, "net.stage2.head_txt.weight": 16384},
    "mega": {"model.encoder.embed_tokens.weight": 50272},
    "arldm": {"net.text_encoder.embeddings.token_embedding.weight": 49408,
              "net.mm_encoder.text.embeddings.word_embeddings.weight": 30524},
}


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one published-size model (elements)."""

    model: str
    trainable: int
    frozen: int
    largest_block: int  # the largest declared block (one FSDP unit)
    root: int  # what no declared block holds (FSDP's root unit)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def build_on_meta(model: str):
    """The system at its published size on the meta device, as `launch.py model=<model>_scale data=ssid` builds it
    (SSID: no character tokens, so the text tables are exactly the published ones after `PUBLISHED_TEXT_ROWS`)."""
    import hydra
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}_scale", "data=ssid"])
    GlobalHydra.instance().clear()
    with torch.device("meta"):
        return hydra.utils.instantiate(cfg.model, _convert_="all")


def count(model: str) -> Counts:
    from storyexp.tasks.strategies import block_modules

    system = build_on_meta(model)
    rows = PUBLISHED_TEXT_ROWS[model]
    names = dict(system.named_parameters())
    missing = sorted(set(rows) - set(names))
    if missing:
        raise KeyError(f"{model}: no parameter {missing} to size as the published tokenizer")

    def numel(name: str, param) -> int:
        return rows[name] * param.shape[1] if name in rows else param.numel()

    sizes = {id(p): numel(n, p) for n, p in names.items()}
    trainable = sum(sizes[id(p)] for p in names.values() if p.requires_grad)
    blocks = [sum(sizes[id(p)] for p in b.parameters()) for b in block_modules(system)]
    total = sum(sizes.values())
    return Counts(model, trainable, total - trainable, max(blocks), total - sum(blocks))


def per_gpu(counts: Counts, strategy: str, gpus: int, precision: str = "bf16-mixed") -> dict[str, float]:
    """GiB per GPU: weights, gradients, optimizer (AdamW states + fp32 master), their total, the transient
    `gathered` extra, and `cpu_per_node` (offload: what moves to each node's CPU memory)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    P, T, N = counts.total, counts.trainable, gpus
    mixed = precision != "32-true"
    low = 2 if mixed else 4  # DeepSpeed's module dtype and the gathered compute dtype
    master = 4 * T if mixed else 0  # DeepSpeed's fp32 master weights
    block = 2 * counts.largest_block * low  # one block unit's gathered weights + its gradients
    cpu = 0.0
    if strategy == "ddp":
        weights, grads, optim, gathered = 4 * P, 4 * T, 8 * T, 0
    elif strategy == "fsdp":
        weights, grads, optim = 4 * P / N, 4 * P / N, 8 * T / N
        gathered = low * counts.root + 2 * block if N > 1 else 0
    elif strategy == "deepspeed_zero2":
        weights, grads, optim, gathered = low * P, low * T / N, (8 * T + master) / N, 0
    elif strategy == "deepspeed_zero3":
        weights, grads, optim = low * P / N, low * T / N, (8 * T + master) / N
        gathered = 2 * block if N > 1 else 0
    else:  # ZeRO-3 with optimizer and parameters offloaded: the GPU holds only what is gathered
        weights = grads = optim = 0
        gathered = 2 * block
        cpu = low * P + 4 * T + 8 * T + master  # all of one node's shards (1 node; per node with more)
    out = {"weights": weights, "grads": grads, "optimizer": optim}
    out["total"] = weights + grads + optim
    out["gathered"], out["cpu_per_node"] = gathered, cpu
    return {k: v / GIB for k, v in out.items()}


def table(all_counts: list[Counts], gpus: int, precision: str) -> str:
    lines = [
        f"Per-GPU memory of a full finetune (computed; {precision}, {gpus} GPUs, GiB; activations excluded)",
        "",
        "| model | params (trainable / all) | strategy | weights | grads | AdamW + master | **total** | gathered "
        "(transient) | CPU per node |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in all_counts:
        for strategy in STRATEGIES:
            m = per_gpu(c, strategy, gpus, precision)
            cpu = f"{m['cpu_per_node']:.1f}" if m["cpu_per_node"] else "-"
            lines.append(f"| {c.model} | {c.trainable / 1e9:.2f}B / {c.total / 1e9:.2f}B | {strategy} | "
                         f"{m['weights']:.1f} | {m['grads']:.1f} | {m['optimizer']:.1f} | **{m['total']:.1f}** | "
                         f"{m['gathered']:.1f} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--json", type=Path, default=None, help="also write counts and figures here")
    args = parser.parse_args(argv)
    all_counts = [count(m) for m in args.models]
    print(table(all_counts, args.gpus, args.precision))
    if args.json:
        rows = [{**asdict(c), "total": c.total, "strategy": s, **per_gpu(c, s, args.gpus, args.precision)}
                for c in all_counts for s in STRATEGIES]
        args.json.write_text(json.dumps({"gpus": args.gpus, "precision": args.precision, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
