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

With 32-true there is no master copy and DeepSpeed's weights and gradients are 4 bytes.

Activations (`--activation-checkpointing off|on`, `--no-activations` for the states-only table): one training step
of one story per GPU at the published recipe (continuation on PororoSV: AR-LDM 4 target frames at 512 px with the
CLIP + BLIP history, VAE encode under no_grad; minDALL-E / Mega 4 target frames of 256 codes plus text), computed by
running the system's own `losses` (what `training_step` runs) on the meta device under
`torch.autograd.graph.saved_tensors_hooks` and summing the storages autograd saves for backward, each once
(`SavedTensorLedger`). Meta tensors have no autocast and no fused attention, so `CudaExecutionModel` applies CUDA
autocast's op lists and runs `scaled_dot_product_attention` as the memory-efficient kernel. Saved parameters are not
activations (the weights column has them); autocast's bf16 copies of fp32 weights are, for DDP only. With
checkpointing on, the hooks see what is saved outside the blocks and each block's inputs (counted by forward
hooks: the recomputation closure holds them), and the largest block's own saved bytes (from the run without
checkpointing) are added: its recomputation is alive while its backward runs. Not captured, by this method: the
transient peaks (score matrices freed inside a function, the backward's own temporaries and the gradients of
activations), autocast's cast cache (copies not saved for backward), the CUDA context (~0.5 GiB), the NCCL
buffers, DeepSpeed's reduce buckets and allocator fragmentation. The `gathered` column is the transient extra of the sharded strategies: FSDP keeps the
root unit (what is not a declared block) gathered in the compute dtype plus about two block units (one running, one
prefetched) with their gradients; for ZeRO-3 the same block units. Measured figures: benchmarks/gpu_check_scale.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

MODELS = ("mindalle", "mega", "arldm")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true")
GIB = 1024**3
CONF = Path(__file__).resolve().parents[1] / "storyexp" / "conf"

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


def build_on_meta(model: str, data: str = "ssid"):
    """The system at its published size on the meta device, as `launch.py model=<model>_scale data=<data>` builds
    it (SSID, the default: no character tokens, so the text tables are exactly the published ones after
    `PUBLISHED_TEXT_ROWS`)."""
    import hydra
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}_scale", f"data={data}"])
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


def per_gpu(counts: Counts, strategy: str, gpus: int, precision: str = "bf16-mixed",
            activations: "Activations | None" = None) -> dict[str, float]:
    """GiB per GPU: weights, gradients, optimizer (AdamW states + fp32 master), their total, the transient
    `gathered` extra, and `cpu_per_node` (offload: what moves to each node's CPU memory). With `activations` (one
    story per GPU) also `activations` and `step_total` = total + gathered + activations."""
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
    if activations is not None:
        out["activations"] = activation_bytes(activations, strategy)
        out["step_total"] = out["total"] + gathered + out["activations"]
    return {k: v / GIB for k, v in out.items()}


def activation_bytes(activations: "Activations", strategy: str) -> int:
    """One story's activations on a GPU running `strategy`. Only DDP keeps fp32 weights under autocast, so only
    there are the low-precision weight copies autocast makes saved for backward; FSDP (MixedPrecision
    param_dtype=bf16 in Lightning's bf16-mixed) and DeepSpeed (bf16 module) compute with low-precision weights."""
    copies = activations.weight_copies + activations.recompute_copies if strategy == "ddp" else 0
    return activations.per_story + copies


