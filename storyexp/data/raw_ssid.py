"""Reader of the raw SSID dataset as distributed on IEEE DataPort (no HDF5 conversion needed).

Layout of the root directory::

    <root>/SSID_Annotations/SSID_Train.json  SSID_Validation.json  SSID_Test.json
    <root>/SSID_Images/<youtube_image_id>.jpg

Each annotation file is ``{"annotations": [[a], [a], ...]}``: a list of one-element lists, each holding one
sentence annotation ``a`` with ``storylet_id``, ``storytext``, ``youtube_image_id``, ``album_id``,
``story_id`` and ``image_order``. A story is the :data:`~storyexp.data.story.N_FRAMES` annotations sharing a
``story_id``; several stories may share one album's images, and the annotations of different stories may be
interleaved in the file.

What :class:`SSIDRawStories` yields, one :class:`~storyexp.data.story.Story` per ``story_id``:

* **story order**: order of first appearance of the ``story_id`` in the split file. This is the row order
  of the original converter (``anudeepk17/ARLDM_SSID`` ``data_script/ssid_hdf5.py``), so index ``i`` here
  is row ``i`` of its ``ssid.hdf5``;
* **frame order**: sorted by ``image_order``. *This differs from the original converter*, which keeps the
  annotations in file order and never sorts by ``image_order`` (``reference/arldm.md`` §1.2/§4). Whenever
  a story's annotations are not stored in ``image_order`` order, ``ssid.hdf5`` (and ARLDM_SSID's reader)
  hold its images and sentences in a shuffled order, while this reader returns the story as told. Only the
  relative order of ``image_order`` is used (its base, 0 or 1, does not matter). In the test fixtures
  (``shared/fixtures``) the two orders differ for train stories 5948 (file order ``[3, 2, 5, 4, 1]``) and
  5949 (``[5, 4, 3, 2, 1]``), val story 7002 (``[2, 5, 3, 4, 1]``) and test story 8102
  (``[4, 2, 5, 3, 1]``); they agree for 5947, 6120, 7001 and 8101;
* **captions**: ``storytext`` exactly as stored (no stripping; the original converter removes ``\\n``/``\\t``
  and strips whitespace before writing the HDF5 text);
* **frames**: the JPEGs decoded by Pillow and converted to RGB (greyscale JPEGs become 3 equal channels),
  uint8 ``H x W x 3``, each at its own size (resizing is the data module's ``frame_size`` job);
* **id**: ``str(story_id)``; **labels**: ``None`` (SSID has no character labels).

Errors: a missing root or annotation file raises :class:`FileNotFoundError` (a
:class:`~storyexp.errors.MissingResourceError`); anything wrong inside the data (malformed JSON, a missing
or mistyped field, a story with other than 5 annotations, a duplicated ``image_order``, a missing or
undecodable image) raises :class:`~storyexp.data.story.StoryDataError` naming file, split, story index and
id, and field. Annotation problems are found when the split is opened; image problems when the story is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from storyexp.errors import MissingResourceError

from .registry import DatasetSpec, register
from .story import N_FRAMES, Story, StoryDataError

__all__ = ["SSIDRawStories", "is_ssid_raw", "SSID_SPLIT_FILES", "ANNOTATIONS_DIR", "IMAGES_DIR", "SPEC"]

ANNOTATIONS_DIR = "SSID_Annotations"
IMAGES_DIR = "SSID_Images"
#: Split name -> annotation file name (inside :data:`ANNOTATIONS_DIR`).
SSID_SPLIT_FILES = {"train": "SSID_Train.json", "val": "SSID_Validation.json", "test": "SSID_Test.json"}
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
_FIELDS = ("storytext", "youtube_image_id", "story_id", "image_order")
_LAYOUT_HINT = (
    f"The SSID root should hold {ANNOTATIONS_DIR}/ (with {', '.join(SSID_SPLIT_FILES.values())}) and "
    f"{IMAGES_DIR}/ (<youtube_image_id>.jpg), as in the IEEE DataPort distribution."
)


def is_ssid_raw(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a raw SSID root: a directory holding ``SSID_Annotations/`` with at least one
    ``SSID_{Train,Validation,Test}.json`` and ``SSID_Images/``. Never raises."""
    try:
        root = Path(path).expanduser()
        ann = root / ANNOTATIONS_DIR
        return (
            root.is_dir()
            and (root / IMAGES_DIR).is_dir()
            and ann.is_dir()
            and any((ann / name).is_file() for name in SSID_SPLIT_FILES.values())
        )
    except (OSError, TypeError, ValueError):
        return False


def _normalise_split(split: str) -> str:
    s = str(split).lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in SSID_SPLIT_FILES:
        raise ValueError(f"unknown SSID split {split!r}; expected one of {', '.join(SSID_SPLIT_FILES)}")
    return s


