"""Learning-rate schedules, sized from what the Trainer will really run.

The original AR-LDM sized its warm-up/cosine schedule from the length of the *non-distributed* train
loader, so with N GPUs the schedule was stretched N times (arldm.md §7). Here the total number of
optimizer steps comes from `trainer.estimated_stepping_batches`, which accounts for DDP sharding,
gradient accumulation, max_epochs and max_steps.
"""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup


def resolve_warmup_steps(total_steps: int, warmup_steps: int | None, warmup_epochs: float | None,
                         steps_per_epoch: float) -> int:
    """Warm-up given in steps wins; otherwise epochs are converted with the real steps per epoch."""
    if warmup_steps is not None:
        steps = int(warmup_steps)
    elif warmup_epochs:
        steps = int(math.ceil(float(warmup_epochs) * steps_per_epoch))
    else:
        steps = 0
    return max(0, min(steps, max(total_steps - 1, 0)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up from 0 to the peak LR, then cosine decay to 0 at `total_steps` (per optimizer step).

    diffusers' `get_cosine_schedule_with_warmup` is exactly pl_bolts' LinearWarmupCosineAnnealingLR with
    warmup_start_lr=0 and eta_min=0 (what AR-LDM used), stepped per optimizer step.
    """
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                           num_training_steps=max(int(total_steps), 1))


DECAYS = ("cosine", "constant")


def warmup_then(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, decay: str = "cosine"):
    """Linear warm-up, then `cosine` decay to 0 at `total_steps` or a `constant` LR (diffusers' schedules)."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    if decay == "cosine":
        return warmup_cosine(optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    if decay == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    raise ValueError(f"lr_schedule.decay must be one of {DECAYS}, got {decay!r}")


IMPLS = ("adamw", "fused", "adamw8bit")


def quiet_bitsandbytes_import() -> None:
    """bitsandbytes (imported by peft too, when installed) logs a warning on CPU machines about an optional 4-bit
    matmul kernel from the `kernels` package; storyexp uses only its 8-bit optimizer, so the warning is noise."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def make_adamw(params, opt_cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as `optimizer.impl` says: `adamw` torch's (foreach) AdamW; `fused` torch's single-kernel AdamW (torch
    2.14 has it for CUDA and CPU tensors; the same update up to rounding); `adamw8bit` bitsandbytes' AdamW8bit
    (optimizer states quantised to 8 bits blockwise; states of tensors under 4096 elements stay 32-bit)."""
    from storyexp.errors import ConfigurationError
    from storyexp.utils.extras import require

    impl = str(opt_cfg.get("impl", "adamw"))
    kwargs = {"lr": float(opt_cfg["lr"]), "weight_decay": float(opt_cfg["weight_decay"]),
              "betas": tuple(float(b) for b in opt_cfg["betas"]), "eps": float(opt_cfg.get("eps", 1e-8))}
    if impl == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if impl == "fused":
        if device.type not in ("cuda", "cpu", "xpu", "mps"):
            raise ConfigurationError(f"model.optimizer.impl=fused: torch's fused AdamW does not run on {device.type}; "
                                     "use model.optimizer.impl=adamw.")
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if impl == "adamw8bit":
        quiet_bitsandbytes_import()
        # one line naming pyproject's `bnb` extra when bitsandbytes is missing (storyexp.utils.extras)
        bnb = require("bitsandbytes", extra="bnb", feature="model.optimizer.impl=adamw8bit")
        if device.type not in ("cuda", "cpu"):
            raise ConfigurationError(f"model.optimizer.impl=adamw8bit: bitsandbytes has no {device.type} kernels; "
                                     "use model.optimizer.impl=adamw.")
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ConfigurationError(f"model.optimizer.impl={impl!r} is not valid: it must be one of {IMPLS}.")


def configure_adamw(module, optimizer: dict, lr_schedule: dict, *, defaults: dict, frozen_hint: str) -> dict:
    """`configure_optimizers` shared by the systems: AdamW (`optimizer.impl`) over the trainable parameters, then a
    per-step warm-up + decay schedule sized from `trainer.estimated_stepping_batches` (DDP, accumulation,
    max_steps)."""
    from storyexp.errors import ConfigurationError

    opt_cfg = {**defaults, **dict(optimizer)}
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigurationError(f"Every parameter is frozen: nothing to train ({frozen_hint}).")
    adamw = make_adamw(params, opt_cfg, params[0].device)
    trainer = module.trainer
    total = int(trainer.estimated_stepping_batches)
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    sched_cfg = dict(lr_schedule)
    warmup = resolve_warmup_steps(total, sched_cfg.get("warmup_steps"), sched_cfg.get("warmup_epochs"),
                                  total / max_epochs)
    scheduler = warmup_then(adamw, total_steps=total, warmup_steps=warmup, decay=str(sched_cfg.get("decay", "cosine")))
    return {"optimizer": adamw, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
