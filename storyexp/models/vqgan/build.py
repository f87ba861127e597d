"""Stage 1 of a `source: sizes` StoryDALL-E model (either backbone): the VQGAN of the typed `model.network.stage1`
sizes, loaded from `model.network.stage1_checkpoint` when one is given, else random (seeded) until the system's
`stage1_fit` replaces it on first use (`storyexp.systems.story_tokens.StoryTokenSystem.prepare_data`).

`fused_attention(network)` reads `model.network.fused_attention` (true, the default: torch's
scaled_dot_product_attention; false: the originals' explicit matmul + softmax) for both StoryDALL-E builders, which
apply it to every attention module they built with `set_fused_attention` (stage 1's blocks included)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError

from .config import VQGANConfig
from .layers import set_fused_attention
from .model import VQGAN

__all__ = ["build_stage1", "fused_attention", "set_fused_attention"]


def fused_attention(network: Mapping[str, Any]) -> bool:
    """`network.fused_attention` (true when absent); one-line ConfigurationError for anything but a bool."""
    value = network.get("fused_attention", True)
    if not isinstance(value, bool):
        raise ConfigurationError(f"model.network.fused_attention={value!r} is not valid: it must be true (torch's "
                                 "scaled_dot_product_attention) or false (the original's explicit matmul + softmax).")
    return value


def build_stage1(config: VQGANConfig | Mapping[str, Any], checkpoint: str | Path | None = None,
                 seed: int = 0) -> VQGAN:
    """`torch.manual_seed(seed)`, then the VQGAN of `config` (a mapping is read strictly, as `VQGANConfig.from_sizes`),
    strictly loaded from `checkpoint` when given (returned in eval mode then, as `VQGAN.from_ckpt`)."""
    if not isinstance(config, VQGANConfig):
        config = VQGANConfig.from_sizes(config)
    torch.manual_seed(seed)
    if not checkpoint:
        return VQGAN(config)
    return VQGAN.from_ckpt(checkpoint, config, "Stage-1 checkpoint (model.network.stage1_checkpoint)",
                           "Point it at a VQGAN of these sizes, e.g. the export of python launch.py model=vqgan_demo.")
