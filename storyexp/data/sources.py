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

# How to turn each raw layout into the HDF5 file this package reads (until the raw readers exist).
_CONVERT = {
    "pororo": "ARLDM's data_script/pororo_hdf5.py --data_dir <raw dir> --save_path pororo.h5",
    "flintstones": "ARLDM's data_script/flintstones_hdf5.py --data_dir <raw dir> --save_path flintstones.h5",
    "ssid": (
        "ARLDM_SSID's data_script/ssid_hdf5.py --ssid_json_dir <dir>/SSID_Annotations "
        "--img_dir <dir>/SSID_Images --save_path ssid.hdf5"
    ),
}


def _check_name(name: str) -> None:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def missing_file_message(name: str, path: Path, hint: str | None = None) -> str:
    """What is missing, where it was expected, and where to get it / how to convert it."""
    msg = f"{name} dataset file is missing: expected an HDF5 file (ARLDM layout) at {path}."
    if hint:
        return f"{msg} {hint.strip()}"
    if name in _CONVERT:
        return f"{msg} Get the raw {name} data and convert it with {_CONVERT[name]}, or point the path at an existing file."
    return msg


def open_split(
    name: str,
    path: str | os.PathLike,
    split: str,
    *,
    text_key: str | None = None,
    missing_hint: str | None = None,
) -> HDF5Stories:
    """Open one split of a dataset file, with the clear errors every entry point shares."""
    _check_name(name)
    path = Path(path).expanduser()
    if path.is_dir():
        if name == "demo":
            raise IsADirectoryError(f"the demo dataset path must be an HDF5 file path, got a directory: {path}")
        raise NotImplementedError(
            f"{path} is a directory: the reader of the raw {name} layout is not available yet. "
            f"Convert it to the ARLDM HDF5 layout with {_CONVERT[name]} and point the path at that file."
        )
    if not path.exists():
        raise MissingResourceError(missing_file_message(name, path, missing_hint))
    return HDF5Stories(path, split, text_key=text_key)


def load_stories(
    name: str, path: str | os.PathLike, split: str = "train", *, text_key: str | None = None
) -> Sequence[Story]:
    """The stories of one split of a dataset, as a lazy ``Sequence[Story]``.

    Args:
        name: ``demo`` | ``pororo`` | ``flintstones`` | ``ssid``.
        path: an HDF5 file in the ARLDM layout. For ``demo`` a missing file is generated there with the
            default parameters (an existing demo file is read as it is).
        split: ``train`` | ``val`` | ``test``.
        text_key: caption dataset name (``text``, ``ssid``, ``sis``, ``dii``); ``None`` auto-detects.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
        FileNotFoundError: the file does not exist.
        NotImplementedError: ``path`` is a directory (raw layouts are not readable yet; convert to HDF5).
        StoryDataError: the file is not in the expected layout.
    """
    _check_name(name)
    p = Path(path).expanduser()
    if name == "demo" and not p.exists():
        ensure_demo_dataset(p)
    return open_split(name, p, split, text_key=text_key)
