"""Full finetunes: the config's sharding strategy and activation checkpointing, applied to the built model.

    extra = scale_model(cfg, model)     # {} or {"strategy": FSDPStrategy(...) | DeepSpeedStrategy(...)}
    Trainer(**cfg.trainer, **extra)     # what build_trainer does

One declaration per system drives both: `StorySystem.block_modules()`, the networks' repeated blocks, each run
through its own `forward` (minDALL-E: every block's attention and MLP, the cross-attention layers, the story
block; Mega: the encoder and decoder layers; AR-LDM: the UNet's down/mid/up blocks and the CLIP, BLIP-ViT and
BLIP-text layers).

- `activation_checkpointing=true` (storyexp/conf/config.yaml) wraps each block in torch's `CheckpointWrapper` (non-reentrant
  `torch.utils.checkpoint`): its activations are recomputed in backward instead of kept. The same switch for every
  strategy (one GPU, DDP, FSDP, DeepSpeed), applied here once, before the strategy wraps the model; state-dict keys
  do not change (the wrapper strips its own prefix), so checkpoints move between runs with it on and off.
- `compile=true` (storyexp/conf/config.yaml) compiles each block in place with `torch.compile` (`nn.Module.compile`, after
  checkpointing wraps it); the state-dict keys do not change. Static shapes (`dynamic=False`): a block is compiled
  again for each new input shape up to torch's recompile limit and runs eagerly beyond it (a decoding step's keys
  grow by one position per step; the UNet's and the MLPs' shapes do not change). Symbolic shapes (`dynamic=True`,
  or torch's default "automatic dynamic" after a shape change) fail in inductor's CPU code generation for
  minDALL-E's and AR-LDM's blocks (torch 2.14: "cannot determine truth value of Relational"). The first calls pay
  the compilation (tens of seconds per model on a CPU); off by default. Not combined with FSDP / DeepSpeed here
  (they wrap or partition the blocks after this point).
- `trainer=fsdp`: Lightning's `FSDPStrategy` with an `auto_wrap_policy` that makes each block (or its checkpoint
  wrapper: FSDP outside, checkpointing inside, torch's recommended order) one FSDP unit, gathered only while it
  runs. The rest (embeddings, heads, norms, frozen VQGAN / VAE) is the root unit.
- `trainer=deepspeed`: Lightning's `DeepSpeedStrategy` (ZeRO stage 1-3, optional CPU offload). ZeRO partitions
  flat parameter groups, so it needs no wrap policy. DeepSpeed's bf16 casts the module to bf16 and runs it without
  autocast; the systems make some fp32 tensors themselves (frames into stage 1, sentence embeddings), so its
  forward runs under autocast here (`AutocastDeepSpeedPrecision`), as every other bf16-mixed run does.

`check_strategy_config` refuses nonsense before anything is built (validate_config calls it).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision  # imports no deepspeed
from omegaconf import DictConfig, OmegaConf
from torch import nn

from storyexp.errors import ConfigurationError
from storyexp.utils import extras

FSDP_TARGET = "lightning.pytorch.strategies.FSDPStrategy"
DEEPSPEED_TARGET = "lightning.pytorch.strategies.DeepSpeedStrategy"
KINDS = {FSDP_TARGET: "fsdp", DEEPSPEED_TARGET: "deepspeed"}
# strategy arguments storyexp sets from the model's declaration (a user value would be a class path string)
SET_HERE = {
    "auto_wrap_policy": "it is each system's block_modules()",
    "activation_checkpointing_policy": "set activation_checkpointing=true instead",
    "activation_checkpointing": "set activation_checkpointing=true instead",
    "precision_plugin": "it follows trainer.precision",
}
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD")
GPU_ACCELERATORS = ("gpu", "cuda")
DEEPSPEED_PIN = "deepspeed==0.19.8"


# ------------------------------------------------------------------------------------------------- config


def strategy_kind(trainer: Any) -> str | None:
    """'fsdp' / 'deepspeed' for a `trainer.strategy` node of those strategies, else None (strings such as ddp)."""
    node = (trainer or {}).get("strategy")
    if isinstance(node, (dict, DictConfig)):
        return KINDS.get(str(node.get("_target_", "")))
    return None


def check_strategy_config(cfg: dict[str, Any]) -> None:
    """One ConfigurationError line for a sharding or checkpointing option that cannot work (the resolved config)."""
    for key in ("activation_checkpointing", "compile"):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{key}={value!r} is not valid: it must be true or false.")
    trainer = cfg.get("trainer") or {}
    if cfg.get("compile", False) and strategy_kind(trainer):
        raise ConfigurationError(f"compile=true is not supported with trainer={strategy_kind(trainer)}: compile "
                                 "with trainer=gpu / ddp, or train sharded without compile=true.")
    node = trainer.get("strategy")
    if isinstance(node, dict) and "_target_" in node and node["_target_"] not in KINDS:
        return  # another strategy class: Lightning checks its own arguments
    kind = strategy_kind(trainer)
    if kind is None:
        if isinstance(node, str) and node.startswith(("fsdp", "deepspeed")):
            raise ConfigurationError(f"trainer.strategy={node} is not built with the model's wrap policy: use "
                                     f"trainer={node.split('_')[0]} (storyexp/conf/trainer/{node.split('_')[0]}.yaml).")
        return
    for key, why in SET_HERE.items():
        if key in node:
            raise ConfigurationError(f"trainer.strategy.{key} is not an option to set here: {why}.")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in GPU_ACCELERATORS:
        raise ConfigurationError(
            f"trainer={kind} needs trainer.accelerator=gpu, got {accelerator!r}: Lightning runs FSDP and DeepSpeed on "
            "CUDA GPUs only (torch's FSDP refuses CPU devices); on CPUs use trainer=ddp_cpu.")
    if kind == "fsdp":
        sharding = node.get("sharding_strategy", "FULL_SHARD")
        if str(sharding) not in SHARDING_STRATEGIES:
            raise ConfigurationError(f"trainer.strategy.sharding_strategy={sharding!r} is not valid: it must be one "
                                     f"of {', '.join(SHARDING_STRATEGIES)}.")
        if node.get("state_dict_type", "full") not in ("full", "sharded"):
            raise ConfigurationError(f"trainer.strategy.state_dict_type={node.get('state_dict_type')!r} is not "
                                     "valid: it must be sharded (one shard per rank) or full (one file).")
        return
    stage = node.get("stage", 2)
    if stage not in (1, 2, 3):
        raise ConfigurationError(f"trainer.strategy.stage={stage!r} is not valid: it must be 1, 2 or 3 (ZeRO stage; "
                                 "for no sharding use trainer=ddp).")
    if node.get("offload_parameters") and stage != 3:
        raise ConfigurationError("trainer.strategy.offload_parameters=true needs trainer.strategy.stage=3 (ZeRO-2 "
                                 "keeps every parameter on the GPU); or offload only the optimizer: "
                                 "trainer.strategy.offload_optimizer=true.")
    if str(trainer.get("precision")) in ("64-true", "bf16-true", "16-true"):
        raise ConfigurationError(f"trainer.precision={trainer.get('precision')} is not valid with trainer=deepspeed: "
                                 "use bf16-mixed, 16-mixed or 32-true.")
    # the extra's one-line message (storyexp.utils.extras; pyproject's `deepspeed` extra, pinned as DEEPSPEED_PIN in
    # requirements.txt, installed with DS_BUILD_OPS=0: no compiled ops needed)
    if not extras.is_installed("deepspeed"):
        raise ConfigurationError(extras.extra_missing_message("deepspeed", "deepspeed", "trainer=deepspeed"))


# ------------------------------------------------------------------------------------------------- model


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's declared blocks (`block_modules()`), checked to be its own, distinct and not nested."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    declare = getattr(model, "block_modules", None)
    blocks = list(declare()) if callable(declare) else []
    # once checkpointed, a block's parent holds its wrapper: the block is the wrapped module
    blocks = [b._checkpoint_wrapped_module if isinstance(b, CheckpointWrapper) else b for b in blocks]
    if not blocks:
        raise ConfigurationError(f"{type(model).__name__} declares no block_modules(): it cannot be sharded per "
                                 "block or checkpointed; use trainer=gpu / ddp without activation checkpointing.")
    inside = {id(m) for block in blocks for m in block.modules() if m is not block}
    nested = [type(b).__name__ for b in blocks if id(b) in inside]
    if nested or len({id(b) for b in blocks}) != len(blocks):
        raise ValueError(f"{type(model).__name__}.block_modules() lists blocks twice or inside one another: {nested}")
    return blocks


def checkpoint_wrapper_of(block: nn.Module, model: nn.Module) -> nn.Module | None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    for module in model.modules():
        if isinstance(module, CheckpointWrapper) and module._checkpoint_wrapped_module is block:
            return module
    return None


def apply_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Wrap every declared block in a non-reentrant CheckpointWrapper (once: blocks already wrapped are kept).
    Returns the wrappers. Dropout masks are the same in the recomputation (the RNG state is restored)."""
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as cw

    blocks = block_modules(model)
    todo = {id(b) for b in blocks if checkpoint_wrapper_of(b, model) is None}
    if todo:
        wrap = partial(cw.checkpoint_wrapper, checkpoint_impl=cw.CheckpointImpl.NO_REENTRANT)
        cw.apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: id(m) in todo)
    return [checkpoint_wrapper_of(b, model) for b in blocks]


