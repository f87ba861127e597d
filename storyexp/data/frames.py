"""Choosing one frame where a dataset stores several per caption (Pororo strips, Flintstones clips).

Rules (config `data.frame_choice`, one for training and one for val/test):
    random   a uniformly random frame each time the story is read (training; as the original readers do).
             Uses NumPy's global generator, which Lightning seeds per DataLoader worker.
    fixed    a frame chosen by a stable hash of (story id, frame position): the same frame on every run,
             machine and worker count (val/test, so reference sets and FID do not change between runs;
             the originals picked these at random too).
    first / middle   frame 0 / frame n // 2.
"""

from __future__ import annotations

import zlib

import numpy as np

FRAME_RULES = ("random", "fixed", "first", "middle")


def split_strip(image: np.ndarray, frame_height: int) -> list[np.ndarray]:
    """A vertical strip [k·h, W, 3] -> k frames [h, W, 3] (a partial last frame is an error)."""
    if frame_height <= 0 or image.shape[0] % frame_height:
        raise ValueError(f"strip of height {image.shape[0]} is not a whole number of {frame_height}-px frames")
    return [image[i : i + frame_height] for i in range(0, image.shape[0], frame_height)]


def pick_frame(n: int, rule: str, key: str) -> int:
    """Index of the frame to use among `n`, by `rule`; `key` identifies (story, position) for `fixed`."""
    if n < 1:
        raise ValueError("no frame to choose from")
    if rule == "random":
        return int(np.random.randint(n))
    if rule == "fixed":
        return zlib.crc32(key.encode("utf-8")) % n
    if rule == "first":
        return 0
    if rule == "middle":
        return n // 2
    raise ValueError(f"unknown frame choice rule {rule!r}; expected one of {FRAME_RULES}")
