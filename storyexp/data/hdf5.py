"""The ARLDM HDF5 story layout: reader (:class:`HDF5Stories`) and the one writer (:func:`write_hdf5`).

Layout (what ARLDM's ``data_script/*_hdf5.py`` write, see ``reference/arldm.md`` §4.1):

* top-level groups ``train`` / ``val`` / ``test``;
* in each, datasets ``image0`` .. ``image4`` of shape ``(N,)``, dtype ``h5py.vlen_dtype(uint8)``: each element
  the bytes of a PNG written by ``cv2.imencode('.png', rgb_array)``. OpenCV takes the RGB array for BGR, so
  the PNG on disk has red and blue **swapped**; ``cv2.imdecode(..., cv2.IMREAD_COLOR)`` swaps them back and
  returns the original RGB. This module does exactly that on both sides, so files written here read the
  same in ARLDM's own readers, and ARLDM's files read the same here;
* one text dataset of shape ``(N,)``, ``h5py.string_dtype('utf-8')``: the 5 captions of a story joined by
  ``|``. Named ``text`` (Pororo, Flintstones, and files written here by default), ``ssid`` (SSID) or
  ``sis`` / ``dii`` (VIST);
* optional ``labels`` ``[N, 5, C]`` float32 multi-hot characters, optional ``ids`` ``(N,)`` string story ids
  and file attributes with metadata (written by this project; ARLDM's readers ignore them).

Frames are returned as stored (``frame_height=None``): a PororoSV strip of k frames is one ``128k x 128``
image and a FlintstonesSV clip one ``640 x 128`` image. With ``frame_height=128`` a taller image is split into
its frames and one is picked by ``frame_choice`` (see :mod:`storyexp.data.frames`), keyed by story id and
position exactly as the raw readers do. ``read_story(i)`` also says which frame of each strip was picked, and
``frame_candidates(i)`` gives every frame that may be picked (what a precomputed file, :mod:`storyexp.data.precomputed`,
holds rows for).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from storyexp.utils.io import atomic_write

from .frames import pick_frame, split_strip
from .story import N_FRAMES, Story, StoryDataError

__all__ = [
    "HDF5Stories",
    "HDF5Writer",
    "SplitWriter",
    "check_story",
    "write_hdf5",
    "write_stories_hdf5",
    "decode_png",
    "encode_png",
    "TEXT_KEYS",
    "SPLITS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

#: Names of the caption dataset, in auto-detection order.
TEXT_KEYS = ("text", "ssid", "sis", "dii")
#: Split groups of the layout.
SPLITS = ("train", "val", "test")
#: File attributes written by :func:`write_hdf5`.
FORMAT_NAME = "storyexp-arldm-hdf5"
FORMAT_VERSION = 1
_CAPTION_SEP = "|"
# handles a forked process inherited from its parent: set aside unread (see HDF5Stories._group)
_INHERITED_HANDLES: list[h5py.File] = []


# --------------------------------------------------------------------------------------------- PNG codec


def encode_png(frame: np.ndarray) -> np.ndarray:
    """PNG bytes of an RGB uint8 frame, written the way ARLDM's converters do (channel-swapped on disk)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame))
    if not ok:  # pragma: no cover - cv2 only fails on unsupported arrays, checked by the caller
        raise ValueError("cv2.imencode('.png') failed")
    return buf.reshape(-1)


