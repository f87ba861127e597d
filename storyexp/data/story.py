"""Model-agnostic story records and the error type every data reader raises.

A :class:`Story` is what every dataset format in :mod:`storyexp.data` yields: uint8 RGB frames, one caption
per frame and optional multi-hot character labels. Nothing here knows about tokenizers or network inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Story", "StoryDataError", "N_FRAMES"]

#: Frames (and captions) per story in every supported dataset and in the ARLDM HDF5 layout.
N_FRAMES = 5


@dataclass
class Story:
    """One story: ``frames[i]`` is described by ``captions[i]``.

    Attributes:
        id: identifier, unique within its split (e.g. ``"demo-train-00012"`` or ``"train/12"``).
        captions: one caption per frame.
        frames: one ``H x W x 3`` uint8 RGB array per frame (frames of one story may differ in size,
            e.g. the vertical strips of PororoSV).
        labels: ``[n_frames, n_characters]`` float32 multi-hot character labels, or ``None``.
    """

    id: str
    captions: list[str]
    frames: list[np.ndarray]
    labels: np.ndarray | None = field(default=None)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def __eq__(self, other: object) -> bool:  # arrays make the dataclass default ambiguous
        if not isinstance(other, Story):
            return NotImplemented
        if self.id != other.id or list(self.captions) != list(other.captions):
            return False
        if len(self.frames) != len(other.frames):
            return False
        if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(self.frames, other.frames)):
            return False
        if (self.labels is None) != (other.labels is None):
            return False
        return self.labels is None or (
            self.labels.shape == other.labels.shape and np.array_equal(self.labels, other.labels)
        )

    __hash__ = None  # mutable record


class StoryDataError(ValueError):
    """Bad or inconsistent story data.

    The message always names the file, the story (split and index and/or id) and the field, e.g.::

        /data/pororo.h5: split 'train', story 3 (id 'train/3'), field 'image2': PNG bytes cannot be decoded

    The parts are also available as attributes (``file``, ``split``, ``index``, ``story_id``, ``field``,
    ``reason``) for programs that handle the error.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | os.PathLike | None = None,
        split: str | None = None,
        index: int | str | None = None,
        story_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else os.fspath(file)
        self.split = split
        self.index = index
        self.story_id = story_id
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        if all(v is None for v in (self.file, self.split, self.index, self.story_id, self.field)):
            return self.reason  # e.g. re-raised from a DataLoader worker with the full message as reason
        parts = [f"file {self.file}" if self.file is not None else "file <unknown>"]
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        story = []
        if self.index is not None:
            story.append(f"story {self.index}")
        if self.story_id is not None:
            story.append(f"(id {self.story_id!r})" if story else f"story id {self.story_id!r}")
        if story:
            parts.append(" ".join(story))
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts) + f": {self.reason}"

    def __reduce__(self):  # keep the keyword-only parts when crossing DataLoader worker boundaries
        return (
            _rebuild_story_data_error,
            (self.reason, self.file, self.split, self.index, self.story_id, self.field),
        )


def _rebuild_story_data_error(reason, file, split, index, story_id, field) -> StoryDataError:
    return StoryDataError(reason, file=file, split=split, index=index, story_id=story_id, field=field)
