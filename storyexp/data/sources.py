"""The shared entry point that opens a split of a dataset, whatever its format (no torch/lightning here).

Which reader opens a raw folder, and how stored frames are cut, comes from the dataset's
:class:`~storyexp.data.registry.DatasetSpec`; nothing here depends on a particular dataset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from storyexp.errors import ConfigurationError, MissingResourceError

from .hdf5 import HDF5Stories
from .registry import DatasetSpec, get_dataset, known_datasets, raw_layout_of
from .story import Story

__all__ = ["known_datasets", "open_split", "open_raw_split", "load_stories", "missing_file_message"]


def _spec(name: str | DatasetSpec) -> DatasetSpec:
    return name if isinstance(name, DatasetSpec) else get_dataset(name)


def missing_file_message(name: str | DatasetSpec, path: Path, hint: str | None = None) -> str:
    """What is missing, where it was expected, and where to get it / how to convert it."""
    spec = _spec(name)
    if spec.convertible:
        msg = (f"{spec.name} dataset file is missing: expected an HDF5 file (ARLDM layout) or the raw "
               f"{spec.title} folder at {path}.")
    else:
        msg = f"{spec.name} dataset file is missing: expected an HDF5 file at {path}."
    if hint:
        return f"{msg} {hint.strip()}"
    if spec.convertible:
        get = spec.download or f"Get the raw {spec.title} data (README.md, 'Datasets') and point the path at its folder"
        return f"{msg} {get}, or convert it once with {spec.convert_command}."
    return f"{msg} {spec.download}".rstrip()


def _wrong_dataset(spec: DatasetSpec, path: Path, other: str, what: str) -> ConfigurationError:
    return ConfigurationError(
        f"{path} is {what} of the {other} dataset, but the configured dataset is {spec.name!r}: "
        f"set data={other} (name {other!r}), or point the path at {spec.name} data"
    )


def open_split(
    name: str | DatasetSpec,
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

    Raises:
        ConfigurationError: unknown dataset name; a raw folder or HDF5 file of another registered dataset;
            a directory for a dataset that only exists as HDF5 files.
        MissingResourceError: nothing at `path`.
    """
    spec = _spec(name)
    path = Path(path).expanduser()
    if path.is_dir():
        return open_raw_split(spec, path, split, frame_choice=frame_choice)
    if not path.exists():
        raise MissingResourceError(missing_file_message(spec, path, missing_hint))
    stories = HDF5Stories(path, split, text_key=text_key, frame_height=spec.frame_height, frame_choice=frame_choice)
    stored = stories.attrs.get("dataset")  # written by storyexp's converter and demo generator
    if isinstance(stored, str) and stored and stored != spec.name:
        raise _wrong_dataset(spec, path, stored, "an HDF5 file")
    return stories


def open_raw_split(
    name: str | DatasetSpec, root: str | os.PathLike, split: str, *, frame_choice: str = "fixed",
    stored: bool = False,
) -> Sequence[Story]:
    """One split of the raw folder `root` of a dataset, by its registered reader.

    `stored=True` gives what the converter stores (whole strips / clips) instead of one frame per caption.
    A folder laid out as another registered dataset's raw folder is a :class:`ConfigurationError` naming it.
    """
    spec = _spec(name)
    root = Path(root).expanduser()
    if spec.open_raw is None:
        raise ConfigurationError(
            f"the {spec.name} dataset is read from an HDF5 file, but the path is a directory: {root}"
        )
    if not spec.looks_like_raw(root):
        others = [n for n in raw_layout_of(root) if n != spec.name]
        if others:
            raise _wrong_dataset(spec, root, others[0], "a raw folder")
    if stored:
        return spec.open_for_storage(root, split)
    return spec.open_raw(root, split, frame_choice=frame_choice)


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
        name: a registered dataset (:func:`~storyexp.data.registry.known_datasets`: ``demo``, ``pororo``,
            ``flintstones``, ``ssid`` and any registered since).
        path: an HDF5 file in the ARLDM layout, or the raw directory as distributed (PororoSV and
            FlintstonesSV: StoryDALL-E's archives unpacked; SSID: the folder holding ``SSID_Annotations/``
            and ``SSID_Images/``). For a generated dataset (``demo``) a missing file is generated there with
            the default parameters.
        split: ``train`` | ``val`` | ``test``.
        text_key: caption dataset name (``text``, ``ssid``, ``sis``, ``dii``); ``None`` auto-detects.
        frame_choice: ``fixed`` (default: the same frame every time), ``random``, ``first`` or ``middle``,
            where the raw source stores several frames per caption.

    Raises:
        ConfigurationError: unknown ``name`` (the message lists the known names; also a ``ValueError``), or
            `path` holds another dataset.
        FileNotFoundError: the file does not exist.
        StoryDataError: the file is not in the expected layout.
    """
    spec = get_dataset(name)
    p = Path(path).expanduser()
    if spec.generator is not None and not p.exists():
        spec.generator.ensure(p)
    return open_split(spec, p, split, text_key=text_key, frame_choice=frame_choice)
