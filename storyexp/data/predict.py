"""A predict-only data module over the stories a user gives (captions, and for continuation the first frame).

`task=sample sample.captions=...` / `sample.captions_file=...` and `task=app` need no dataset: the frames a model
generates are placeholders, and the only data facts the model reads (task, character names, caption length, the
tokenizer words, the frame size) come from the checkpoint's record (`storyexp.callbacks.model_record`). This module
serves those stories exactly as `StoryDataModule.predict_on` does (the same `StoryItems` + `collate_stories`
batches, the same per-frame resize, the same unpadded DDP sharding), without a file on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from storyexp.errors import ConfigurationError

from .datamodule import StoryItems, UnpaddedDistributedSampler, collate_stories, eval_shard, resolve_pin_memory
from .frames import FRAME_FITS
from .story import Story

__all__ = ["PredictStories", "story_batch"]


class PredictStories(L.LightningDataModule):
    """`predict_dataloader` over `stories` (set with `predict_on`). `batch_size` is global, split over the
    processes as `StoryDataModule` splits it; `frame_size` / `frame_fit` as the training data module had them."""

    def __init__(self, stories: Sequence[Story] = (), batch_size: int = 8, frame_size: int | None = None,
                 frame_fit: str = "squash", pin_memory: bool | str = "auto") -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigurationError(f"data.batch_size={batch_size!r} is not valid: it must be an integer >= 1.")
        if frame_fit not in FRAME_FITS:
            raise ConfigurationError(f"data.frame_fit={frame_fit!r} is not valid: it must be one of {FRAME_FITS}")
        self.batch_size = int(batch_size)
        self.frame_size = None if frame_size is None else int(frame_size)
        self.frame_fit = frame_fit
        self.pin_memory = pin_memory
        self.stories: list[Story] = list(stories)

    def predict_on(self, stories: Sequence[Story]) -> None:
        self.stories = list(stories)

    def items(self) -> StoryItems:
        return StoryItems(self.stories, frame_size=self.frame_size, frame_fit=self.frame_fit)

    def predict_dataloader(self) -> DataLoader:
        dataset = self.items()
        shard = eval_shard()
        world_size, rank = shard or (1, 0)
        sampler = None if shard is None else UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=rank)
        return DataLoader(dataset, batch_size=max(1, self.batch_size // world_size), shuffle=False, sampler=sampler,
                          num_workers=0, collate_fn=collate_stories, drop_last=False,
                          pin_memory=resolve_pin_memory(self.pin_memory, getattr(self, "trainer", None)))


def story_batch(stories: Sequence[Story], frame_size: int | None = None, frame_fit: str = "squash") -> dict[str, Any]:
    """One batch of `stories` as the predict loader makes it (no DataLoader: the app samples in its own process)."""
    items = StoryItems(list(stories), frame_size=frame_size, frame_fit=frame_fit)
    return collate_stories([items[i] for i in range(len(items))])