def table(all_counts: list[Counts], gpus: int, precision: str,
          activations: "dict[str, Activations] | None" = None) -> str:
    """The markdown table; with `activations` (per model, one story per GPU) two more columns: activations and the
    step's total (states + gathered + activations)."""
    if activations is None:
        title = f"Per-GPU memory of a full finetune (computed; {precision}, {gpus} GPUs, GiB; activations excluded)"
    else:
        ckpt = "on" if next(iter(activations.values())).checkpointing else "off"
        title = (f"Per-GPU memory of a full finetune (computed; {precision}, {gpus} GPUs, GiB; activations of one "
                 f"story per GPU, activation checkpointing {ckpt})")
    extra_head, extra_rule = (" activations | **step total** |", "---:|---:|") if activations else ("", "")
    lines = [
        title,
        "",
        "| model | params (trainable / all) | strategy | weights | grads | AdamW + master | **total** | gathered "
        "(transient) | CPU per node |" + extra_head,
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + extra_rule,
    ]
    for c in all_counts:
        act = activations.get(c.model) if activations else None
        for strategy in STRATEGIES:
            m = per_gpu(c, strategy, gpus, precision, act)
            cpu = f"{m['cpu_per_node']:.1f}" if m["cpu_per_node"] else "-"
            extra = f" {m['activations']:.1f} | **{m['step_total']:.1f}** |" if act else ""
            lines.append(f"| {c.model} | {c.trainable / 1e9:.2f}B / {c.total / 1e9:.2f}B | {strategy} | "
                         f"{m['weights']:.1f} | {m['grads']:.1f} | {m['optimizer']:.1f} | **{m['total']:.1f}** | "
                         f"{m['gathered']:.1f} | {cpu} |" + extra)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- activations

# the story one training step sees: the published recipes' continuation task on PororoSV (128-px source frames,
# captions up to data.max_length tokens; the text models pad to their fixed lengths anyway)
ACTIVATION_DATA = "pororo"
SOURCE_FRAME_SIDE = 128
STORY_CAPTION = "pororo and crong are walking through the snowy forest and loopy waves at them"
# which systems' input preparation needs real pixels: AR-LDM resizes BLIP's input with Pillow (numpy arrays);
# StoryDALL-E's preparation (resize, stage-1 VQGAN codes under no_grad) runs on meta like its networks
PREPARE_ON_CPU = {"mindalle": False, "mega": False, "arldm": True}
BUCKETS = ("activations", "weight_copies", "parameters")

# CUDA autocast's op lists (torch.amp docs, "CUDA Op-Specific Behavior"), matched by function name so that the
# torch.*, Tensor.* and torch.nn.functional.* spellings of one op are caught alike. einsum is not in the list but
# decomposes into bmm, which is, so its operands are cast the same way
LOWER_PRECISION_OPS = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul",
    "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "linear", "matmul", "mm", "mv", "prelu", "scaled_dot_product_attention", "einsum",
})
FP32_OPS = frozenset({
    "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss",
})


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward after one story's forward (see `measure_activations`)."""

    model: str
    precision: str
    checkpointing: bool
    activations: int  # saved tensors that are neither parameters nor autocast's copies of them
    weight_copies: int  # autocast's low-precision copies of fp32 weights, saved for backward (DDP only)
    recompute: int  # checkpointing: the largest block's activations, rebuilt while its backward runs
    recompute_copies: int = 0  # and the weight copies autocast makes again for it

    @property
    def per_story(self) -> int:
        """Activations alive at the start of backward plus, with checkpointing, one block's recomputation."""
        return self.activations + self.recompute


def storage_key(tensor) -> int:
    """One key per storage: views of one tensor share it, so a tensor saved by several ops is counted once. Works
    on meta tensors, which have a storage object but no data pointer."""
    return tensor.untyped_storage()._cdata


