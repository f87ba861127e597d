"""Lightning data module over story HDF5 files (ARLDM layout; the demo set is generated on first use).

Batches are model-agnostic dicts (systems turn them into network inputs)::

    frames   uint8 tensor [B, 5, H, W, 3] (RGB)
    captions list (B) of list (5) of str
    labels   float32 tensor [B, 5, C], or None when the split has no labels
    ids      list (B) of str
    index    int64 tensor [B] (row of the story in its split)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .frames import FRAME_RULES
from .demo import DEMO_CHARACTERS, ensure_demo_dataset, read_demo_params
from .hdf5 import HDF5Stories
from .sources import KNOWN_DATASETS, open_split
from .story import Story, StoryDataError

__all__ = ["StoryDataModule", "StoryItems", "collate_stories", "KNOWN_DATASETS", "open_split"]

TASKS = ("continuation", "visualization")
_DEMO_KEYS = ("seed", "n_train", "n_val", "n_test", "resolution")


class _Head(Sequence):
    """The first ``n`` items of a sequence (a view; keeps the base's lazy file handling)."""

    def __init__(self, base: Sequence, n: int) -> None:
        self.base = base
        self.n = min(int(n), len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):  # type: ignore[override]
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]


class StoryItems(Dataset):
    """Map-style torch dataset: story ``i`` as a dict of numpy data (collated by :func:`collate_stories`)."""

    def __init__(self, stories: Sequence[Story], frame_size: int | None = None) -> None:
        self.stories = stories
        self.frame_size = None if frame_size is None else int(frame_size)

    def __len__(self) -> int:
        return len(self.stories)

    def __getitem__(self, index: int) -> dict[str, Any]:
        story = self.stories[index]
        frames = story.frames
        if self.frame_size is not None:
            fs = self.frame_size
            frames = [
                f if f.shape[:2] == (fs, fs) else cv2.resize(f, (fs, fs), interpolation=cv2.INTER_AREA)
                for f in frames
            ]
        return {
            "frames": frames,
            "captions": list(story.captions),
            "labels": story.labels,
            "id": story.id,
            "index": int(index),
        }