def apply_compile(model: nn.Module) -> list[nn.Module]:
    """`torch.compile` every declared block in place (static shapes; keys unchanged). Returns the blocks."""
    blocks = block_modules(model)
    for block in blocks:
        block.compile(dynamic=False)
    return blocks


def prepare_blocks(cfg: DictConfig, model: nn.Module) -> None:
    """What the config asks of the model's blocks before a strategy wraps them: checkpointing, then compiling."""
    if cfg.get("activation_checkpointing", False):
        apply_activation_checkpointing(model)
    if cfg.get("compile", False):
        apply_compile(model)


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """What FSDP wraps: each declared block, or its checkpoint wrapper when it has one."""
    return [checkpoint_wrapper_of(b, model) or b for b in block_modules(model)]


def fsdp_wrap_policy(units: list[nn.Module]):
    """An FSDP auto-wrap policy selecting exactly these module instances (a class-based policy cannot: minDALL-E
    runs its backbone blocks piecewise, so a `Block` is not a unit but its attention and MLP are)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    ids = frozenset(id(u) for u in units)
    return CustomPolicy(lambda module: id(module) in ids)


# ---------------------------------------------------------------------------------------------- strategies


def scale_model(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Apply activation checkpointing and compilation when asked (`prepare_blocks`), and build an FSDP / DeepSpeed
    strategy for `model`: the Trainer keyword arguments that replace the config's (empty for any other strategy)."""
    prepare_blocks(cfg, model)
    trainer = cfg.trainer
    kind = strategy_kind(trainer)
    if kind is None:
        return {}
    options = OmegaConf.to_container(trainer.strategy, resolve=True)
    options.pop("_target_")
    if kind == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return {"strategy": FSDPStrategy(auto_wrap_policy=fsdp_wrap_policy(sharding_units(model)), **options)}
    from lightning.pytorch.strategies import DeepSpeedStrategy

    precision = AutocastDeepSpeedPrecision(str(trainer.get("precision", "32-true")))
    strategy = DeepSpeedStrategy(precision_plugin=precision, **options)
    # the systems' own torch AdamW also steps offloaded states (on the CPU); DeepSpeed refuses a client optimizer
    # with offloading unless told, and its CPUAdam would need compiled ops
    strategy.config["zero_force_ds_cpu_optimizer"] = False
    return {"strategy": strategy}


class AutocastDeepSpeedPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision with the forward under autocast for the mixed precisions: DeepSpeed keeps
    bf16/fp16 weights (fp32 masters in the optimizer) and autocast casts the fp32 tensors the systems make
    themselves at each op instead of failing on a dtype mismatch."""

    def forward_context(self):
        if "mixed" not in self.precision:
            return super().forward_context()
        return torch.autocast("cuda", dtype=self._desired_dtype)
