"""Reader of the raw FlintstonesSV directory as distributed (StoryDALL-E's ``flintstones_data`` archive).

Layout read (the directory passed as ``root``)::

    video_frames_sampled/<globalID>.npy     uint8 (5, 128, 128, 3) RGB: 5 frames sampled from the clip
    flintstones_annotations_v1-0.json       [{"globalID", "description", "characters": [...]}, ...]
    train-val-test_split.json               {"train": [...], "val": [...], "test": [...]} (globalIDs, unsorted)
    following_cache4.pkl                    {globalID: [next globalIDs of the same season/episode]}
    labels.pkl                              {globalID: 7 ints}, order of FLINTSTONES_CHARACTERS
    flintstones_use_embeddings.npy          float32 [n_clips, 512] USE sentence embeddings (optional)
    flintstones_use_embed_idxs.pkl          {globalID: row of flintstones_use_embeddings.npy} (optional)

A story is a clip plus the 4 clips that follow it (``following_cache4.pkl``); its id is the first clip's globalID.
Stories come in split-file order.

Choices where the two original readers differ (AR-LDM's ``data_script/flintstones_hdf5.py`` converter and
StoryDALL-E's ``story-dalle/flintstones_dataloader.py``):

* **Filter.** Every split keeps only the clips whose ``following_cache4.pkl`` entry has exactly 4 globalIDs
  (AR-LDM's rule, so the stories are exactly the rows of AR-LDM's ``flintstones.h5``). StoryDALL-E also keeps
  train clips whose entry is shorter (fewer than 4 targets), which cannot form a 5-frame story.
* **Test truncation.** StoryDALL-E cuts test to its first 1900 stories; AR-LDM does not. Default: no truncation
  (AR-LDM); pass ``test_limit=1900`` for StoryDALL-E's test set.
* **Captions** are the annotation ``description`` exactly as stored (StoryDALL-E returns them raw). AR-LDM's
  HDF5 text has every ``\\n``/``\\t`` removed and is stripped; that normalisation is left to the consumer.
* **Labels** come from ``labels.pkl`` (only StoryDALL-E reads labels; the HDF5 has none) in its stored order,
  ``Wilma, Fred, Betty, Barney, Dino, Pebbles, Mr Slate`` (StoryDALL-E's / VLC-StoryGAN's list).
* **Frame choice.** Both originals pick a random frame of each clip on every access; here the rule is
  ``frame_choice`` (:func:`storyexp.data.frames.pick_frame`, key ``"<story id>/<position>"``).
* Duplicate ``globalID`` objects in the annotations: the last one wins (as in both originals' dict build).
* **Sentence embeddings** (:meth:`FlintstonesRawStories.sentence_embeddings`, StoryDALL-E's story-block input)
  are ``flintstones_use_embeddings[flintstones_use_embed_idxs[globalID]]`` per clip, as StoryDALL-E reads them,
  but for all 5 frames (StoryDALL-E returns the 4 targets' rows only). The two files are read on first use, so a
  folder without them still serves stories.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storyexp.errors import MissingResourceError

from .frames import FRAME_RULES, pick_frame
from .registry import DatasetSpec, register
from .story import N_FRAMES, Story, StoryDataError

__all__ = [
    "EMBEDDINGS_FILE",
    "EMBEDDING_ROWS_FILE",
    "FLINTSTONES_CHARACTERS",
    "FLINTSTONES_SPLITS",
    "FlintstonesRawStories",
    "is_flintstones_raw",
    "SPEC",
]

#: Label order of ``labels.pkl`` (StoryDALL-E ``flintstones_dataloader.py`` l.11, VLC-StoryGAN's rule).
FLINTSTONES_CHARACTERS: tuple[str, ...] = ("wilma", "fred", "betty", "barney", "dino", "pebbles", "slate")
FLINTSTONES_SPLITS = ("train", "val", "test")

FRAMES_DIR = "video_frames_sampled"
ANNOTATIONS_FILE = "flintstones_annotations_v1-0.json"
SPLIT_FILE = "train-val-test_split.json"
FOLLOWING_FILE = "following_cache4.pkl"
LABELS_FILE = "labels.pkl"
#: Sentence embeddings (only read by :meth:`FlintstonesRawStories.sentence_embeddings`): the table and the
#: globalID -> row map (rows are not in annotation or sorted order, so the map is the only way in).
EMBEDDINGS_FILE = "flintstones_use_embeddings.npy"
EMBEDDING_ROWS_FILE = "flintstones_use_embed_idxs.pkl"

#: Shape of one clip file.
CLIP_SHAPE = (5, 128, 128, 3)
_N_FOLLOWING = N_FRAMES - 1


def is_flintstones_raw(path: str | os.PathLike) -> bool:
    """True if `path` is a directory laid out like the unpacked FlintstonesSV archive."""
    p = Path(path).expanduser()
    return (
        p.is_dir()
        and (p / FRAMES_DIR).is_dir()
        and (p / SPLIT_FILE).is_file()
        and (p / ANNOTATIONS_FILE).is_file()
        and (p / FOLLOWING_FILE).is_file()
    )


def _missing(root: Path, name: str) -> MissingResourceError:
    return MissingResourceError(
        f"FlintstonesSV file '{name}' is missing: expected {root / name}. The root should be the unpacked "
        "flintstones archive (StoryDALL-E's flintstones_data: video_frames_sampled/, "
        f"{ANNOTATIONS_FILE}, {SPLIT_FILE}, {FOLLOWING_FILE}, {LABELS_FILE})."
    )


class FlintstonesRawStories(Sequence[Story]):
    """One split of the raw FlintstonesSV directory as :class:`Story` records (clips read lazily).

    Args:
        root: the unpacked flintstones archive (see the module docstring).
        split: ``train``, ``val`` or ``test``.
        frame_choice: rule picking one of each clip's 5 frames (``random``, ``fixed``, ``first``, ``middle``).
        test_limit: keep only the first `test_limit` test stories (StoryDALL-E uses 1900); ``None`` keeps all.

    ``story.labels`` is float32 ``[5, 7]`` in :data:`FLINTSTONES_CHARACTERS` order; ``story.frames`` are
    ``128 x 128 x 3`` uint8 RGB.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        frame_choice: str = "fixed",
        *,
        test_limit: int | None = None,
    ) -> None:
        if split not in FLINTSTONES_SPLITS:
            raise ValueError(f"unknown FlintstonesSV split {split!r}; expected one of {FLINTSTONES_SPLITS}")
        if frame_choice not in FRAME_RULES:
            raise ValueError(f"unknown frame choice rule {frame_choice!r}; expected one of {FRAME_RULES}")
        self.root = Path(root).expanduser()
        self.split = split
        self.frame_choice = frame_choice
        if not self.root.is_dir():
            raise MissingResourceError(
                f"FlintstonesSV directory not found: {self.root}. The root should be the unpacked flintstones "
                "archive (StoryDALL-E's flintstones_data)."
            )
        for name in (FRAMES_DIR, SPLIT_FILE, ANNOTATIONS_FILE, FOLLOWING_FILE, LABELS_FILE):
            if not (self.root / name).exists():
                raise _missing(self.root, name)

        split_ids = self._load_json(SPLIT_FILE, "split lists")
        if not isinstance(split_ids, dict) or not isinstance(split_ids.get(split), list):
            raise StoryDataError(
                f"expected a JSON object with a list under {split!r}", file=self.root / SPLIT_FILE, split=split,
                field=split,
            )
        followings = self._load_pickle(FOLLOWING_FILE)
        if not isinstance(followings, dict):
            raise StoryDataError("expected a pickled dict globalID -> list of globalIDs",
                                 file=self.root / FOLLOWING_FILE, split=split, field="followings")

        stories: list[tuple[str, ...]] = []
        for gid in split_ids[split]:
            nxt = followings.get(gid)
            if nxt is not None and len(nxt) == _N_FOLLOWING:  # AR-LDM's filter, every split
                stories.append((str(gid), *(str(g) for g in nxt)))
        if split == "test" and test_limit is not None:
            stories = stories[: max(int(test_limit), 0)]
        self._stories = stories

        annotations = self._load_json(ANNOTATIONS_FILE, "annotations")
        if not isinstance(annotations, list):
            raise StoryDataError("expected a JSON list of clip annotations", file=self.root / ANNOTATIONS_FILE,
                                 split=split, field="annotations")
        self._descriptions: dict[str, object] = {}
        for a in annotations:
            if isinstance(a, dict) and "globalID" in a:
                self._descriptions[a["globalID"]] = a.get("description")
        labels = self._load_pickle(LABELS_FILE)
        if not isinstance(labels, dict):
            raise StoryDataError("expected a pickled dict globalID -> 7 labels", file=self.root / LABELS_FILE,
                                 split=split, field="labels")
        self._labels = labels
        # sentence embeddings: loaded by the first sentence_embeddings() call (memory-mapped table)
        self._embedding_table: np.ndarray | None = None
        self._embedding_rows: dict | None = None

    # --- loading helpers -------------------------------------------------------------------------------------

    def _load_json(self, name: str, what: str):
        path = self.root / name
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise StoryDataError(f"cannot read the {what} JSON: {e}", file=path, split=self.split) from e

    def _load_pickle(self, name: str):
        path = self.root / name
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:  # unpickling can raise nearly anything on a damaged file
            raise StoryDataError(f"cannot unpickle: {e}", file=path, split=self.split) from e

    def __getstate__(self) -> dict:
        # A memory-mapped table would be pickled as a full copy (DataLoader workers under spawn): reopen instead.
        state = self.__dict__.copy()
        state["_embedding_table"] = state["_embedding_rows"] = None
        return state

    # --- Sequence --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._stories)

    @property
    def ids(self) -> list[str]:
        """Story ids (first globalID of each story) in order."""
        return [s[0] for s in self._stories]

    def clip_ids(self, index: int) -> tuple[str, ...]:
        """The 5 globalIDs of story `index` (source clip, then its 4 followings)."""
        return self._stories[self._index(index)]

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"story index must be an int, got {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += len(self._stories)
        if not 0 <= i < len(self._stories):
            raise IndexError(f"story index {index} out of range for {len(self._stories)} {self.split} stories")
        return i

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.read_story(index)[0]

    def story_id(self, index: int) -> str:
        """The id of story `index` (its source clip's globalID), without loading a clip."""
        return self._stories[self._index(index)][0]

    def frame_candidates(self, index: int) -> list[list[np.ndarray]]:
        """Every frame `frame_choice` may pick, per position: the frames of each clip (precomputed inputs)."""
        i = self._index(index)
        return [[np.ascontiguousarray(f) for f in self.clip(i, pos)] for pos in range(len(self._stories[i]))]

    def read_story(self, index: int) -> tuple[Story, tuple[int, ...]]:
        """Story `index` and, per position, the index of the frame picked from its clip."""
        i = self._index(index)
        gids = self._stories[i]
        sid = gids[0]
        ctx = dict(split=self.split, index=i, story_id=sid)

        captions: list[str] = []
        labels = np.zeros((len(gids), len(FLINTSTONES_CHARACTERS)), dtype=np.float32)
        frames: list[np.ndarray] = []
        chosen: list[int] = []
        for pos, gid in enumerate(gids):
            desc = self._descriptions.get(gid)
            if not isinstance(desc, str):
                reason = (f"no annotation for clip {gid!r}" if gid not in self._descriptions
                          else f"annotation of clip {gid!r} has no string 'description'")
                raise StoryDataError(reason, file=self.root / ANNOTATIONS_FILE, field=f"caption{pos}", **ctx)
            captions.append(desc)

            if gid not in self._labels:
                raise StoryDataError(f"no labels for clip {gid!r}", file=self.root / LABELS_FILE,
                                     field=f"labels{pos}", **ctx)
            try:
                vec = np.asarray(self._labels[gid], dtype=np.float32).reshape(-1)
            except (TypeError, ValueError) as e:
                raise StoryDataError(f"labels of clip {gid!r} are not numeric: {e}", file=self.root / LABELS_FILE,
                                     field=f"labels{pos}", **ctx) from e
            if vec.shape != (len(FLINTSTONES_CHARACTERS),):
                raise StoryDataError(
                    f"labels of clip {gid!r} have {vec.size} values, expected {len(FLINTSTONES_CHARACTERS)}",
                    file=self.root / LABELS_FILE, field=f"labels{pos}", **ctx)
            labels[pos] = vec

            clip = self._load_clip(gid, pos, ctx)
            k = pick_frame(clip.shape[0], self.frame_choice, key=f"{sid}/{pos}")
            frames.append(np.ascontiguousarray(clip[k]))
            chosen.append(k)
        return Story(id=sid, captions=captions, frames=frames, labels=labels), tuple(chosen)

    def clip(self, index: int, position: int) -> np.ndarray:
        """The whole clip ``[5, 128, 128, 3]`` uint8 RGB behind frame `position` (0..4) of story `index`."""
        i = index + len(self) if index < 0 else index
        gid = self.clip_ids(i)[position]
        ctx = {"split": self.split, "index": i, "story_id": self.clip_ids(i)[0]}
        return self._load_clip(gid, position, ctx)

    def _load_clip(self, gid: str, pos: int, ctx: dict) -> np.ndarray:
        path = self.root / FRAMES_DIR / f"{gid}.npy"
        field = f"image{pos}"
        if not path.is_file():
            raise StoryDataError(f"clip file of {gid!r} is missing", file=path, field=field, **ctx)
        try:
            clip = np.load(path, allow_pickle=False)
        except Exception as e:  # truncated / not an .npy / pickled object array
            raise StoryDataError(f"cannot read the clip .npy: {e}", file=path, field=field, **ctx) from e
        if not isinstance(clip, np.ndarray) or clip.shape != CLIP_SHAPE or clip.dtype != np.uint8:
            shape = getattr(clip, "shape", None)
            dtype = getattr(clip, "dtype", None)
            raise StoryDataError(
                f"clip has shape {shape} dtype {dtype}, expected {CLIP_SHAPE} uint8", file=path, field=field, **ctx
            )
        return clip

    # --- sentence embeddings -------------------------------------------------------------------------------

    def sentence_embeddings(self, index: int) -> np.ndarray:
        """float32 ``[5, D]`` (D = 512 in the archive): the USE sentence embedding of each clip of story `index`.

        Row ``flintstones_use_embed_idxs.pkl[globalID]`` of ``flintstones_use_embeddings.npy`` per clip, source
        clip first (StoryDALL-E feeds these to its story block; it returns only the 4 targets' rows).

        Raises:
            StoryDataError: an embeddings file is missing or unreadable, a clip has no row, or its row is out of
                range (the message names the file, the story and the field ``embedding<position>``).
        """
        i = self._index(index)
        gids = self._stories[i]
        ctx = dict(split=self.split, index=i, story_id=gids[0])
        table, rows = self._load_embeddings(ctx)
        out = np.empty((len(gids), table.shape[1]), dtype=np.float32)
        for pos, gid in enumerate(gids):
            row = rows.get(gid)
            if row is None:
                raise StoryDataError(f"no sentence embedding row for clip {gid!r}",
                                     file=self.root / EMBEDDING_ROWS_FILE, field=f"embedding{pos}", **ctx)
            if isinstance(row, (bool, np.bool_)) or not isinstance(row, (int, np.integer)):
                raise StoryDataError(f"row of clip {gid!r} is {row!r}, not an integer",
                                     file=self.root / EMBEDDING_ROWS_FILE, field=f"embedding{pos}", **ctx)
            if not 0 <= int(row) < table.shape[0]:
                raise StoryDataError(
                    f"row {int(row)} of clip {gid!r} is out of range for the {table.shape[0]} rows of "
                    f"{EMBEDDINGS_FILE}",
                    file=self.root / EMBEDDING_ROWS_FILE, field=f"embedding{pos}", **ctx)
            out[pos] = table[int(row)]
        return out

    def _load_embeddings(self, ctx: dict) -> tuple[np.ndarray, dict]:
        """The embedding table (memory-mapped: workers share it rather than each holding tens of MB), row map."""
        if self._embedding_table is not None and self._embedding_rows is not None:
            return self._embedding_table, self._embedding_rows
        for name in (EMBEDDINGS_FILE, EMBEDDING_ROWS_FILE):
            if not (self.root / name).is_file():
                raise StoryDataError(
                    f"sentence embeddings file is missing (StoryDALL-E's flintstones archive ships {EMBEDDINGS_FILE} "
                    f"and {EMBEDDING_ROWS_FILE}; without them compute embeddings from the captions instead)",
                    file=self.root / name, field="sentence_embeddings", **ctx)
        path = self.root / EMBEDDINGS_FILE
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # truncated / not an .npy / pickled object array
            raise StoryDataError(f"cannot read the embeddings as a plain numpy array: {e}", file=path,
                                 field="sentence_embeddings", **ctx) from e
        if table.ndim != 2 or table.shape[1] == 0 or not np.issubdtype(table.dtype, np.floating):
            raise StoryDataError(
                f"expected a 2-D float array [n_clips, dim], got shape {list(table.shape)} dtype {table.dtype}",
                file=path, field="sentence_embeddings", **ctx)
        try:
            rows = self._load_pickle(EMBEDDING_ROWS_FILE)
        except StoryDataError as e:
            raise StoryDataError(e.reason, file=e.file, field="sentence_embeddings", **ctx) from e
        if not isinstance(rows, dict):
            raise StoryDataError(f"expected a pickled dict globalID -> row, got {type(rows).__name__}",
                                 file=self.root / EMBEDDING_ROWS_FILE, field="sentence_embeddings", **ctx)
        self._embedding_table, self._embedding_rows = table, rows
        return table, rows

    def __repr__(self) -> str:
        return (f"FlintstonesRawStories(root={str(self.root)!r}, split={self.split!r}, "
                f"frame_choice={self.frame_choice!r}, n={len(self)})")


class _StoredClips(Sequence):
    """What the converter stores for FlintstonesSV: each frame is its whole clip, stacked vertically (640 x 128)."""

    def __init__(self, reader: FlintstonesRawStories) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Story:  # type: ignore[override]
        story = self.reader[index]
        story.frames = [np.concatenate(list(self.reader.clip(index, j)), axis=0) for j in range(N_FRAMES)]
        return story


def _open_raw(root: Path, split: str, frame_choice: str = "fixed") -> FlintstonesRawStories:
    return FlintstonesRawStories(root, split, frame_choice=frame_choice)


def _open_stored(root: Path, split: str) -> _StoredClips:
    return _StoredClips(FlintstonesRawStories(root, split))


SPEC = register(
    DatasetSpec(
        name="flintstones",
        title="FlintstonesSV",
        open_raw=_open_raw,
        is_raw=is_flintstones_raw,
        open_stored=_open_stored,
        frame_height=CLIP_SHAPE[1],
        text_key="text",
        characters=FLINTSTONES_CHARACTERS,
        download="Get StoryDALL-E's FlintstonesSV archive (flintstones_data.zip; README.md, 'Datasets') and point "
        "the path at the unpacked folder",
    )
)
