"""Small helpers shared by the metric modules: input validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_uint8_nhwc", "as_label_tensor"]


def as_uint8_nhwc(frames: Any, name: str = "frames") -> Tensor:
    """Return ``frames`` as a ``torch.uint8`` tensor of shape ``[N, H, W, 3]``.

    Accepts a numpy array or a torch tensor; a single frame ``[H, W, 3]`` is not accepted (be explicit and pass
    ``frames[None]``), so a story of frames can never be mistaken for one image.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8 with values in [0, 255], got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [N, H, W, 3] (uint8 NHWC RGB), got {tuple(frames.shape)}")
    return frames


def as_label_tensor(labels: Any, name: str = "labels", num_classes: int | None = None) -> Tensor:
    """Return multi-hot ``labels`` ``[N, C]`` as a float tensor of 0/1 values (clear errors otherwise)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name}: expected multi-hot labels of shape [N, C], got {tuple(labels.shape)}")
    if num_classes is not None and labels.shape[1] != num_classes:
        raise ValueError(f"{name}: expected {num_classes} classes, got {labels.shape[1]}")
    labels = labels.to(torch.float32)
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name}: multi-hot labels must contain only 0 and 1")
    return labels
