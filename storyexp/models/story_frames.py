"""The order in which a token-based story model draws a story's frames, shared by both StoryDALL-E backbones.

- Continuation (a source frame's codes given): every frame attends to the source; all frames are drawn together
  (one batch of B*L sequences), as the original does.
- Visualization (no source): frame 0 is drawn from its text alone, then serves as the source of the others.
- `chain=True`: frame i attends to the generated frame i-1 instead (frame 0 to the source, if any), so the frames
  are drawn one after another.

`on_frames` (optional, a plain callable; e.g. the browser demo's per-frame streaming) hears of every group of
frames as soon as it is drawn, in frame order; the groups' codes concatenated along dim 1 are the returned codes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# draw(frame indices, source codes [B, S] or None) -> codes [B, len(frame indices), T]
DrawFrames = Callable[[list[int], "Tensor | None"], Tensor]
# on_frames(index of the group's first frame, codes [B, n, T] of frames first..first+n-1), right after each draw
OnFrames = Callable[[int, Tensor], None]


def sample_story_frames(draw: DrawFrames, n_frames: int, source: Tensor | None, chain: bool = False,
                        on_frames: OnFrames | None = None) -> Tensor:
    """Codes [B, n_frames, T] for a story, calling `draw` in the order above (and `on_frames` after each draw)."""
    out: list[Tensor] = []

    def drawn(frames: list[int], src: Tensor | None) -> Tensor:
        codes = draw(frames, src)
        out.append(codes)
        if on_frames is not None:
            on_frames(frames[0], codes)
        return codes

    first = 0
    if source is None:
        source, first = drawn([0], None)[:, 0], 1
    if chain:
        for i in range(first, n_frames):
            source = drawn([i], source)[:, 0]
    elif first < n_frames:
        drawn(list(range(first, n_frames)), source)
    return torch.cat(out, dim=1)