class SSIDRawStories(Sequence):
    """The stories of one split of a raw SSID directory, as a ``Sequence[Story]`` (see the module doc).

    The annotation file is parsed and checked when the instance is built; images are decoded on access.
    Instances hold only plain Python data, so they pickle (DataLoader workers).

    Args:
        root: the SSID root directory (holding ``SSID_Annotations/`` and ``SSID_Images/``).
        split: ``train``, ``val`` (or ``validation``) or ``test``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train") -> None:
        self.root = Path(root).expanduser()
        self.split = _normalise_split(split)
        self.annotation_file = self.root / ANNOTATIONS_DIR / SSID_SPLIT_FILES[self.split]
        self.image_dir = self.root / IMAGES_DIR
        if not self.root.is_dir():
            raise MissingResourceError(
                f"SSID root directory not found: {self.root} (split {self.split!r}). {_LAYOUT_HINT}"
            )
        if not self.annotation_file.is_file():
            raise MissingResourceError(
                f"SSID annotation file for split {self.split!r} not found: {self.annotation_file}. {_LAYOUT_HINT}"
            )
        # Each story: (id, [(image_order, storytext, youtube_image_id), ...] sorted by image_order).
        self._stories: list[tuple[str, list[tuple[int, str, str]]]] = self._load_annotations()

    # -- annotations -----------------------------------------------------------------------------------

    def _err(self, reason: str, *, field: str, index: Any = None, story_id: str | None = None) -> StoryDataError:
        return StoryDataError(
            reason, file=self.annotation_file, split=self.split, index=index, story_id=story_id, field=field
        )

    def _load_annotations(self) -> list[tuple[str, list[tuple[int, str, str]]]]:
        try:
            with open(self.annotation_file, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._err(f"not valid UTF-8 JSON ({e})", field="annotations") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise self._err('expected a JSON object {"annotations": [[{...}], ...]}', field="annotations")

        groups: dict[str, list[tuple[int, str, str]]] = {}  # insertion order = first appearance
        for i, entry in enumerate(doc["annotations"]):
            where = f"annotations[{i}]"
            if isinstance(entry, list) and len(entry) == 1:
                entry = entry[0]
            if not isinstance(entry, dict):
                raise self._err("expected a one-element list holding an annotation object", field=where)
            missing = [k for k in _FIELDS if k not in entry]
            if missing:
                raise self._err(f"annotation lacks {missing}", field=f"{where}.{missing[0]}")
            sid = entry["story_id"]
            if isinstance(sid, bool) or not isinstance(sid, (int, str)) or str(sid) == "":
                raise self._err(f"story_id must be an int or non-empty string, got {sid!r}", field=f"{where}.story_id")
            story_id = str(sid)
            order = entry["image_order"]
            if isinstance(order, bool) or not isinstance(order, int):
                raise self._err(
                    f"image_order must be an int, got {order!r}", field=f"{where}.image_order", story_id=story_id
                )
            text = entry["storytext"]
            if not isinstance(text, str):
                raise self._err(
                    f"storytext must be a string, got {type(text).__name__}",
                    field=f"{where}.storytext",
                    story_id=story_id,
                )
            image_id = entry["youtube_image_id"]
            if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
                raise self._err(
                    f"youtube_image_id must be a string, got {image_id!r}",
                    field=f"{where}.youtube_image_id",
                    story_id=story_id,
                )
            image_id = str(image_id)
            if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", ".."):
                raise self._err(
                    f"youtube_image_id {image_id!r} is not a plain file stem",
                    field=f"{where}.youtube_image_id",
                    story_id=story_id,
                )
            groups.setdefault(story_id, []).append((order, text, image_id))

        stories = []
        for index, (story_id, frames) in enumerate(groups.items()):
            if len(frames) != N_FRAMES:
                raise self._err(
                    f"story has {len(frames)} annotations (image_order {[f[0] for f in frames]}), "
                    f"expected {N_FRAMES}",
                    field="annotations",
                    index=index,
                    story_id=story_id,
                )
            orders = [f[0] for f in frames]
            if len(set(orders)) != len(orders):
                dup = sorted({o for o in orders if orders.count(o) > 1})
                raise self._err(
                    f"duplicated image_order {dup} (image_order in file order: {orders})",
                    field="image_order",
                    index=index,
                    story_id=story_id,
                )
            stories.append((story_id, sorted(frames, key=lambda f: f[0])))
        return stories

    # -- sequence --------------------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        """Story ids in split order (no image is read)."""
        return [sid for sid, _ in self._stories]

    def image_ids(self, index: int) -> list[str]:
        """``youtube_image_id`` of each frame of story ``index``, in ``image_order`` order (no image is read)."""
        return [f[2] for f in self._stories[index][1]]

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self._stories)

    def __getitem__(self, index: int) -> Story:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"story index {index} out of range for SSID split {self.split!r} ({len(self)} stories)")
        story_id, frames = self._stories[i]
        images = []
        for j, (_, _, image_id) in enumerate(frames):
            path = self.image_path(image_id)
            try:
                with Image.open(path) as im:
                    arr = np.array(im.convert("RGB"), dtype=np.uint8)  # writable copy
            except FileNotFoundError as e:
                raise StoryDataError(
                    f"image {image_id!r} not found (expected {path})",
                    file=path, split=self.split, index=i, story_id=story_id, field=f"image{j}",
                ) from e
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise StoryDataError(
                    f"image {image_id!r} cannot be decoded ({e})",
                    file=path, split=self.split, index=i, story_id=story_id, field=f"image{j}",
                ) from e
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
                raise StoryDataError(
                    f"image {image_id!r} decoded to shape {arr.shape}, expected H x W x 3",
                    file=path, split=self.split, index=i, story_id=story_id, field=f"image{j}",
                )
            images.append(np.ascontiguousarray(arr))
        return Story(id=story_id, captions=[f[1] for f in frames], frames=images, labels=None)

    def __repr__(self) -> str:
        return f"SSIDRawStories(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def _open_raw(root: Path, split: str, frame_choice: str = "fixed") -> SSIDRawStories:
    return SSIDRawStories(root, split)  # one image per caption: nothing to choose


SPEC = register(
    DatasetSpec(
        name="ssid",
        title="SSID",
        open_raw=_open_raw,
        is_raw=is_ssid_raw,
        text_key="ssid",  # the caption dataset of ARLDM_SSID's ssid.hdf5
        characters=(),
        download="SSID is distributed on IEEE DataPort (Sequential Storytelling Image Dataset; README.md, "
        "'Datasets'); point the path at the folder holding SSID_Annotations/ and SSID_Images/",
    )
)
