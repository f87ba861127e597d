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