def collate_stories(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack story items into a batch; frames of different sizes are an error (set ``frame_size``)."""
    shapes = {(it["id"], j): tuple(f.shape) for it in items for j, f in enumerate(it["frames"])}
    distinct = sorted(set(shapes.values()))
    if len(distinct) > 1:
        examples = []
        for shape in distinct[:4]:
            sid, j = next(k for k, v in shapes.items() if v == shape)
            examples.append(f"story {sid!r} frame {j}: {list(shape)}")
        raise ValueError(
            "frames of different sizes cannot be stacked into one batch ("
            + "; ".join(examples)
            + "). Set data.frame_size to resize every frame to frame_size x frame_size."
        )
    frames = torch.from_numpy(np.stack([np.stack(it["frames"]) for it in items]))
    with_labels = [it["labels"] is not None for it in items]
    if all(with_labels):
        labels = torch.from_numpy(np.stack([np.asarray(it["labels"], dtype=np.float32) for it in items]))
    elif not any(with_labels):
        labels = None
    else:
        missing = [it["id"] for it in items if it["labels"] is None]
        raise ValueError(f"some stories in the batch have labels and some do not (without: {missing})")
    return {
        "frames": frames,
        "captions": [it["captions"] for it in items],
        "labels": labels,
        "ids": [it["id"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


class StoryDataModule(L.LightningDataModule):
    """Train/val/test story loaders over one HDF5 file.

    Args:
        name: ``demo`` | ``pororo`` | ``flintstones`` | ``ssid``.
        path: the HDF5 file. For ``demo`` it is generated there (rank 0, in ``prepare_data``) when absent or
            generated with other parameters.
        task: ``continuation`` | ``visualization`` (metadata for the systems; the data is the same).
        characters: character names in label order (empty for datasets without labels).
        batch_size: GLOBAL batch size, split evenly over ``trainer.world_size`` processes in ``setup``.
        num_workers: DataLoader workers per process (``persistent_workers`` when > 0).
        limit_train, limit_val, limit_test: use only the first N stories of a split.
        test_split: split used by ``test_dataloader`` / ``predict_dataloader``.
        missing_hint: where to get the dataset / how to convert it, shown when the file is missing.
        demo: demo generation parameters ``{seed, n_train, n_val, n_test, resolution}``.
        frame_size: resize every frame to ``frame_size x frame_size`` (cv2 ``INTER_AREA``); ``None`` keeps
            stored sizes (a batch with frames of different sizes is then an error).
        text_key: caption dataset name; ``None`` auto-detects.
        train_split, val_split: group names of the training and validation splits.
        pin_memory: passed to the DataLoaders.
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        task: str = "visualization",
        characters: Sequence[str] = (),
        batch_size: int = 8,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        test_split: str = "test",
        missing_hint: str | None = None,
        demo: Mapping[str, Any] | None = None,
        frame_size: int | None = None,
        text_key: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        pin_memory: bool = False,
        max_length: int | None = None,
        vocabulary: Sequence[str] | None = None,
        frame_choice: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if name not in KNOWN_DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for key, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{key} must be >= 0 or None, got {value}")
        self.name = name
        self.path = Path(path).expanduser()
        self.task = task
        self.characters = [str(c) for c in characters]
        self.batch_size = int(batch_size)
        self.per_device_batch_size = self.batch_size
        self.num_workers = int(num_workers)
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.test_split = test_split
        self.train_split = train_split
        self.val_split = val_split
        self.missing_hint = missing_hint
        self.frame_size = None if frame_size is None else int(frame_size)
        self.text_key = text_key
        self.pin_memory = bool(pin_memory)
        # where a raw source stores several frames per caption: random in training, fixed for val/test
        self.frame_choice = {"train": "random", "eval": "fixed", **dict(frame_choice or {})}
        unknown = sorted(set(self.frame_choice.values()) - set(FRAME_RULES))
        if unknown or set(self.frame_choice) != {"train", "eval"}:
            raise ValueError(f"frame_choice must map train/eval to one of {FRAME_RULES}, got {self.frame_choice}")
        # caption facts the model config reads (`${data.max_length}`, `${data.vocabulary}`); unused here
        self.max_length = max_length
        self.vocabulary = list(vocabulary or [])
        self.demo = self._demo_params(demo) if name == "demo" else None
        self.datasets: dict[str, StoryItems] = {}
        self.save_hyperparameters(
            {
                "name": name,
                "path": str(self.path),
                "task": task,
                "characters": self.characters,
                "batch_size": self.batch_size,
                "frame_size": self.frame_size,
                "demo": self.demo,
            }
        )

    @staticmethod
    def _demo_params(demo: Mapping[str, Any] | None) -> dict[str, int]:
        params = {"seed": 0, "n_train": 3000, "n_val": 100, "n_test": 200, "resolution": 64}
        if demo is not None:
            unknown = sorted(set(demo) - set(_DEMO_KEYS))
            if unknown:
                raise ValueError(f"unknown demo generation parameter(s) {unknown}; expected {list(_DEMO_KEYS)}")
            params.update({k: int(v) for k, v in dict(demo).items()})
        return params

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    # -- lifecycle -------------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Fail early, before a model is built, when the dataset file is missing (the demo is generated)."""
        if self.name != "demo":
            open_split(self.name, self.path, self.train_split, text_key=self.text_key, missing_hint=self.missing_hint)

    def prepare_data(self) -> None:
        """Generate the demo set if needed (Lightning calls this on one process per node only)."""
        if self.name == "demo":
            ensure_demo_dataset(self.path, **self.demo)

    def setup(self, stage: str | None = None) -> None:
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise ValueError(
                f"global batch_size {self.batch_size} is not divisible by the number of processes "
                f"(world_size {world_size}); choose a multiple of {world_size}"
            )
        self.per_device_batch_size = self.batch_size // world_size
        if self.trainer is None and self.name == "demo":
            self.prepare_data()  # used stand-alone: nobody else will
        if self.name == "demo" and self.path.exists():
            have = read_demo_params(self.path)
            if have is not None and any(have.get(f"demo_{k}") != v for k, v in self.demo.items()):
                raise StoryDataError(
                    f"demo file was generated with other parameters ({have}) than configured ({self.demo}); "
                    "prepare_data regenerates it",
                    file=self.path,
                    field="attrs",
                )
        splits = {
            "fit": [self.train_split, self.val_split],
            "validate": [self.val_split],
            "test": [self.test_split],
            "predict": [self.test_split],
        }.get(stage or "", [self.train_split, self.val_split, self.test_split])
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    def _limit_for(self, split: str) -> int | None:
        if split == self.train_split:
            return self.limits["train"]
        if split == self.val_split:
            return self.limits["val"]
        if split == self.test_split:
            return self.limits["test"]
        return None

    def _build(self, split: str) -> StoryItems:
        rule = self.frame_choice["train" if split == self.train_split else "eval"]
        stories: Sequence[Story] = open_split(
            self.name, self.path, split, text_key=self.text_key, missing_hint=self.missing_hint, frame_choice=rule
        )
        self._check_characters(stories)
        limit = self._limit_for(split)
        if limit is not None:
            stories = _Head(stories, limit)
        return StoryItems(stories, frame_size=self.frame_size)

    def _check_characters(self, stories: HDF5Stories) -> None:
        if not isinstance(stories, HDF5Stories):  # raw readers take their label order from the layout
            return
        named = stories.characters
        if named is not None and self.characters and named != self.characters:
            raise StoryDataError(
                f"file names characters {named} but the data config lists {self.characters} "
                "(label columns would be misread)",
                file=stories.path,
                split=stories.split,
                field="characters",
            )
        if stories.n_characters is not None and self.characters and stories.n_characters != len(self.characters):
            raise StoryDataError(
                f"labels have {stories.n_characters} columns but the data config lists "
                f"{len(self.characters)} characters ({self.characters})",
                file=stories.path,
                split=stories.split,
                field="labels",
            )
        if self.name == "demo" and self.characters and self.characters != list(DEMO_CHARACTERS):
            raise ValueError(
                f"demo characters must be {list(DEMO_CHARACTERS)} (in this order), got {self.characters}"
            )

    # -- loaders -----------------------------------------------------------------------------------------

    def _dataset(self, split: str) -> StoryItems:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.per_device_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate_stories,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)

    def stories(self, split: str) -> Sequence[Story]:
        """The (limited) ``Story`` sequence of a split, e.g. for sampling or metrics."""
        return self._dataset(split).stories
