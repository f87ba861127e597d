"""PororoSV read directly from the raw directory as distributed (StoryDALL-E's pororo archive, unpacked).

Layout of the root (the directory StoryDALL-E's loader gets as ``img_folder`` and ARLDM's converter as
``--data_dir``)::

    <series>/<episode>/<n>.png      vertical strips of k 128x128 frames (128 px wide, 128*k px tall)
    img_cache4.npy                  [N] bytes: source frame path of story r (with ``.png``)
    following_cache4.npy            [N, 4] bytes: the 4 following frame paths of story r
    train_seen_unseen_ids.npy       object array (train, val, test) of row ids into the caches (unsorted)
    descriptions.npy                dict frame key -> list of captions (``[0]`` is used)
    labels.npy                      dict frame key -> 9-dim multi-hot character vector
    descriptions_vec_512.pkl        dict frame key -> [n_captions, 512] sentence embeddings (optional)

A *frame key* is the relative path without ``.png``, e.g. ``Pororo_ENGLISH1_1/Pororo_ENGLISH1_1_ep3/0``.

Story ``i`` of a split is cache row ``r = sorted(split ids)[i]`` (both original readers sort the ids): the
source frame ``img_cache4[r]`` followed by ``following_cache4[r, 0..3]``. Captions are
``descriptions[key][0]`` exactly as stored (StoryDALL-E returns them raw; ARLDM's converter removes ``\\n`` /
``\\t`` and strips them when writing its HDF5 file, which this reader does not do). Labels are
``labels[key]`` as float32 ``[5, 9]`` in the file's order (:data:`PORORO_CHARACTERS`). One 128x128 frame is
taken from each strip with :func:`~storyexp.data.frames.pick_frame` (key ``"<story id>/<position>"``).
The story id is the source frame key.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .frames import FRAME_RULES, pick_frame, split_strip
from .registry import DatasetSpec, register
from .story import N_FRAMES, Story, StoryDataError

__all__ = [
    "PororoRawStories",
    "is_pororo_raw",
    "PORORO_CHARACTERS",
    "REQUIRED_FILES",
    "EMBEDDINGS_FILE",
    "FRAME_SIZE",
    "SPLITS",
    "SPEC",
]

#: Order of the 9 label positions (the character-token order of StoryDALL-E's training script).
PORORO_CHARACTERS = ("pororo", "loopy", "eddy", "harry", "poby", "tongtong", "crong", "rody", "petty")
#: Files the reader needs in the root; their presence is what :func:`is_pororo_raw` checks.
REQUIRED_FILES = (
    "img_cache4.npy",
    "following_cache4.npy",
    "train_seen_unseen_ids.npy",
    "descriptions.npy",
    "labels.npy",
)
#: Sentence embeddings (only read by :meth:`PororoRawStories.sentence_embeddings`).
EMBEDDINGS_FILE = "descriptions_vec_512.pkl"
#: Side of one frame in a strip.
FRAME_SIZE = 128
#: Split names, in the order of ``train_seen_unseen_ids.npy``.
SPLITS = ("train", "val", "test")

_ROOT_HINT = "the root should be the unpacked StoryDALL-E pororo archive (PororoSV)"


def is_pororo_raw(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory laid out as the raw PororoSV archive (all :data:`REQUIRED_FILES`)."""
    p = Path(path).expanduser()
    return p.is_dir() and all((p / name).is_file() for name in REQUIRED_FILES)


def _missing(root: Path, name: str) -> FileNotFoundError:
    path = root / name
    return FileNotFoundError(f"PororoSV file not found: {path} ({_ROOT_HINT}, holding {', '.join(REQUIRED_FILES)})")


def _frame_path(value: Any) -> str:
    """A cache element (bytes as in the archive, or str) -> relative path string.

    The originals use ``str(x)[2:-1]``, which equals ``x.decode()`` for the ASCII paths of the archive.
    """
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin1")
    return str(value)


def _frame_key(path: str) -> str:
    return path[: -len(".png")] if path.endswith(".png") else path


