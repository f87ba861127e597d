"""Random draws with one generator per story.

Used by sampling (`multinomial`) and by training draws that must not depend on the batch (`rand`).

`torch.multinomial` takes one generator for the whole batch, so a story's codes would depend on which stories share
its batch. The story samplers pass a list of generators instead (one per story, rows story-major); with a single
generator (or None) this is exactly `torch.multinomial`, which keeps the parity with the original samplers.
diffusers' `randn_tensor` already accepts one generator per row, so the diffusion sampler needs nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def multinomial(probs: torch.Tensor, num_samples: int, *, generator: Generators = None,
                replacement: bool = False) -> torch.Tensor:
    """`torch.multinomial(probs [M, V], ...)`; a list of G generators splits the M rows into G equal contiguous
    groups, group g drawn from generator g."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples, replacement=replacement, generator=generator)
    groups = len(generator)
    if groups == 0 or probs.shape[0] % groups:
        raise ValueError(f"{probs.shape[0]} rows cannot be split evenly over {groups} generators")
    chunks = probs.view(groups, probs.shape[0] // groups, *probs.shape[1:])
    return torch.cat([torch.multinomial(chunk, num_samples, replacement=replacement, generator=g)
                      for chunk, g in zip(chunks, generator)])


def rand(rows: int, *, generator: Generators = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform [0, 1) of shape [rows]; a list of G generators splits the rows into G equal contiguous groups, group g
    drawn from generator g (drawn on each generator's device, then moved to `device`)."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand(rows, generator=generator, device=gen_device).to(device)
    groups = len(generator)
    if groups == 0 or rows % groups:
        raise ValueError(f"{rows} rows cannot be split evenly over {groups} generators")
    return torch.cat([torch.rand(rows // groups, generator=g, device=g.device) for g in generator]).to(device)
