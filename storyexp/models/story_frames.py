"""The order in which a token-based story model draws a story's frames, shared by both StoryDALL-E backbones.

- Continuation (a source frame's codes given): every frame attends to the source; all frames are drawn together
  (one batch of B*L sequences), as the original does.
- Visualization (no source): frame 0 is drawn from its text alone, then serves as the source of the others.
- `chain=True`: frame i attends to the generated frame i-1 instead (frame 0 to the source, if any), so the frames
  are drawn one after another.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# draw(frame indices, source codes [B, S] or None) -> codes [B, len(frame indices), T]
DrawFrames = Callable[[list[int], "Tensor | None"], Tensor]


def sample_story_frames(draw: DrawFrames, n_frames: int, source: Tensor | None, chain: bool = False) -> Tensor:
    """Codes [B, n_frames, T] for a story, calling `draw` in the order above."""
    out, first = [], 0
    if source is None:
        out.append(draw([0], None))
        source, first = out[0][:, 0], 1
    if chain:
        for i in range(first, n_frames):
            out.append(draw([i], source))
            source = out[-1][:, 0]
    elif first < n_frames:
        out.append(draw(list(range(first, n_frames)), source))
    return torch.cat(out, dim=1)