class PororoRawStories(Sequence):
    """The stories of one split of the raw PororoSV directory, as a ``Sequence[Story]``.

    Only the small cache/split arrays are read when the instance is built (they give the length and the
    frame keys); the caption and label dictionaries are loaded on first item access, once per process, and
    the sentence embeddings only by :meth:`sentence_embeddings`. Instances are pickle-safe and small (the
    loaded dictionaries are not pickled).

    Args:
        root: the unpacked StoryDALL-E pororo archive.
        split: ``train`` | ``val`` | ``test``.
        frame_choice: how one frame is chosen from each strip: ``fixed`` (stable per story and position),
            ``random``, ``first`` or ``middle`` (see :mod:`storyexp.data.frames`).

    Raises:
        FileNotFoundError: the root or one of :data:`REQUIRED_FILES` is missing.
        ValueError: unknown split or frame choice.
        StoryDataError: malformed cache or split arrays (at construction); missing/undecodable image, strip
            that is not a whole number of 128-px frames, missing caption or label (when a story is read).
    """

    characters = PORORO_CHARACTERS

    def __init__(self, root: str | os.PathLike, split: str = "train", frame_choice: str = "fixed") -> None:
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.frame_choice = str(frame_choice)
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self.frame_choice not in FRAME_RULES:
            raise ValueError(f"unknown frame choice rule {frame_choice!r}; expected one of {FRAME_RULES}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"PororoSV root directory not found: {self.root} ({_ROOT_HINT})")
        for name in REQUIRED_FILES:
            if not (self.root / name).is_file():
                raise _missing(self.root, name)

        src = self._load_array("img_cache4.npy")
        fol = self._load_array("following_cache4.npy")
        if src.ndim != 1:
            raise self._file_error(
                "img_cache4.npy", f"expected a 1-D array of frame paths, got shape {list(src.shape)}"
            )
        n_rows = src.shape[0]
        if fol.ndim != 2 or fol.shape[0] != n_rows or fol.shape[1] != N_FRAMES - 1:
            raise self._file_error(
                "following_cache4.npy",
                f"expected shape [{n_rows}, {N_FRAMES - 1}] (rows of img_cache4.npy x following frames), "
                f"got {list(fol.shape)}",
            )

        ids_path = self.root / "train_seen_unseen_ids.npy"
        try:
            split_ids = np.load(ids_path, allow_pickle=True, encoding="latin1")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise self._file_error("train_seen_unseen_ids.npy", f"cannot be read ({e})") from e
        if len(split_ids) != len(SPLITS):
            raise self._file_error(
                "train_seen_unseen_ids.npy",
                f"expected {len(SPLITS)} id arrays (train, val, test), got {len(split_ids)}",
            )
        try:
            rows = np.sort(np.asarray(split_ids[SPLITS.index(self.split)], dtype=np.int64).reshape(-1))
        except (TypeError, ValueError) as e:
            raise self._file_error("train_seen_unseen_ids.npy", f"{self.split} ids are not integers ({e})") from e
        bad = rows[(rows < 0) | (rows >= n_rows)]
        if bad.size:
            raise self._file_error(
                "train_seen_unseen_ids.npy",
                f"{self.split} ids {bad[:5].tolist()} out of range for {n_rows} rows of img_cache4.npy",
            )
        self.rows: list[int] = [int(r) for r in rows]
        self._keys: list[tuple[str, ...]] = [
            tuple(_frame_key(_frame_path(p)) for p in (src[r], *fol[r])) for r in self.rows
        ]
        self._descriptions: dict | None = None
        self._labels: dict | None = None
        self._embeddings: dict | None = None

    # -- files -----------------------------------------------------------------------------------------

    def _file_error(self, name: str, reason: str) -> StoryDataError:
        return StoryDataError(reason, file=self.root / name, split=self.split, index="(all)", field=name)

    def _load_array(self, name: str) -> np.ndarray:
        # The caches are plain bytes arrays: no pickle needed (nor allowed).
        try:
            return np.load(self.root / name, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise self._file_error(name, f"cannot be read as a plain numpy array ({e})") from e

    def _load_dict(self, name: str) -> dict:
        path = self.root / name
        if not path.is_file():
            raise _missing(self.root, name)
        try:
            if name.endswith(".pkl"):
                with open(path, "rb") as f:
                    obj = pickle.load(f, encoding="latin1")
            else:
                obj = np.load(path, allow_pickle=True, encoding="latin1")
                obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
        except Exception as e:  # noqa: BLE001
            raise self._file_error(name, f"cannot be read ({e})") from e
        if not isinstance(obj, dict):
            raise self._file_error(name, f"expected a dict of frame key -> value, got {type(obj).__name__}")
        return obj

    @property
    def descriptions(self) -> dict:
        """``descriptions.npy``: frame key -> list of captions (loaded on first use)."""
        if self._descriptions is None:
            self._descriptions = self._load_dict("descriptions.npy")
        return self._descriptions

    @property
    def label_dict(self) -> dict:
        """``labels.npy``: frame key -> 9-dim character vector (loaded on first use)."""
        if self._labels is None:
            self._labels = self._load_dict("labels.npy")
        return self._labels

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_descriptions"] = state["_labels"] = state["_embeddings"] = None
        return state

    # -- per story -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"story index must be an integer, got {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"story index {index} out of range for split {self.split!r} ({len(self)} stories)")
        return i

    def frame_keys(self, index: int) -> tuple[str, ...]:
        """The 5 frame keys of story `index` (source first)."""
        return self._keys[self._index(index)]

    def story_id(self, index: int) -> str:
        """The id of story `index`: its source frame key."""
        return self.frame_keys(index)[0]

    def _err(self, i: int, reason: str, field: str, file: Path | str | None = None) -> StoryDataError:
        return StoryDataError(
            reason, file=file if file is not None else self.root, split=self.split, index=i,
            story_id=self._keys[i][0], field=field,
        )

    def strip(self, index: int, position: int) -> np.ndarray:
        """The full strip ``[128k, 128, 3]`` uint8 RGB of frame `position` (0..4) of story `index`."""
        i = self._index(index)
        key = self._keys[i][position]
        path = self.root / f"{key}.png"
        field = f"image{position}"
        if not path.is_file():
            raise self._err(i, f"frame image not found ({key}.png)", field, path)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            raise self._err(i, f"image cannot be decoded ({type(e).__name__}: {e})", field, path) from e
        h, w = arr.shape[:2]
        if w != FRAME_SIZE or h == 0 or h % FRAME_SIZE:
            raise self._err(
                i,
                f"expected a vertical strip of {FRAME_SIZE}x{FRAME_SIZE} frames ({FRAME_SIZE} px wide, a multiple "
                f"of {FRAME_SIZE} px tall), got {w}x{h} (width x height)",
                field,
                path,
            )
        return arr

    def __getitem__(self, index: int) -> Story:  # type: ignore[override]
        return self.read_story(index)[0]

    def frame_candidates(self, index: int) -> list[list[np.ndarray]]:
        """Every frame `frame_choice` may pick, per position: the frames of each strip (precomputed inputs)."""
        i = self._index(index)
        return [[np.ascontiguousarray(b) for b in split_strip(self.strip(i, j), FRAME_SIZE)]
                for j in range(len(self._keys[i]))]

    def read_story(self, index: int) -> tuple[Story, tuple[int, ...]]:
        """Story `index` and, per position, the index of the frame picked from its strip."""
        i = self._index(index)
        keys = self._keys[i]
        sid = keys[0]
        captions: list[str] = []
        labels = []
        desc, lab = self.descriptions, self.label_dict
        for j, key in enumerate(keys):
            caps = desc.get(key)
            if caps is None or len(caps) == 0:
                raise self._err(i, f"no caption for frame {key!r}", f"caption{j}", self.root / "descriptions.npy")
            cap = caps[0]
            captions.append(cap.decode("utf-8") if isinstance(cap, bytes) else str(cap))
            vec = lab.get(key)
            if vec is None:
                raise self._err(i, f"no label vector for frame {key!r}", "labels", self.root / "labels.npy")
            vec = np.asarray(vec, dtype=np.float32).reshape(-1)
            if vec.shape != (len(PORORO_CHARACTERS),):
                raise self._err(
                    i, f"label vector of {key!r} has {vec.size} entries, expected {len(PORORO_CHARACTERS)}",
                    "labels", self.root / "labels.npy",
                )
            labels.append(vec)
        frames, chosen = [], []
        for j in range(len(keys)):
            blocks = split_strip(self.strip(i, j), FRAME_SIZE)
            q = pick_frame(len(blocks), self.frame_choice, key=f"{sid}/{j}")
            frames.append(np.ascontiguousarray(blocks[q]))
            chosen.append(q)
        story = Story(id=sid, captions=captions, frames=frames, labels=np.stack(labels).astype(np.float32))
        return story, tuple(chosen)

    def sentence_embeddings(self, index: int) -> np.ndarray:
        """float32 ``[5, 512]``: row ``[0]`` of ``descriptions_vec_512.pkl`` for each frame (as StoryDALL-E).

        Raises FileNotFoundError when the optional embeddings file is absent.
        """
        i = self._index(index)
        if self._embeddings is None:
            self._embeddings = self._load_dict(EMBEDDINGS_FILE)
        out = []
        for j, key in enumerate(self._keys[i]):
            vec = self._embeddings.get(key)
            if vec is None:
                raise self._err(
                    i, f"no sentence embedding for frame {key!r}", f"embedding{j}", self.root / EMBEDDINGS_FILE
                )
            vec = np.asarray(vec, dtype=np.float32)
            out.append(vec[0] if vec.ndim == 2 else vec.reshape(-1))
        return np.stack(out)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"PororoRawStories(root={str(self.root)!r}, split={self.split!r}, "
            f"frame_choice={self.frame_choice!r}, n={len(self)})"
        )


class _StoredStrips(Sequence):
    """What the converter stores for PororoSV: the stories with each frame's whole strip (``[128k, 128, 3]``)."""

    def __init__(self, reader: PororoRawStories) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Story:  # type: ignore[override]
        story = self.reader[index]
        story.frames = [self.reader.strip(index, j) for j in range(N_FRAMES)]
        return story


def _open_raw(root: Path, split: str, frame_choice: str = "fixed") -> PororoRawStories:
    return PororoRawStories(root, split, frame_choice=frame_choice)


def _open_stored(root: Path, split: str) -> _StoredStrips:
    return _StoredStrips(PororoRawStories(root, split))


SPEC = register(
    DatasetSpec(
        name="pororo",
        title="PororoSV",
        open_raw=_open_raw,
        is_raw=is_pororo_raw,
        open_stored=_open_stored,
        frame_height=FRAME_SIZE,
        text_key="text",
        characters=PORORO_CHARACTERS,
        download="Get StoryDALL-E's PororoSV archive (pororo.zip; README.md, 'Datasets') and point the path at "
        "the unpacked folder",
    )
)