def decode_png(data: Any) -> np.ndarray | None:
    """Decode PNG bytes from the layout back to RGB uint8 ``H x W x 3``; ``None`` when undecodable."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size == 0:
        return None
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        return None
    return np.ascontiguousarray(img)


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _decode_attr(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_decode_attr(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


# ------------------------------------------------------------------------------------------------ reader


class HDF5Stories(Sequence):
    """The stories of one split of an ARLDM-layout HDF5 file, as a ``Sequence[Story]``.

    The file is opened lazily, once per process, on first item access (keyed by process id): instances are
    pickle-safe (the open handle is never pickled), and a DataLoader worker forked after the parent read a story
    opens its own handle on its first read, leaving the inherited one untouched (h5py state shared through
    ``fork`` is a known source of corrupt reads and crashes). PNG decoding happens in :meth:`read_story`, i.e. in
    the worker that reads the story. The structure of the
    split is checked when the instance is built; per-story problems (bad PNG bytes, wrong caption count) are
    reported when the story is read. Every error is a :class:`StoryDataError` naming file, split, story
    and field, except a missing file (:class:`FileNotFoundError`).

    Args:
        path: the HDF5 file.
        split: group name (``train``, ``val``, ``test``).
        text_key: caption dataset; ``None`` picks the first of :data:`TEXT_KEYS` present.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        text_key: str | None = None,
        *,
        frame_height: int | None = None,
        frame_choice: str = "fixed",
    ) -> None:
        self.path = Path(path)
        self.split = str(split)
        self.frame_height = None if frame_height is None else int(frame_height)
        self.frame_choice = frame_choice
        if not self.path.exists():
            raise FileNotFoundError(f"HDF5 story file not found: {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(f"expected an HDF5 story file, got a directory: {self.path}")
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise StoryDataError(f"not a readable HDF5 file ({e})", file=self.path) from e
        with f:
            self.attrs: dict[str, Any] = {k: _decode_attr(v) for k, v in f.attrs.items()}
            if self.split not in f or not isinstance(f[self.split], h5py.Group):
                present = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
                raise StoryDataError(
                    f"split group missing (groups present: {present})",
                    file=self.path,
                    split=self.split,
                    index="(all)",
                    field=self.split,
                )
            g = f[self.split]
            self.text_key = self._detect_text_key(g, text_key)
            self._len = int(g[self.text_key].shape[0])
            span = f"0..{self._len - 1} (all {self._len})"
            for j in range(N_FRAMES):
                key = f"image{j}"
                if key not in g:
                    images = sorted(k for k in g.keys() if k.startswith("image"))
                    raise StoryDataError(
                        f"image dataset missing (expected image0..image{N_FRAMES - 1}, found {images})",
                        file=self.path,
                        split=self.split,
                        index=span,
                        field=key,
                    )
                if g[key].shape[0] != self._len:
                    raise StoryDataError(
                        f"has {g[key].shape[0]} rows but {self.text_key!r} has {self._len}",
                        file=self.path,
                        split=self.split,
                        index=span,
                        field=key,
                    )
            self.has_labels = "labels" in g
            if self.has_labels:
                shape = g["labels"].shape
                if len(shape) != 3 or shape[0] != self._len or shape[1] != N_FRAMES:
                    raise StoryDataError(
                        f"expected shape [{self._len}, {N_FRAMES}, n_characters], got {list(shape)}",
                        file=self.path,
                        split=self.split,
                        index=span,
                        field="labels",
                    )
                self.n_characters: int | None = int(shape[2])
            else:
                self.n_characters = None
            self._has_ids = "ids" in g and g["ids"].shape[0] == self._len

    # -- structure -------------------------------------------------------------------------------------

    def _detect_text_key(self, g: h5py.Group, text_key: str | None) -> str:
        if text_key is not None:
            if text_key not in g:
                raise StoryDataError(
                    f"caption dataset {text_key!r} missing (datasets present: {sorted(g.keys())})",
                    file=self.path,
                    split=self.split,
                    index="(all)",
                    field=text_key,
                )
            return text_key
        for key in TEXT_KEYS:
            if key in g:
                return key
        raise StoryDataError(
            f"no caption dataset; expected one of {list(TEXT_KEYS)} (datasets present: {sorted(g.keys())})",
            file=self.path,
            split=self.split,
            index="(all)",
            field="|".join(TEXT_KEYS),
        )

    @property
    def characters(self) -> list[str] | None:
        """Character names in label order, when the file records them (files written by this project)."""
        chars = self.attrs.get("characters")
        if isinstance(chars, str):
            chars = json.loads(chars)
        return None if chars is None else list(chars)

    # -- lazy per-process handle ----------------------------------------------------------------------------

    def _group(self) -> h5py.Group:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            if self._handle is not None:
                # After a fork the inherited handle belongs to the parent's HDF5 state: never read or close it
                # here (closing would run HDF5's file close on the parent's state copy); keep it referenced so
                # that it is not deallocated in this process either, and open our own.
                _INHERITED_HANDLES.append(self._handle)
            self._handle = h5py.File(self.path, "r")
            self._pid = pid
        return self._handle[self.split]

    @property
    def handle_pid(self) -> int | None:
        """The process that opened the handle in use (``None`` while none is open): after a ``fork``, the first read
        in a DataLoader worker opens the worker's own."""
        return self._pid if self._handle is not None else None

    def close(self) -> None:
        if self._handle is not None:
            if self._pid == os.getpid():
                self._handle.close()
            else:  # inherited through fork: the parent's to close
                _INHERITED_HANDLES.append(self._handle)
        self._handle = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- Sequence ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Story:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]  # type: ignore[return-value]
        return self.read_story(index)[0]

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"story index {index} out of range for split {self.split!r} of {self.path}")
        return i

    def _story_id(self, g: h5py.Group, i: int) -> str:
        return _as_str(g["ids"][i]) if self._has_ids else f"{self.split}/{i}"

    def _error(self, i: int, story_id: str) -> Callable[[str, str], StoryDataError]:
        def err(reason: str, field: str) -> StoryDataError:
            return StoryDataError(reason, file=self.path, split=self.split, index=i, story_id=story_id, field=field)

        return err

    def _frame_options(self, g: h5py.Group, i: int, j: int, err: Callable[[str, str], StoryDataError]
                       ) -> list[np.ndarray]:
        """Every candidate frame stored for position `j` of story `i`: a strip's frames, or the one image."""
        key = f"image{j}"
        frame = decode_png(g[key][i])
        if frame is None:
            raise err("PNG bytes cannot be decoded (cv2.imdecode failed)", key)
        if self.frame_height and frame.shape[0] > self.frame_height:
            try:
                return split_strip(frame, self.frame_height)
            except ValueError as e:
                raise err(str(e), key) from e
        return [frame]

    def story_id(self, index: int) -> str:
        """The id of story `index` (without decoding its frames)."""
        return self._story_id(self._group(), self._index(index))

    def frame_candidates(self, index: int) -> list[list[np.ndarray]]:
        """Every frame `frame_choice` may pick, per position: ``[5][k_j]`` uint8 arrays (precomputed inputs)."""
        i = self._index(index)
        g = self._group()
        err = self._error(i, self._story_id(g, i))
        return [self._frame_options(g, i, j, err) for j in range(N_FRAMES)]

    def read_story(self, index: int) -> tuple[Story, tuple[int, ...]]:
        """Story `index` and, per position, the index of the candidate frame picked (0 where there is one)."""
        i = self._index(index)
        g = self._group()
        story_id = self._story_id(g, i)
        err = self._error(i, story_id)

        raw_text = g[self.text_key][i]
        try:
            text = raw_text.decode("utf-8") if isinstance(raw_text, bytes) else str(raw_text)
        except UnicodeDecodeError as e:
            raise err(f"caption text is not valid UTF-8 ({e})", self.text_key) from e
        captions = text.split(_CAPTION_SEP)
        if len(captions) != N_FRAMES:
            raise err(
                f"expected {N_FRAMES} captions separated by '|', got {len(captions)}: {text!r}",
                self.text_key,
            )
        frames, chosen = [], []
        for j in range(N_FRAMES):
            options = self._frame_options(g, i, j, err)
            q = pick_frame(len(options), self.frame_choice, f"{story_id}/{j}") if len(options) > 1 else 0
            frames.append(options[q])
            chosen.append(q)
        labels = None
        if self.has_labels:
            labels = np.asarray(g["labels"][i], dtype=np.float32)
        return Story(id=story_id, captions=captions, frames=frames, labels=labels), tuple(chosen)

    def __iter__(self):
        for i in range(self._len):
            yield self[i]

    def __repr__(self) -> str:
        return f"HDF5Stories({str(self.path)!r}, split={self.split!r}, text_key={self.text_key!r}, n={self._len})"


