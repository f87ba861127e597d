"""Choosing one frame where a dataset stores several per caption (Pororo strips, Flintstones clips).

Rules (config `data.frame_choice`, one for training and one for val/test):
    random   a uniformly random frame each time the story is read (training; as the original readers do).
             Uses NumPy's global generator, which Lightning seeds per DataLoader worker.
    fixed    a frame chosen by a stable hash of (story id, frame position): the same frame on every run,
             machine and worker count (val/test, so reference sets and FID do not change between runs;
             the originals picked these at random too).
    first / middle   frame 0 / frame n // 2.

Readers that store several frames per caption expose the choice: ``read_story(i) -> (Story, picked index per
position)`` and ``frame_candidates(i) -> [5][n] frames`` (every frame a rule may pick), so inputs precomputed per
candidate frame (:mod:`storyexp.data.precomputed`) are found for the frame a random choice drew.
"""

from __future__ import annotations

import zlib

import cv2
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


# How a frame is brought to the square `frame_size` (config `data.frame_fit`):
#   squash       resize both sides to the size, ignoring the aspect ratio (what AR-LDM does for the 128x128 cartoon
#                frames, which are square anyway: arldm.md §3.7).
#   center_crop  resize the shorter side to the size (aspect kept), then cut the central square: the VIST/SSID
#                readers' Resize(size) + CenterCrop(size) (arldm.md §1.2, §3.7), so wide SSID frames are not squashed.
FRAME_FITS = ("squash", "center_crop")


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): torchvision's Resize(size) + CenterCrop(size) geometry for an H x W image."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def fit_frame(frame: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """One uint8 H x W x 3 frame -> size x size x 3 by `fit` (see FRAME_FITS); cv2 INTER_AREA resampling."""
    if fit not in FRAME_FITS:
        raise ValueError(f"unknown frame fit {fit!r}; expected one of {FRAME_FITS}")
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    if fit == "squash":
        return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    new_h, new_w, top, left = center_crop_box(h, w, size)
    resized = frame if (h, w) == (new_h, new_w) else cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(resized[top : top + size, left : left + size])
