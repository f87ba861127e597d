"""Stage 1 (frames -> codes, codes -> pixels) always runs in fp32, whatever autocast is around it.

The originals force this: StoryDALL-E extracts the VQGAN codes under `autocast(enabled=False)` and decodes in
fp32 while the transformer samples under fp16 autocast (storydalle.md §2.2, §5.1). Under a bf16/fp16 autocast the
encoder's convolutions and the codebook distances round differently, and near-ties pick other codebook rows (7 of
the parity VQGAN's 512 codes change under CPU bf16 autocast), so the transformer would be trained on, and
conditioned by, codes that differ from the fp32 ones; decoded frames drift the same way.

`runs_in_fp32` wraps the tokenizer-side entry points of the stage-1 networks (`VQGAN.get_codes`,
`VQGAN.decode_code`, min-dalle's `VQGanDetokenizer.decode_grid_tokens`), so every caller (training steps under
`trainer.precision=*-mixed`, sampling under `sampler.autocast`, the grid and evaluation callbacks) gets fp32 from
this one place. The VQGAN's own training path (`forward` / `encode` / `decode`) is left to the caller's precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def runs_in_fp32(method: F) -> F:
    """Decorate `module.method(x, ...)`: autocast off for x's device and floating x cast to the module's weight
    dtype, which is fp32: stage 1 is built, loaded and kept in fp32 (min-dalle's fp16 files included). Only a
    cast of the whole model (`trainer.precision=*-true`, `model.to(torch.bfloat16)`) makes it otherwise; the
    weights are then already rounded, so stage 1 runs in that dtype rather than crash on mismatched inputs."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, x: torch.Tensor, *args, **kwargs):
        if x.is_floating_point():
            x = x.to(next(self.parameters()).dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return method(self, x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
