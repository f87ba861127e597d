"""Dataset names and the shared entry point that opens a split of a dataset file (no torch/lightning here)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from storyexp.errors import MissingResourceError

from .demo import ensure_demo_dataset
from .hdf5 import HDF5Stories
from .story import Story

__all__ = ["KNOWN_DATASETS", "open_split", "load_stories", "missing_file_message"]

KNOWN_DATASETS = ("demo", "pororo", "flintstones", "ssid")

# datasets storing several frames per caption, stacked vertically (Pororo strips, Flintstones clips)
FRAME_HEIGHT = {"pororo": 128, "flintstones": 128}

# How to get each dataset into a form this package reads (the raw folder itself also works).
_CONVERT = {
    name: f"python -m storyexp.data.convert {name} <raw dir> <out>.h5" for name in ("pororo", "flintstones", "ssid")
}


def _check_name(name: str) -> None:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def missing_file_message(name: str, path: Path, hint: str | None = None) -> str:
    """What is missing, where it was expected, and where to get it / how to convert it."""
    msg = f"{name} dataset file is missing: expected an HDF5 file (ARLDM layout) or the raw dataset folder at {path}."
    if hint:
        return f"{msg} {hint.strip()}"
    if name in _CONVERT:
        return (f"{msg} Get the raw {name} data (README.md, 'Datasets') and point the path at its folder, or "
                f"convert it once with {_CONVERT[name]}.")
    return msg


def open_split(
    name: str,
    path: str | os.PathLike,
    split: str,
    *,
    text_key: str | None = None,
    missing_hint: str | None = None,
    frame_choice: str = "fixed",
) -> Sequence[Story]:
    """Open one split of a dataset: an HDF5 file (ARLDM layout) or the raw directory as distributed.

    `frame_choice` (see `storyexp.data.frames`) picks one frame where the raw source stores several per
    caption (Pororo strips, Flintstones clips).
    """
    _check_name(name)
    path = Path(path).expanduser()
    if path.is_dir():
        if name == "demo":
            raise IsADirectoryError(f"the demo dataset path must be an HDF5 file path, got a directory: {path}")
        return open_raw_split(name, path, split, frame_choice=frame_choice)
    if not path.exists():
        raise MissingResourceError(missing_file_message(name, path, missing_hint))
    return HDF5Stories(path, split, text_key=text_key, frame_height=FRAME_HEIGHT.get(name),
                       frame_choice=frame_choice)


def open_raw_split(name: str, root: Path, split: str, *, frame_choice: str = "fixed") -> Sequence[Story]:
    """The raw reader of `name` (imported on use: each reader only needs its own layout's files)."""
    if name == "pororo":
        from .raw_pororo import PororoRawStories

        return PororoRawStories(root, split, frame_choice=frame_choice)
    if name == "flintstones":
        from .raw_flintstones import FlintstonesRawStories

        return FlintstonesRawStories(root, split, frame_choice=frame_choice)
    from .raw_ssid import SSIDRawStories

    return SSIDRawStories(root, split)


def load_stories(
    name: str,
    path: str | os.PathLike,
    split: str = "train",
    *,
    text_key: str | None = None,
    frame_choice: str = "fixed",
) -> Sequence[Story]:
    """The stories of one split of a dataset, as a lazy ``Sequence[Story]``.

    Args:
        name: ``demo`` | ``pororo`` | ``flintstones`` | ``ssid``.
        path: an HDF5 file in the ARLDM layout, or the raw directory as distributed (PororoSV and
            FlintstonesSV: StoryDALL-E's archives unpacked; SSID: the folder holding ``SSID_Annotations/``
            and ``SSID_Images/``). For ``demo`` a missing file is generated there with the default parameters.
        split: ``train`` | ``val`` | ``test``.
        text_key: caption dataset name (``text``, ``ssid``, ``sis``, ``dii``); ``None`` auto-detects.
        frame_choice: ``fixed`` (default: the same frame every time), ``random``, ``first`` or ``middle``,
            where the raw source stores several frames per caption.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
        FileNotFoundError: the file does not exist.
        StoryDataError: the file is not in the expected layout.
    """
    _check_name(name)
    p = Path(path).expanduser()
    if name == "demo" and not p.exists():
        ensure_demo_dataset(p)
    return open_split(name, p, split, text_key=text_key, frame_choice=frame_choice)
