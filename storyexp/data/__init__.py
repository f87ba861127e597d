"""Dataset formats: readers and writers of story data, yielding model-agnostic :class:`Story` records.

Nothing in this package knows about models (no tokenizers, no normalisation for networks). Importing it does
not import torch or lightning; :class:`StoryDataModule` (which does) is loaded on first use.

Datasets live in one registry (:mod:`storyexp.data.registry`): a dataset is a reader module declaring its
:class:`DatasetSpec` with ``register`` plus a ``storyexp/conf/data/<name>.yaml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .demo import DEMO_CHARACTERS, ensure_demo_dataset, generate_demo_stories
from .hdf5 import HDF5Stories, write_hdf5, write_stories_hdf5
from .registry import DatasetSpec, get_dataset, known_datasets, register
from .sources import load_stories, open_split
from .story import N_FRAMES, Story, StoryDataError

if TYPE_CHECKING:  # pragma: no cover
    from .datamodule import ResumableLoader, StoryDataModule, collate_stories

__all__ = [
    "Story",
    "StoryDataError",
    "N_FRAMES",
    "HDF5Stories",
    "write_hdf5",
    "write_stories_hdf5",
    "ResumableLoader",
    "StoryDataModule",
    "collate_stories",
    "DEMO_CHARACTERS",
    "ensure_demo_dataset",
    "generate_demo_stories",
    "load_stories",
    "open_split",
    "DatasetSpec",
    "get_dataset",
    "known_datasets",
    "register",
]

_LAZY = {"ResumableLoader", "StoryDataModule", "collate_stories"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