class SavedTensorLedger:
    """Sums the bytes of the storages autograd saves for backward (`saved_tensors_hooks`), each storage once, in
    buckets: `parameters` (storages of the parameters and buffers given: the weights column counts them),
    `weight_copies` (storages `mark_weight_copy` was told about) and `activations` (the rest). The whole storage is
    counted, not the saved view, since a view keeps its storage alive. Storages are held until the ledger is
    dropped, so no key is reused by a later allocation.

    Between `begin_block(name)` and `end_block()` what is saved is also recorded for that block, less the block's
    inputs (`add_held(..., block_inputs=True)`): what a checkpointed block rebuilds while its backward runs."""

    def __init__(self, parameters=()):
        self.parameter_keys = {storage_key(p) for p in parameters}
        self.copy_keys: set[int] = set()
        self.seen: dict[int, tuple[str, int]] = {}
        self._held: list = []
        self.blocks: dict[str, dict[int, tuple[str, int]]] = {}  # block call -> {storage key: (bucket, bytes)}
        self._block: str | None = None
        self._block_inputs: set[int] = set()
        self._hooks = None

    def mark_weight_copy(self, tensor) -> None:
        self.copy_keys.add(storage_key(tensor))

    def _bucket_of(self, key: int) -> str:
        if key in self.parameter_keys:
            return "parameters"
        return "weight_copies" if key in self.copy_keys else "activations"

    def add(self, tensor) -> None:
        """Count `tensor`'s storage once, in its bucket, and in the running block's record."""
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if self._block is not None and key not in self._block_inputs and self._bucket_of(key) != "parameters":
            self.blocks[self._block][key] = (self._bucket_of(key), size)
        if key not in self.seen:
            self.seen[key] = (self._bucket_of(key), size)
            self._held.append(storage)

    def add_held(self, tensors, block_inputs: bool = False) -> None:
        """Tensors kept for backward by other means than autograd's saved tensors (a checkpointed block's inputs,
        held by its recomputation closure). `block_inputs`: they are the running block's inputs, kept, not rebuilt."""
        for tensor in tensors:
            if block_inputs:
                self._block_inputs.add(storage_key(tensor))
            self.add(tensor)

    def begin_block(self, name: str) -> None:
        self._block, self._block_inputs = name, set()
        self.blocks[name] = {}

    def end_block(self) -> None:
        self._block = None

    def blocks_by_bucket(self) -> dict[str, dict[str, int]]:
        """Bytes each block call saved apart from its inputs, per bucket (parameters are never recorded)."""
        return {name: {bucket: sum(size for b, size in saved.values() if b == bucket) for bucket in BUCKETS}
                for name, saved in self.blocks.items()}

    def total(self, bucket: str) -> int:
        if bucket not in BUCKETS:
            raise ValueError(f"bucket must be one of {BUCKETS}")
        return sum(size for b, size in self.seen.values() if b == bucket)

    def _pack(self, tensor):
        self.add(tensor)
        return tensor

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def low_precision_dtype(precision: str):
    """The dtype autocast computes in for `precision` (None for 32-true: no autocast)."""
    import torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def make_cuda_execution_model():
    """The class of `CudaExecutionModel`, built on first use (torch is imported lazily by this script)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class CudaExecutionModel(TorchFunctionMode):
        """What a CUDA GPU would save for backward, reproduced on meta tensors, which have neither autocast nor
        fused attention kernels of their own:

        - autocast: while CPU autocast is enabled (entered around the step only to carry the on/off state, so a
          model's own `autocast(enabled=False)` turns this off too), ops of CUDA autocast's lists get their meta
          floating inputs cast as CUDA autocast casts them (`LOWER_PRECISION_OPS` to `dtype`, `FP32_OPS` to fp32).
          As in autocast, the casts of leaf tensors that require grad (trainable weights) are cached for the step,
          and every cast of a parameter is marked in the ledger as a weight copy;
        - attention: `scaled_dot_product_attention` on 4-d meta inputs runs as the memory-efficient kernel (what
          CUDA picks with a mask or in fp32; flash attention, picked in bf16 without a mask, saves the same q, k,
          v, output and log-sum-exp), not as the math path that the meta device would take and that saves the
          [L, L] attention matrices;
        - data-dependent branches: `bool()` of a meta tensor has no value to read; it is answered True and the
          call site is kept in `assumed_true` (the script prints them). The sites: minDALL-E's
          `bool(xmask.any())` (some position predicts an image token: True in training); AR-LDM's
          `bool(cfg_rows.any())` (some frame dropped to the null context: a torch.where that saves no tensor) and
          transformers' `padding_mask.all()` for CLIP / BLIP text (True skips their [S, S] mask, a few KiB)."""

        def __init__(self, ledger: SavedTensorLedger, dtype):
            super().__init__()
            self.ledger, self.dtype, self.cache = ledger, dtype, {}
            self.assumed_true: set[str] = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if self.dtype is not None and torch.is_autocast_enabled("cpu"):
                if name in LOWER_PRECISION_OPS:
                    args, kwargs = self.cast_all((args, kwargs), self.dtype)
                elif name in FP32_OPS:
                    args, kwargs = self.cast_all((args, kwargs), torch.float32)
            if name == "scaled_dot_product_attention":
                return memory_efficient_attention(*args, **kwargs)
            if name == "__bool__" and args[0].device.type == "meta":
                return self.assume_true()
            return func(*args, **kwargs)

        def assume_true(self) -> bool:
            import traceback

            caller = traceback.extract_stack(limit=3)[0]
            self.assumed_true.add(f"{caller.filename}:{caller.lineno}")
            return True

        def cast_all(self, tree, dtype):
            from torch.utils._pytree import tree_map

            return tree_map(lambda x: self.cast(x, dtype) if isinstance(x, torch.Tensor) else x, tree)

        def cast(self, tensor, dtype):
            eligible = tensor.is_floating_point() and tensor.dtype != torch.float64 and tensor.device.type == "meta"
            if not eligible or tensor.dtype == dtype:
                return tensor
            cacheable = tensor.is_leaf and tensor.requires_grad and dtype != torch.float32
            if cacheable and id(tensor) in self.cache:
                return self.cache[id(tensor)][1]
            out = tensor.to(dtype)
            if storage_key(tensor) in self.ledger.parameter_keys:
                self.ledger.mark_weight_copy(out)
            if cacheable:
                self.cache[id(tensor)] = (tensor, out)  # the tensor is held: its id stays its own
            return out

    def memory_efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                   **rest):
        if query.device.type != "meta" or query.dim() != 4 or rest.get("enable_gqa"):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **rest)
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # SDPA's own conversion of a boolean mask into an additive bias
                attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    attn_mask.logical_not(), float("-inf"))
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            bias = attn_mask.to(query.dtype).expand(shape)
        needs_grad = any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, needs_grad, dropout_p, is_causal, scale=scale)[0]

    return CudaExecutionModel


