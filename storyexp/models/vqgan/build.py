"""Stage 1 of a `source: sizes` StoryDALL-E model (either backbone): the VQGAN of the typed `model.network.stage1`
sizes, loaded from `model.network.stage1_checkpoint` when one is given, else random (seeded) until the system's
`stage1_fit` replaces it on first use (`storyexp.systems.story_tokens.StoryTokenSystem.prepare_data`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import VQGANConfig
from .model import VQGAN


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
