"""Checkpoint size per model: lean (what trains, the default) against a full dump (`model.train.save_frozen=true`).

    python benchmarks/checkpoint_sizes.py                 # markdown on stdout
    python benchmarks/checkpoint_sizes.py --json sizes.json

Two kinds of rows:

- tiny (`model=<name>_tiny`): real checkpoints. The system takes one optimizer step on a synthetic story (so the
  optimizer state exists), then `trainer.save_checkpoint` writes the training state twice, lean and full; the
  figures are the files' sizes on disk (weights + AdamW state + loop state + the model record).
- published (`model=<name>_scale`: the published architecture at random initialisation, built on the meta device by
  `benchmarks/memory_table.py`, whose counting is used unchanged, the text tables at the published tokenizers' sizes):
  computed, nothing is downloaded. Weights are float32 as the systems keep them (4 bytes a parameter); "resume" adds
  AdamW's two float32 moments for every trainable parameter (8 bytes each), which is what `last.ckpt` holds on top.
  Buffers and the record are a few kilobytes and left out.

The published rows and the tiny `finetune` rows have the published recipe's trainable set (the default
`model.train.mode`): minDALL-E and Mega finetune all but their VQGANs (and Mega's detokenizer), AR-LDM all but the VAE
(the tiny AR-LDM's pixel "VAE" has no weights, so its lean and full checkpoints are the same). The tiny `lora` rows
hold the adapters and what trains with them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_table import MODELS, count  # noqa: E402 (benchmarks/ is not a package)

MIB = 1024**2
WEIGHT_BYTES = 4  # float32 parameters
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, float32


def tiny_system(model: str, mode: str = "finetune"):
    """`model=<model>_tiny data=demo model.train.mode=<mode>` as launch.py composes it."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "storyexp" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}_tiny", "data=demo",
                                                                f"model.train.mode={mode}"])
    GlobalHydra.instance().clear()
    return hydra.utils.instantiate(cfg.model, _convert_="all")


def synthetic_story(system, seed: int = 0) -> dict:
    """One story of random frames with captions from the tokenizer's own words, the batch layout the data module
    gives (what a training step reads)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    side = max(int(system.image_size), 32)
    frames = torch.randint(0, 256, (1, system.num_frames, side, side, 3), generator=gen, dtype=torch.uint8)
    return {"frames": frames, "captions": [["a story frame"] * system.num_frames], "ids": ["story-0"],
            "index": torch.tensor([0])}


def tiny_sizes(model: str, folder: Path, mode: str = "finetune") -> dict:
    """Sizes on disk of the lean and the full training-state checkpoint of one optimizer step of the tiny model."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    system = tiny_system(model, mode)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, train_dataloaders=DataLoader([synthetic_story(system)], batch_size=None))
    files, weights = {}, {}
    for kind, save_frozen in (("lean", False), ("full", True)):
        system.hparams.train["save_frozen"] = save_frozen
        path = folder / f"{model}_{mode}_{kind}.ckpt"
        trainer.save_checkpoint(path)
        files[kind] = path.stat().st_size
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        weights[kind] = sum(t.numel() * t.element_size() for t in state.values())
    params = dict(system.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    name = f"{model}_tiny" + ("" if mode == "finetune" else f" ({mode})")
    return {"model": name, "trainable": trainable, "total": sum(p.numel() for p in params.values()),
            "lean": weights["lean"], "full": weights["full"], "lean_resume": files["lean"],
            "full_resume": files["full"], "kind": "checkpoint files written (resume: the files' sizes)"}


def published_sizes(model: str) -> dict:
    counts = count(model)
    lean, full = counts.trainable * WEIGHT_BYTES, counts.total * WEIGHT_BYTES
    adam = counts.trainable * ADAM_BYTES
    return {"model": f"{model}_scale", "trainable": counts.trainable, "total": counts.total,
            "lean": lean, "full": full, "lean_resume": lean + adam, "full_resume": full + adam,
            "kind": "computed from the parameter counts"}


def size(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / MIB:.2f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def table(rows: list[dict]) -> str:
    lines = ["| model | params (trainable / all) | weights lean | weights full | lean / full | resume lean | "
             "resume full | how |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.2f}M"
        lines.append(f"| {r['model']} | {share} | {size(r['lean'])} | {size(r['full'])} | "
                     f"{r['lean'] / r['full']:.0%} | {size(r['lean_resume'])} | {size(r['full_resume'])} | {r['kind']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tiny-modes", nargs="+", choices=("finetune", "lora"), default=["finetune", "lora"],
                        help="model.train.mode of the tiny rows")
    parser.add_argument("--no-published", action="store_true", help="only the tiny models' real checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [tiny_sizes(m, Path(tmp), mode) for mode in args.tiny_modes for m in args.models]
    if not args.no_published:
        rows += [published_sizes(m) for m in args.models]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