@contextmanager
def meta_autocast_accepted():
    """`torch.autocast(device_type="meta", ...)` built as the CPU's: torch has no meta autocast, and stage 1's fp32
    guard (`storyexp.models.vqgan.precision.runs_in_fp32`) asks for one for its input's device. On meta tensors
    the CPU autocast state only switches `CudaExecutionModel` on and off, which is what the guard means."""
    import torch

    original = torch.autocast

    class MetaAsCpuAutocast(original):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = MetaAsCpuAutocast
    try:
        yield
    finally:
        torch.autocast = original


@contextmanager
def tracking_blocks(units, ledger: SavedTensorLedger, checkpointed: bool):
    """Forward hooks on the sharding units (blocks, or their checkpoint wrappers): what each block call saves is
    recorded per call, and a checkpointed block's inputs, which its recomputation closure keeps (autograd's hooks
    never see them), are counted as held."""
    import torch
    from torch.utils._pytree import tree_leaves

    calls = iter(range(10**9))

    def begin(module, args, kwargs):
        ledger.begin_block(f"{type(module).__name__}#{next(calls)}")
        if checkpointed:
            ledger.add_held([x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)], block_inputs=True)

    def end(module, args, output):
        ledger.end_block()

    handles = [h for u in units for h in (u.register_forward_pre_hook(begin, with_kwargs=True),
                                          u.register_forward_hook(end))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def story_batch(device: str) -> dict:
    """One story as the data module delivers it (datamodule.py): uint8 frames [1, 5, H, W, 3] at PororoSV's
    source size and five captions."""
    import torch

    from storyexp.data.story import N_FRAMES

    frames = torch.zeros(1, N_FRAMES, SOURCE_FRAME_SIDE, SOURCE_FRAME_SIDE, 3, dtype=torch.uint8, device=device)
    return {"frames": frames, "captions": [[STORY_CAPTION] * N_FRAMES], "labels": None, "ids": ["story-0"],
            "index": torch.zeros(1, dtype=torch.long)}


def prepare_on_cpu_for_meta(system) -> None:
    """Make this system instance prepare its batch from real CPU frames (Pillow needs pixels) and hand every
    tensor to its meta networks; `losses` itself is left as it is."""
    import torch

    prepare = type(system).prepare_batch

    def prepare_batch(batch, *args, **kwargs):
        inputs = prepare(system, batch, *args, **kwargs)
        return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    system.prepare_batch = prepare_batch


def run_story_step(system, ledger: SavedTensorLedger, precision: str, checkpointed: bool, on_cpu: bool):
    """`system.losses` on one story under the ledger and the CUDA execution model; returns the loss (keep it
    alive while reading the ledger: its graph holds the saved tensors). No generators: meta tensors cannot
    use one, and the values of the draws do not change what is saved."""
    import torch

    from storyexp.tasks.strategies import sharding_units

    dtype = low_precision_dtype(precision)
    mode = make_cuda_execution_model()(ledger, dtype)
    batch = story_batch("cpu" if on_cpu else "meta")
    with meta_autocast_accepted(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        with mode, tracking_blocks(sharding_units(system), ledger, checkpointed), ledger:
            loss = system.losses(batch, None)["loss"]
    for site in sorted(mode.assumed_true):
        print(f"note: a meta tensor's bool() at {site} was taken as True", file=sys.stderr)
    return loss


def measure_activations(model: str, precision: str = "bf16-mixed") -> dict[bool, Activations]:
    """Activations of one training step of one story at the published size, with activation checkpointing off
    (False) and on (True): the system's own `losses` (what `training_step` runs) on the meta device, under
    `SavedTensorLedger`. With checkpointing on, the hooks see only what is saved outside the blocks plus each
    block's inputs; the largest block's own saved bytes from the run without checkpointing are added as the
    recomputation alive during that block's backward."""
    import torch

    from storyexp.tasks.strategies import apply_activation_checkpointing

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    system = build_on_meta(model, data=ACTIVATION_DATA)
    system.train()
    # Lightning's `device`, where the systems put the tensors they make; also moves the buffers made from token
    # ids at build time (AR-LDM's null captions), which the meta device context does not reach
    system.to(torch.device("meta"))
    on_cpu = PREPARE_ON_CPU[model]
    if on_cpu:
        prepare_on_cpu_for_meta(system)
    out = {}
    for checkpointed in (False, True):
        if checkpointed:
            apply_activation_checkpointing(system)
        ledger = SavedTensorLedger([*system.parameters(), *system.buffers()])
        loss = run_story_step(system, ledger, precision, checkpointed, on_cpu)
        if not checkpointed:
            blocks = ledger.blocks_by_bucket()
        largest = max(blocks, key=lambda name: blocks[name]["activations"]) if checkpointed else None
        out[checkpointed] = Activations(
            model, precision, checkpointed, ledger.total("activations"), ledger.total("weight_copies"),
            recompute=blocks[largest]["activations"] if largest else 0,
            recompute_copies=blocks[largest]["weight_copies"] if largest else 0)
        del loss
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--activation-checkpointing", choices=("off", "on"), default="off",
                        help="activations with activation_checkpointing=false / true")
    parser.add_argument("--no-activations", action="store_true", help="the states-only table (no model is run)")
    parser.add_argument("--json", type=Path, default=None, help="also write counts and figures here")
    args = parser.parse_args(argv)
    all_counts = [count(m) for m in args.models]
    activations = None
    if not args.no_activations:
        checkpointed = args.activation_checkpointing == "on"
        activations = {m: measure_activations(m, args.precision)[checkpointed] for m in args.models}
    print(table(all_counts, args.gpus, args.precision, activations))
    if args.json:
        rows = [{**asdict(c), "total": c.total, "strategy": s,
                 **per_gpu(c, s, args.gpus, args.precision, activations and activations[c.model])}
                for c in all_counts for s in STRATEGIES]
        saved = {m: asdict(a) for m, a in (activations or {}).items()}
        args.json.write_text(json.dumps({"gpus": args.gpus, "precision": args.precision, "rows": rows,
                                         "activations_bytes": saved}, indent=2))


if __name__ == "__main__":
    main()