# ------------------------------------------------------------------------------------------------ writer
#
# The one writer of the layout. It streams: stories are checked, encoded and appended in blocks of
# `_BLOCK` rows to resizable datasets, so converting a large dataset never holds it in memory; and it is
# atomic (`storyexp.utils.io.atomic_write`): a failed write leaves no file (and no temporary file) behind.
# The converter, the demo generator and the tests all write through it.

_BLOCK = 64  # rows buffered per split before they are appended (and the chunk size of the image datasets)


def _attr_value(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_story(story: Story, path: Path, split: str, index: int) -> None:
    """What every stored story must satisfy: 5 frames of H x W x 3 uint8, 5 captions without '|'."""

    def err(reason: str, field: str) -> StoryDataError:
        return StoryDataError(reason, file=path, split=split, index=index, story_id=story.id, field=field)

    if len(story.frames) != N_FRAMES:
        raise err(f"expected {N_FRAMES} frames, got {len(story.frames)}", "frames")
    if len(story.captions) != N_FRAMES:
        raise err(f"expected {N_FRAMES} captions, got {len(story.captions)}", "captions")
    for j, cap in enumerate(story.captions):
        if not isinstance(cap, str):
            raise err(f"caption {j} is {type(cap).__name__}, not str", "captions")
        if _CAPTION_SEP in cap:
            raise err(f"caption {j} contains the separator '|': {cap!r}", "captions")
    for j, frame in enumerate(story.frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
            raise err(
                f"frame {j} must be an H x W x 3 uint8 RGB array, got {frame.dtype} {list(frame.shape)}",
                f"image{j}",
            )


class SplitWriter:
    """Appends stories to one split group of the layout, :data:`_BLOCK` rows at a time.

    Datasets: ``image0..image4`` (vlen uint8 PNG bytes), the caption dataset (``text_key``, the 5 captions
    joined by ``|``), ``ids`` and, when the stories have labels, ``labels`` ``[N, 5, C]`` float32. Labels are
    all or nothing within a split: the first story decides. Obtained from :meth:`HDF5Writer.split`.
    """

    def __init__(self, group: h5py.Group, path: Path, text_key: str, characters: Sequence[str] | None) -> None:
        self.group, self.path, self.split = group, path, group.name.strip("/")
        self.text_key = text_key
        self.characters = None if characters is None else list(characters)
        self.n = 0  # rows written (flushed or buffered)
        self._flushed = 0
        self._rows: list[tuple[list[np.ndarray], str, str, np.ndarray | None]] = []
        self._has_labels: bool | None = None
        self._n_chars: int | None = None
        self.closed = False
        vlen = h5py.vlen_dtype(np.dtype("uint8"))
        text = h5py.string_dtype("utf-8")
        for j in range(N_FRAMES):
            group.create_dataset(f"image{j}", shape=(0,), maxshape=(None,), dtype=vlen, chunks=(_BLOCK,))
        group.create_dataset(text_key, shape=(0,), maxshape=(None,), dtype=text, chunks=(4 * _BLOCK,))
        group.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=text, chunks=(4 * _BLOCK,))

    def add(self, story: Story, index: int | None = None) -> None:
        """Check and append one story (`index`: its position in the source, for error messages)."""
        if self.closed:
            raise RuntimeError(f"split {self.split!r} of {self.path} is closed")
        index = self.n if index is None else index
        check_story(story, self.path, self.split, index)

        def err(reason: str) -> StoryDataError:
            return StoryDataError(reason, file=self.path, split=self.split, index=index, story_id=story.id,
                                  field="labels")

        labels = None
        if self._has_labels is None:
            self._has_labels = story.labels is not None
        if self._has_labels:
            if story.labels is None:
                raise err("labels missing while other stories of the split have them")
            labels = np.asarray(story.labels, dtype=np.float32)
            if self._n_chars is None:
                self._n_chars = labels.shape[-1] if labels.ndim == 2 else -1
            if labels.ndim != 2 or labels.shape != (N_FRAMES, self._n_chars):
                raise err(f"expected labels of shape [{N_FRAMES}, {self._n_chars}], got {list(labels.shape)}")
            if self.characters is not None and self._n_chars != len(self.characters):
                raise err(f"labels have {self._n_chars} columns but {len(self.characters)} characters are named")
        elif story.labels is not None:
            raise err("labels present while earlier stories of the split have none")
        images = [encode_png(np.asarray(frame)) for frame in story.frames]
        self._rows.append((images, _CAPTION_SEP.join(story.captions), str(story.id), labels))
        self.n += 1
        if len(self._rows) >= _BLOCK:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows to the file."""
        if not self._rows:
            return
        g, a, rows = self.group, self._flushed, self._rows
        b = a + len(rows)
        if self._has_labels and "labels" not in g:
            c = self._n_chars
            g.create_dataset("labels", shape=(0, N_FRAMES, c), maxshape=(None, N_FRAMES, c), dtype=np.float32,
                             chunks=(_BLOCK, N_FRAMES, c))
        for name in g:
            g[name].resize(b, axis=0)
        for j in range(N_FRAMES):
            column = np.empty(len(rows), dtype=object)
            for k, row in enumerate(rows):
                column[k] = row[0][j]
            # write_direct: slice assignment would broadcast equal-length PNG buffers into a 2-D array
            g[f"image{j}"].write_direct(column, dest_sel=np.s_[a:b])
        g[self.text_key][a:b] = np.array([row[1] for row in rows], dtype=object)
        g["ids"][a:b] = np.array([row[2] for row in rows], dtype=object)
        if self._has_labels:
            g["labels"][a:b] = np.stack([row[3] for row in rows])
        self._flushed, self._rows = b, []

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class HDF5Writer:
    """An open story file being written (see :func:`write_hdf5`): one :class:`SplitWriter` per split."""

    def __init__(self, file: h5py.File, path: Path, text_key: str, characters: Sequence[str] | None) -> None:
        self.file, self.path, self.text_key, self.characters = file, path, text_key, characters
        self._open: SplitWriter | None = None

    def split(self, name: str) -> SplitWriter:
        """Start split group `name` (the previous split is finished first)."""
        self.close()
        self._open = SplitWriter(self.file.create_group(name), self.path, self.text_key, self.characters)
        return self._open

    def write_split(self, name: str, stories: Iterable[Story]) -> int:
        """Write a whole split from any iterable (a generator is consumed lazily); returns the count."""
        writer = self.split(name)
        for story in stories:
            writer.add(story)
        writer.close()
        return writer.n

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


def write_hdf5(
    path: str | os.PathLike,
    fill: Callable[[HDF5Writer], None],
    *,
    text_key: str = "text",
    characters: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a story file in the ARLDM layout: ``fill(writer)`` adds the splits and stories.

    Written atomically (a temporary file beside `path`, renamed onto it once `fill` returns; an exception
    from `fill` leaves nothing behind). File attributes: format name/version, ``text_key``, ``characters``
    (JSON list, when given) and every entry of `attrs` (non-scalars JSON-encoded).
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["text_key"] = text_key
            if characters is not None:
                f.attrs["characters"] = json.dumps(list(characters))
            for key, value in (attrs or {}).items():
                f.attrs[key] = _attr_value(value)
            writer = HDF5Writer(f, path, text_key, characters)
            fill(writer)
            writer.close()

    return atomic_write(path, write, mode=0o666 & ~_umask())


def write_stories_hdf5(
    path: str | os.PathLike,
    splits: Mapping[str, Iterable[Story]],
    text_key: str = "text",
    *,
    characters: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{split: stories}`` in the ARLDM HDF5 layout, atomically, streaming (:func:`write_hdf5`).

    The stories of a split may be any iterable, e.g. a generator: they are encoded and appended in blocks,
    never all held at once. Frames are encoded with ``cv2.imencode('.png', rgb)`` exactly like ARLDM's
    converters (channel-swapped on disk), so ARLDM's readers and :class:`HDF5Stories` both get the original
    RGB back. Also written: ``labels`` ``[N, 5, C]`` float32 when the split's stories have labels (all or
    none of them must), ``ids`` (story ids) and the file attributes of :func:`write_hdf5`.

    Raises:
        StoryDataError: a story without exactly 5 frames/captions, a frame that is not ``H x W x 3`` uint8,
            a caption containing ``|``, labels of the wrong shape, or labels on only some stories.
    """

    def fill(writer: HDF5Writer) -> None:
        for split, stories in splits.items():
            writer.write_split(split, stories)

    return write_hdf5(path, fill, text_key=text_key, characters=characters, attrs=attrs)
