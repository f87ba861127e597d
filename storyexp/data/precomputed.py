"""Precomputed per-frame arrays: one HDF5 file of arrays computed once per candidate frame of a split (no models here).

What the arrays are is the writer's business (StoryDALL-E: stage-1 VQGAN codes; AR-LDM: the VAE posterior's mean
and std): this module only stores them by (story, frame position, candidate frame) and reads them back for the
frames a batch actually holds. A *candidate* is one frame that `data.frame_choice` may pick for a position (the k
frames of a PororoSV strip, the 5 of a FlintstonesSV clip; 1 elsewhere), so a training batch drawn with
``frame_choice.train=random`` finds the arrays of the frame it drew.

Layout::

    attrs   format = "storyexp-precomputed", format_version, record (JSON: what produced it, utils/cache.py)
    ids           (N,)   utf-8 story ids, in split order (checked against the story read)
    offsets       (N, 5) int64: first row of (story, position)
    n_candidates  (N, 5) int32: its number of candidates
    <name>        (R, ...) one row per candidate frame, R = sum of n_candidates (rows of one story contiguous,
                  position-major)

Written atomically and streaming (:func:`write_precomputed`); read lazily, once per process
(:class:`PrecomputedArrays`, pickle-safe, reopened after a fork like :class:`~storyexp.data.hdf5.HDF5Stories`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storyexp.utils.io import atomic_write

from .story import N_FRAMES, StoryDataError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PrecomputedArrays", "read_record", "write_precomputed"]

FORMAT_NAME = "storyexp-precomputed"
FORMAT_VERSION = 1
CHUNK_BYTES = 64 * 1024


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record stored in a precomputed file, or None when the file is absent, unreadable or of another format."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return None
            return json.loads(f.attrs["record"])
    except (OSError, KeyError, ValueError):
        return None


def write_precomputed(path: str | os.PathLike, record: Mapping[str, Any],
                      stories: Iterable[tuple[str, Sequence[int], Mapping[str, np.ndarray]]]) -> Path:
    """Write a precomputed file (atomically: nothing is left behind on error).

    ``stories`` yields, per story of the split in order, ``(story id, candidates per position [5], {name: array
    [sum(candidates), ...]})``, rows position-major. Every story must give the same names, dtypes and row shapes.
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["record"] = json.dumps(dict(record), sort_keys=True)
            ids, offsets, counts, rows = [], [], [], 0
            for story_id, n_candidates, arrays in stories:
                n_candidates = [int(n) for n in n_candidates]
                if len(n_candidates) != N_FRAMES or min(n_candidates) < 1:
                    raise ValueError(f"story {story_id!r}: expected {N_FRAMES} candidate counts >= 1, "
                                     f"got {n_candidates}")
                _append_rows(f, path, story_id, sum(n_candidates), arrays, rows)
                ids.append(str(story_id))
                offsets.append(rows + np.concatenate([[0], np.cumsum(n_candidates)[:-1]]))
                counts.append(n_candidates)
                rows += sum(n_candidates)
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64).reshape(-1, N_FRAMES))
            f.create_dataset("n_candidates", data=np.asarray(counts, dtype=np.int32).reshape(-1, N_FRAMES))

    return atomic_write(path, write)


def _rows_per_chunk(value: np.ndarray) -> int:
    """Rows per HDF5 chunk: about CHUNK_BYTES, so reading one random row (a training frame) reads little more than
    itself and stays within h5py's 1 MiB chunk cache (a 128 KiB VAE row: 1 row; a 512 B code row: 64 rows)."""
    row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize)
    return int(max(1, min(64, CHUNK_BYTES // row_bytes)))


def _append_rows(f: h5py.File, path: Path, story_id: str, n_rows: int, arrays: Mapping[str, np.ndarray],
                 start: int) -> None:
    """Append one story's rows to every array dataset (created, resizable, by the first story)."""
    if start > 0 and set(arrays) != {k for k in f.keys()}:
        raise ValueError(f"{path}: story {story_id!r} gives arrays {sorted(arrays)}, earlier ones {sorted(f.keys())}")
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        if value.shape[0] != n_rows:
            raise ValueError(f"{path}: story {story_id!r} array {name!r} has {value.shape[0]} rows, "
                             f"expected {n_rows} (one per candidate frame)")
        if name not in f:
            f.create_dataset(name, shape=(0, *value.shape[1:]), maxshape=(None, *value.shape[1:]),
                             dtype=value.dtype, chunks=(_rows_per_chunk(value), *value.shape[1:]))
        dataset = f[name]
        if dataset.shape[1:] != value.shape[1:] or dataset.dtype != value.dtype:
            raise ValueError(f"{path}: story {story_id!r} array {name!r} is {value.dtype} {list(value.shape[1:])}, "
                             f"earlier rows {dataset.dtype} {list(dataset.shape[1:])}")
        dataset.resize(start + n_rows, axis=0)
        dataset[start : start + n_rows] = value


class PrecomputedArrays:
    """A precomputed file opened for reading: the arrays of the frames a story was read with.

    Args:
        path: the file (:func:`write_precomputed`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        record = read_record(self.path)
        if record is None:
            raise StoryDataError(f"not a readable precomputed-arrays file ({FORMAT_NAME})", file=self.path)
        self.record: dict[str, Any] = record
        with h5py.File(self.path, "r") as f:
            self.names = sorted(k for k in f.keys() if k not in ("ids", "offsets", "n_candidates"))
            self._len = int(f["ids"].shape[0])
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._len

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():  # after a fork: our own handle
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def arrays(self, index: int, story_id: str, choice: Sequence[int]) -> dict[str, np.ndarray]:
        """``{name: [5, ...]}``: the rows of story `index` for the candidate frames `choice` (one per position).

        A story id other than the one stored, or a candidate the file does not hold, is a :class:`StoryDataError`
        (the file was computed from other data: recompute it with ``task=precompute``).
        """
        f = self._file()
        stored = f["ids"][index]
        stored = stored.decode("utf-8") if isinstance(stored, bytes) else str(stored)

        def err(reason: str) -> StoryDataError:
            return StoryDataError(f"{reason}; recompute it (task=precompute) for this data", file=self.path,
                                  index=int(index), story_id=story_id, field="precomputed")

        if stored != story_id:
            raise err(f"row {index} holds story {stored!r}")
        counts = f["n_candidates"][index]
        choice = np.asarray(choice, dtype=np.int64)
        if choice.shape != (N_FRAMES,) or (choice < 0).any() or (choice >= counts).any():
            raise err(f"frame choice {choice.tolist()} is outside the stored candidates {counts.tolist()}")
        rows = f["offsets"][index] + choice
        return {name: np.stack([f[name][int(r)] for r in rows]) for name in self.names}
