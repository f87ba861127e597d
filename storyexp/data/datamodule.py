"""Lightning data module over story data (HDF5 files in the ARLDM layout or raw folders; the demo set is generated
on first use, in the project's data folder).

Batches are model-agnostic dicts (systems turn them into network inputs)::

    frames   uint8 tensor [B, 5, H, W, 3] (RGB)
    captions list (B) of list (5) of str
    labels   float32 tensor [B, 5, C], or None when the split has no labels
    ids      list (B) of str
    index    int64 tensor [B] (row of the story in its split)
    frame_choice  int64 tensor [B, 5]: per frame, which of its stored candidates was read (the frame of a PororoSV
                  strip / FlintstonesSV clip that ``data.frame_choice`` picked; 0 where a caption has one frame)
    precomputed   dict name -> tensor [B, 5, ...]: the arrays a precomputed file (:mod:`storyexp.data.precomputed`)
                  holds for exactly these frames (only in training batches, once a file is attached with
                  :meth:`StoryDataModule.attach_precomputed`)
    sentence_embeds  float32 tensor [B, 5, D]: the dataset's own per-frame sentence embeddings (only with
                     ``sentence_embeddings=True``; StoryDALL-E's story-block input)

Input pipeline: frames are decoded (PNG from HDF5, PNG/JPEG from raw folders), split, picked and resized in the
dataset's ``__getitem__``, so inside the DataLoader workers when ``num_workers > 0``; :func:`collate_stories` only
stacks arrays. HDF5 readers open their file lazily, once per process (a handle inherited through ``fork`` is never
read), and pickle without a handle. Workers are persistent (``persistent_workers``) when ``num_workers > 0``;
``pin_memory`` is ``auto`` by default: pinned exactly when the batches go to a CUDA device
(:func:`resolve_pin_memory`). ``prefetch_factor`` is PyTorch's default.

Under DDP (``torch.distributed`` initialised with more than one process) the val/test/predict loaders shard
their split with :class:`UnpaddedDistributedSampler`, so every story is scored exactly once; the training
loader gets Lightning's usual (padded, shuffled) ``DistributedSampler``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.utils.cache import data_fingerprint

from .frames import FRAME_FITS, FRAME_RULES, fit_frame
from .hdf5 import HDF5Stories
from .precomputed import PrecomputedArrays
from .registry import DatasetSpec, get_dataset
from .sources import open_split
from .story import N_FRAMES, Story, StoryDataError

__all__ = [
    "StoryDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "StoryItems",
    "UnpaddedDistributedSampler",
    "collate_stories",
    "eval_shard",
    "has_sentence_embeddings",
    "open_split",
    "resolve_pin_memory",
]

TASKS = ("continuation", "visualization")
#: values of ``data.pin_memory``
PIN_MEMORY = ("auto", True, False)


def check_pin_memory(value: Any) -> bool | str:
    """``data.pin_memory`` as given (``auto``, true or false); anything else is a one-line ConfigurationError."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigurationError(f"data.pin_memory={value!r} is not valid: it must be one of auto, true, false "
                             "(auto: pinned exactly when training runs on CUDA).")


def resolve_pin_memory(value: Any, trainer: Any = None) -> bool:
    """What the DataLoaders get for ``data.pin_memory``: true / false as given; ``auto``: true exactly when the batches
    go to a CUDA device -- CUDA is available and, when a Lightning trainer is attached, its accelerator is CUDA (a
    CPU run on a GPU machine pins nothing). Without a trainer (a data module used stand-alone, task=benchmark),
    ``auto`` is whether CUDA is available."""
    value = check_pin_memory(value)
    if isinstance(value, bool):
        return value
    if not torch.cuda.is_available():
        return False
    accelerator = getattr(trainer, "accelerator", None) if trainer is not None else None
    if accelerator is None:
        return True
    from lightning.pytorch.accelerators import CUDAAccelerator

    return isinstance(accelerator, CUDAAccelerator)


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards a dataset over processes without padding: rank ``r`` of ``w`` gets ``indices[r::w]``, in order.

    The union of the shards is every index exactly once, so an evaluation under DDP scores each story once
    (PyTorch's ``DistributedSampler`` pads the last shard by repeating stories; Lightning injects that one
    unless a loader already has a ``DistributedSampler``, which this is). Shards differ in length by at most
    one; a shard may be empty when there are fewer items than processes. Never shuffles.

    Lightning's ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` yields the same
    shards but asserts that every process gets at least one item, so it cannot express a split with fewer
    stories than processes; :class:`StoryDataModule` refuses such a split with a message instead.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(self.dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableSampler(DistributedSampler):
    """The training order: ``DistributedSampler``'s shuffled, padded shard per epoch (a permutation drawn from
    ``seed + epoch``), which can start ``start`` items into the shard -- where an interrupted run stopped.

    It is a ``DistributedSampler`` so Lightning keeps it (and calls ``set_epoch``) instead of injecting its own;
    on one process it is the whole permutation. ``start`` applies to the next iteration only.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self.start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(list(super().__iter__())[start:])


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch: Lightning saves ``state_dict()`` in every checkpoint (the epoch
    and how many batches of it were handed out) and gives it back to ``load_state_dict`` on resume; the next
    iteration of that epoch then skips those batches, so a resumed run trains on the batches the interrupted one
    had not seen, in the same order. (torchdata's StatefulDataLoader does this too, with a dependency this
    needs no more of: Lightning does not prefetch from a loader with a length, so the count is exact.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed_out = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        sampler = self.sampler
        skip = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            if state.get("epoch") == sampler.epoch and 0 < int(state.get("batches", 0)) < len(self):
                skip = int(state["batches"])
        sampler.start = skip * int(self.batch_size)
        self._handed_out = skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._handed_out)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume = dict(state)


PREDICT = "predict"  # the stories given to `predict_on`


def eval_shard() -> tuple[int, int] | None:
    """``(world_size, rank)`` when ``torch.distributed`` is initialised with more than one process, else ``None``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = int(dist.get_world_size())
    return (world_size, int(dist.get_rank())) if world_size > 1 else None


class _Head(Sequence):
    """The first ``n`` items of a sequence (a view; keeps the base's lazy file handling)."""

    def __init__(self, base: Sequence, n: int) -> None:
        self.base = base
        self.n = min(int(n), len(base))

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i

    def __getitem__(self, i: int):  # type: ignore[override]
        return self.base[self._index(i)]

    def sentence_embeddings(self, i: int) -> np.ndarray:
        """The base reader's sentence embeddings of story `i` (within the head)."""
        return self.base.sentence_embeddings(self._index(i))

    def read_story(self, i: int) -> tuple[Story, tuple[int, ...]]:
        return read_story(self.base, self._index(i))

    def story_candidates(self, i: int) -> tuple[str, list[list[np.ndarray]]]:
        return story_candidates(self.base, self._index(i))


def read_story(stories: Sequence[Story], i: int) -> tuple[Story, tuple[int, ...]]:
    """Story `i` and the candidate index picked per frame (readers storing one frame per caption: all 0)."""
    read = getattr(stories, "read_story", None)
    if callable(read):
        return read(i)
    story = stories[i]
    return story, (0,) * len(story.frames)


def story_candidates(stories: Sequence[Story], i: int) -> tuple[str, list[list[np.ndarray]]]:
    """``(story id, [5][k_j] frames)``: every frame `data.frame_choice` may pick for each position of story `i`."""
    if isinstance(stories, _Head):
        return stories.story_candidates(i)
    candidates, story_id = getattr(stories, "frame_candidates", None), getattr(stories, "story_id", None)
    if callable(candidates) and callable(story_id):
        return story_id(i), candidates(i)
    story = stories[i]
    return story.id, [[f] for f in story.frames]


class _AllCandidates(Sequence):
    """A split's stories with every candidate frame in `frames` (a fingerprint that `frame_choice=random` keeps)."""

    def __init__(self, stories: Sequence[Story]) -> None:
        self.stories = stories

    def __len__(self) -> int:
        return len(self.stories)

    def __getitem__(self, i: int) -> Story:  # type: ignore[override]
        story = self.stories[i]
        _, candidates = story_candidates(self.stories, i)
        # a new record: a reader that keeps its stories in memory must not see its frames replaced
        return Story(story.id, list(story.captions), [f for options in candidates for f in options], story.labels)


def _reader(stories: Sequence) -> Sequence:
    """The dataset reader behind any :class:`_Head` views."""
    while isinstance(stories, _Head):
        stories = stories.base
    return stories


def has_sentence_embeddings(stories: Sequence) -> bool:
    """Whether the reader behind `stories` ships per-frame sentence embeddings (``sentence_embeddings(i)``).

    Only StoryDALL-E's raw PororoSV and FlintstonesSV archives do; the HDF5 layout, SSID and the demo do not.
    """
    return callable(getattr(_reader(stories), "sentence_embeddings", None))


class StoryItems(Dataset):
    """Map-style torch dataset: story ``i`` as a dict of numpy data (collated by :func:`collate_stories`).

    With ``sentence_embeddings=True`` each item also holds ``"sentence_embeds"``, float32 ``[5, D]`` from the
    reader's ``sentence_embeddings(i)``; a reader without them is a :class:`ConfigurationError` here, when the
    dataset is built, rather than in the first batch.
    """

    def __init__(
        self, stories: Sequence[Story], frame_size: int | None = None, sentence_embeddings: bool = False,
        frame_fit: str = "squash",
    ) -> None:
        self.stories = stories
        self.precomputed: PrecomputedArrays | None = None  # attached by StoryDataModule.attach_precomputed
        self.frame_size = None if frame_size is None else int(frame_size)
        if frame_fit not in FRAME_FITS:
            raise ConfigurationError(f"data.frame_fit={frame_fit!r} is not valid: it must be one of {FRAME_FITS}")
        self.frame_fit = frame_fit
        self.sentence_embeddings = bool(sentence_embeddings)
        if self.sentence_embeddings and not has_sentence_embeddings(stories):
            raise ConfigurationError(
                f"{type(_reader(stories)).__name__} ships no per-frame sentence embeddings; "
                "compute them from the captions with a sentence encoder instead"
            )

    def __len__(self) -> int:
        return len(self.stories)

    def _fit(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        if self.frame_size is None:
            return list(frames)
        return [fit_frame(f, self.frame_size, self.frame_fit) for f in frames]

    def __getitem__(self, index: int) -> dict[str, Any]:
        story, choice = read_story(self.stories, index)
        item = {
            "frames": self._fit(story.frames),
            "captions": list(story.captions),
            "labels": story.labels,
            "id": story.id,
            "index": int(index),
            "frame_choice": choice,
        }
        if self.sentence_embeddings:
            item["sentence_embeds"] = self._sentence_embeds(index, story)
        if self.precomputed is not None:
            item["precomputed"] = self.precomputed.arrays(index, story.id, choice)
        return item

    def candidates(self, index: int) -> tuple[str, list[list[np.ndarray]]]:
        """``(story id, [5][k_j] frames)``: every frame story `index` may be read with, resized as items are."""
        story_id, candidates = story_candidates(self.stories, index)
        return story_id, [self._fit(options) for options in candidates]

    def _sentence_embeds(self, index: int, story: Story) -> np.ndarray:
        emb = np.asarray(self.stories.sentence_embeddings(index), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(story.frames):
            reader = _reader(self.stories)
            raise StoryDataError(
                f"sentence embeddings have shape {list(emb.shape)}, expected [{len(story.frames)}, dim] "
                "(one row per frame)",
                file=getattr(reader, "root", None),
                split=getattr(reader, "split", None),
                index=int(index),
                story_id=story.id,
                field="sentence_embeds",
            )
        return emb


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
    batch = {
        "frames": frames,
        "captions": [it["captions"] for it in items],
        "labels": labels,
        "ids": [it["id"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if all("frame_choice" in it for it in items):
        batch["frame_choice"] = torch.tensor([list(it["frame_choice"]) for it in items], dtype=torch.long)
    embeds = _collate_sentence_embeds(items)
    if embeds is not None:
        batch["sentence_embeds"] = embeds
    precomputed = _collate_precomputed(items)
    if precomputed is not None:
        batch["precomputed"] = precomputed
    return batch


def _collate_precomputed(items: list[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
    """``{name: [B, 5, ...]}`` when every item has precomputed arrays, None when none has."""
    have = [it for it in items if "precomputed" in it]
    if not have:
        return None
    if len(have) != len(items):
        missing = [it["id"] for it in items if "precomputed" not in it]
        raise ValueError(f"some stories in the batch have precomputed arrays and some do not (without: {missing})")
    names = have[0]["precomputed"]
    return {name: torch.from_numpy(np.stack([it["precomputed"][name] for it in items])) for name in names}


def _collate_sentence_embeds(items: list[dict[str, Any]]) -> torch.Tensor | None:
    """float32 ``[B, 5, D]`` when every item has ``sentence_embeds``, ``None`` when none has."""
    have = [it for it in items if "sentence_embeds" in it]
    if not have:
        return None
    if len(have) != len(items):
        missing = [it["id"] for it in items if "sentence_embeds" not in it]
        raise ValueError(f"some stories in the batch have sentence embeddings and some do not (without: {missing})")
    shapes = sorted({tuple(np.shape(it["sentence_embeds"])) for it in items})
    if len(shapes) > 1:
        raise ValueError(f"sentence embeddings of different shapes cannot be stacked into one batch: {shapes}")
    return torch.from_numpy(np.stack([np.asarray(it["sentence_embeds"], dtype=np.float32) for it in items]))


class StoryDataModule(L.LightningDataModule):
    """Train/val/test story loaders over one dataset (an HDF5 file or the raw folder as distributed).

    Args:
        name: a registered dataset (:func:`storyexp.data.registry.known_datasets`: ``demo``, ``pororo``,
            ``flintstones``, ``ssid``, ...); anything else is a :class:`ConfigurationError`.
        path: the HDF5 file or raw folder. For a dataset the project generates (``demo``), ``None`` means
            `generated_path`; any other path is read as it is and must exist (it is never generated).
        generated_path: generated datasets only: the one place the set is generated, in the project's data
            folder (``storyexp/conf/data/demo.yaml``: ``${paths.data_dir}/demo/...``). When `path` is this path (the
            default), the set is generated there (rank 0, in ``prepare_data``) when absent or generated with
            other parameters.
        task: ``continuation`` | ``visualization`` (metadata for the systems; the data is the same).
        characters: character names in label order (empty for datasets without labels).
        batch_size: GLOBAL batch size, split evenly over ``trainer.world_size`` processes in ``setup``.
        num_workers: DataLoader workers per process (``persistent_workers`` when > 0).
        limit_train, limit_val, limit_test: use only the first N stories of a split.
        test_split: split used by ``test_dataloader`` / ``predict_dataloader``.
        missing_hint: where to get the dataset / how to convert it, shown when the file is missing.
        demo: generation parameters of a generated dataset (demo: ``{seed, n_train, n_val, n_test, resolution}``).
        frame_size: resize every frame to ``frame_size x frame_size`` (cv2 ``INTER_AREA``); ``None`` keeps
            stored sizes (a batch with frames of different sizes is then an error).
        frame_fit: how a non-square frame reaches ``frame_size``: ``squash`` (both sides resized, the default) or
            ``center_crop`` (shorter side resized, central square kept: the SSID/VIST readers' Resize + CenterCrop,
            :mod:`storyexp.data.frames`).
        text_key: caption dataset name; ``None`` auto-detects.
        train_split, val_split: group names of the training and validation splits.
        pin_memory: ``auto`` (the data configs' default), true or false: page-locked batches, so the host-to-device
            copy is asynchronous. ``auto`` resolves when the loaders are built (:func:`resolve_pin_memory`): true
            exactly when the attached trainer runs on CUDA (no trainer: when CUDA is available).
        sentence_embeddings: add ``batch["sentence_embeds"]`` (float32 ``[B, 5, D]``), the per-frame sentence
            embeddings the dataset ships (StoryDALL-E's story-block input: the 512-d USE vectors of its raw
            PororoSV and FlintstonesSV archives). Only those raw readers have them; any other source (HDF5
            files, SSID, the demo) is a :class:`~storyexp.errors.ConfigurationError` in ``setup``: compute the
            embeddings from the captions with ``model.sentence_encoder`` instead. Default ``False`` (no key).
        precompute: train on precomputed inputs: the outputs of the model's frozen encoders for every candidate
            frame of the training split, computed once into a file (``task=precompute``, or on the first training
            run) and attached to training batches as ``batch["precomputed"]``. This module only holds the setting
            and reads the file (:meth:`attach_precomputed`); the system computes the arrays and keys the file
            (``storyexp.systems.frozen_inputs``). Validation and test keep encoding live.
        precompute_path: an explicit file to use (written there when missing; one whose record differs from this
            model / data is refused); ``None``: a file named by its key in `precompute_dir`.
        precompute_dir: the shared folder of keyed precomputed files (a limited training split writes into the run's
            output folder instead).
    """

    def __init__(
        self,
        name: str,
        path: str | os.PathLike | None = None,
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
        frame_fit: str = "squash",
        text_key: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        pin_memory: bool | str = "auto",
        max_length: int | None = None,
        vocabulary: Sequence[str] | None = None,
        character_tokens: Sequence[str] | None = None,
        frame_choice: Mapping[str, str] | None = None,
        sentence_embeddings: bool = False,
        generated_path: str | os.PathLike | None = None,
        shuffle_seed: int | None = None,
        precompute: bool = False,
        precompute_path: str | os.PathLike | None = None,
        precompute_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.precompute = bool(precompute)
        self.precompute_path = None if precompute_path is None else Path(precompute_path).expanduser()
        self.precompute_dir = None if precompute_dir is None else Path(precompute_dir).expanduser()
        # the training order's seed; None: the run's `seed` (seed_everything's PL_GLOBAL_SEED), else 0
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        spec = get_dataset(name)  # an unknown name: ConfigurationError listing the known ones
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for key, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{key} must be >= 0 or None, got {value}")
        self.name = name
        self.generated_path = None
        if spec.generator is not None and generated_path is not None:
            self.generated_path = Path(generated_path).expanduser()
        if path is None:
            if self.generated_path is None:
                raise ConfigurationError(f"data.path is required for the {name} dataset (an HDF5 file or raw folder)")
            path = self.generated_path
        self.path = Path(path).expanduser()
        # generate only into the project's data folder: never at a path the user typed
        self.generates = self.generated_path is not None and _same_path(self.path, self.generated_path)
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
        if frame_fit not in FRAME_FITS:
            raise ConfigurationError(f"data.frame_fit={frame_fit!r} is not valid: it must be one of {FRAME_FITS}")
        self.frame_fit = frame_fit
        self.text_key = text_key
        self.pin_memory = check_pin_memory(pin_memory)  # auto | true | false, resolved per loader (loader_pin_memory)
        self.sentence_embeddings = bool(sentence_embeddings)
        self.sentence_embedding_dim: int | None = None  # D, known once a split is set up
        # where a raw source stores several frames per caption: random in training, fixed for val/test
        self.frame_choice = {"train": "random", "eval": "fixed", **dict(frame_choice or {})}
        unknown = sorted(set(self.frame_choice.values()) - set(FRAME_RULES))
        if unknown or set(self.frame_choice) != {"train", "eval"}:
            raise ValueError(f"frame_choice must map train/eval to one of {FRAME_RULES}, got {self.frame_choice}")
        # caption facts the model config reads (`${data.max_length}`, `${data.vocabulary}`,
        # `${data.character_tokens}`: the order the names join the tokenizers); unused here
        self.max_length = max_length
        self.vocabulary = list(vocabulary or [])
        self.character_tokens = [str(c) for c in (characters if character_tokens is None else character_tokens)]
        self.demo = spec.generator.params(demo) if spec.generator is not None else None
        self.datasets: dict[str, StoryItems] = {}
        self.save_hyperparameters(
            {
                "name": name,
                "path": str(self.path),
                "task": task,
                "characters": self.characters,
                "batch_size": self.batch_size,
                "frame_size": self.frame_size,
                "frame_fit": self.frame_fit,
                "demo": self.demo,
                "sentence_embeddings": self.sentence_embeddings,
            },
            logger=False,  # its `task` (continuation) would overwrite the config's (train): tasks/common.py logs that
        )

    @property
    def spec(self) -> DatasetSpec:
        """The registry entry of this dataset (looked up, not stored: the module pickles without it)."""
        return get_dataset(self.name)

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    # -- lifecycle -------------------------------------------------------------------------------------

    def _require_given_file(self) -> None:
        """A generated dataset at a path of the user's own: it must exist (nothing is generated there)."""
        if self.spec.generator is None or self.generates or self.path.exists():
            return
        where = (f"remove data.path to generate the {self.name} set in {self.generated_path}"
                 if self.generated_path is not None else f"leave data.path unset to generate the {self.name} set")
        raise MissingResourceError(
            f"{self.name} dataset file not found: {self.path} does not exist, and the {self.name} set is only "
            f"generated at its default path in the data folder; {where}, or point it at an existing file"
        )

    def check_available(self) -> None:
        """Fail early, before a model is built, when the dataset is missing (a generated set is made later)."""
        if self.generates:
            return
        self._require_given_file()
        open_split(self.name, self.path, self.train_split, text_key=self.text_key, missing_hint=self.missing_hint)

    def prepare_data(self) -> None:
        """Generate the set if it is generated here (Lightning calls this on one process per node only)."""
        if self.generates:
            self.spec.generator.ensure(self.path, **self.demo)

    def setup(self, stage: str | None = None) -> None:
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise ConfigurationError(
                f"data.batch_size={self.batch_size} (the global batch) is not divisible by the {world_size} "
                f"processes: choose a multiple of {world_size}"
            )
        self.per_device_batch_size = self.batch_size // world_size
        if self.trainer is None and self.generates:
            self.prepare_data()  # used stand-alone: nobody else will
        self._require_given_file()
        generator = self.spec.generator
        if generator is not None and self.path.is_file():
            generator.check(self.path, **self.demo)
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
        if self.sentence_embeddings:
            self._check_sentence_embeddings(stories, split)
        limit = self._limit_for(split)
        if limit is not None:
            stories = _Head(stories, limit)
        return StoryItems(stories, frame_size=self.frame_size, frame_fit=self.frame_fit,
                          sentence_embeddings=self.sentence_embeddings)

    def _check_sentence_embeddings(self, stories: Sequence[Story], split: str) -> None:
        """Fail in ``setup``, before any batch: the source must ship embeddings, readable and of one size.

        Reading story 0's embeddings also loads the reader's embedding file once in this process (forked
        DataLoader workers then share it), and reports a missing or malformed file with its path.
        """
        if not has_sentence_embeddings(stories):
            if isinstance(stories, HDF5Stories):
                source = "generated HDF5 file" if self.spec.generator is not None else "HDF5 file (AR-LDM layout)"
            else:
                source = f"raw folder ({type(stories).__name__})"
            raise ConfigurationError(
                f"data.sentence_embeddings=true, but the {self.name} {source} at {self.path} ships no per-frame "
                "sentence embeddings (only StoryDALL-E's raw PororoSV and FlintstonesSV folders do). Set "
                "data.sentence_embeddings=false and compute them from the captions with "
                "model.sentence_encoder.kind=hashing (weight-free) or model.sentence_encoder.kind=transformers "
                "(a sentence-transformers model folder)."
            )
        if len(stories) == 0:
            return
        emb = np.asarray(stories.sentence_embeddings(0))
        if emb.ndim != 2 or emb.shape[0] != N_FRAMES:
            raise StoryDataError(
                f"sentence embeddings have shape {list(emb.shape)}, expected [{N_FRAMES}, dim]",
                file=self.path, split=split, index=0, field="sentence_embeds",
            )
        if self.sentence_embedding_dim is not None and emb.shape[1] != self.sentence_embedding_dim:
            raise StoryDataError(
                f"sentence embeddings are {emb.shape[1]}-d here but {self.sentence_embedding_dim}-d in another split",
                file=self.path, split=split, index=0, field="sentence_embeds",
            )
        self.sentence_embedding_dim = int(emb.shape[1])

    def _check_characters(self, stories: Sequence[Story]) -> None:
        if isinstance(stories, HDF5Stories):  # raw readers take their label order from the layout
            named = stories.characters
            if named is not None and self.characters and named != self.characters:
                raise StoryDataError(
                    f"file names characters {named} but the data config lists {self.characters} "
                    "(label columns would be misread)",
                    file=stories.path,
                    split=stories.split,
                    field="characters",
                )
            if (stories.n_characters is not None and self.characters
                    and stories.n_characters != len(self.characters)):
                raise StoryDataError(
                    f"labels have {stories.n_characters} columns but the data config lists "
                    f"{len(self.characters)} characters ({self.characters})",
                    file=stories.path,
                    split=stories.split,
                    field="labels",
                )
        fixed = list(self.spec.characters)  # the label order of the dataset's own layout
        if fixed and self.characters and self.characters != fixed:
            raise ConfigurationError(
                f"{self.name} characters must be {fixed} (in this order, the dataset's label order), "
                f"got {self.characters}"
            )

    # -- loaders -----------------------------------------------------------------------------------------

    def _dataset(self, split: str) -> StoryItems:
        if split not in self.datasets:
            self.datasets[split] = self._build(split)
        return self.datasets[split]

    @property
    def loader_pin_memory(self) -> bool:
        """``pin_memory`` as the DataLoaders get it (``auto`` resolved against the attached trainer)."""
        return resolve_pin_memory(self.pin_memory, getattr(self, "trainer", None))

    def _loader(self, split: str, shuffle: bool, sampler: DistributedSampler | None = None,
                dataset: StoryItems | None = None) -> DataLoader:
        return DataLoader(
            self._dataset(split) if dataset is None else dataset,
            batch_size=self.per_device_batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.loader_pin_memory,
            collate_fn=collate_stories,
            drop_last=False,
        )

    def _eval_loader(self, split: str, dataset: StoryItems | None = None) -> DataLoader:
        """A val/test/predict loader: under DDP, sharded so that every story is scored exactly once."""
        dataset = self._dataset(split) if dataset is None else dataset
        shard = eval_shard()
        if shard is None:
            return self._loader(split, shuffle=False, dataset=dataset)
        world_size, rank = shard
        if 0 < len(dataset) < world_size:  # a process without a batch would wait forever at the epoch's end
            raise ConfigurationError(
                f"the {self.name} {split!r} split has {len(dataset)} stories but {world_size} processes need at "
                f"least one each (every story is scored exactly once under DDP); use at most {len(dataset)} "
                "devices or more stories (data.limit_val / data.limit_test)"
            )
        return self._loader(split, shuffle=False, dataset=dataset,
                            sampler=UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=rank))

    def subset_loader(self, split: str, n: int | None) -> DataLoader:
        """The first ``n`` stories of a split (all with None) as an eval loader: a fixed subset, e.g. for metrics
        during training, sharded without padding under DDP."""
        dataset = self._dataset(split)
        if n is not None and int(n) < len(dataset):
            dataset = StoryItems(_Head(dataset.stories, int(n)), frame_size=self.frame_size, frame_fit=self.frame_fit,
                                 sentence_embeddings=dataset.sentence_embeddings)
        return self._eval_loader(split, dataset)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the run's seed, sharded (padded) under DDP, resumable mid-epoch
        (:class:`ResumableLoader`)."""
        dataset = self._dataset(self.train_split)
        world_size, rank = eval_shard() or (1, 0)
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return ResumableLoader(
            dataset,
            batch_size=self.per_device_batch_size,
            sampler=ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.loader_pin_memory,
            collate_fn=collate_stories,
            drop_last=False,
            # the iterator draws its workers' base seed from this, not from the global RNG: creating the
            # iterator of a resumed epoch must not shift the draws the training step makes
            generator=torch.Generator().manual_seed(seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_split)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(PREDICT if PREDICT in self.datasets else self.test_split)

    def predict_on(self, stories: Sequence[Story]) -> None:
        """Make `predict_dataloader` serve these stories (task=sample: the user's captions, or the first stories
        of a split), with this data module's batch size, workers and DDP sharding."""
        embeds = self.sentence_embeddings and has_sentence_embeddings(stories)
        self.datasets[PREDICT] = StoryItems(stories, frame_size=self.frame_size, frame_fit=self.frame_fit,
                                             sentence_embeddings=embeds)

    def first_stories(self, split: str, n: int | None) -> Sequence[Story]:
        """The first `n` stories of a split (all with None), sentence embeddings kept."""
        stories = self.stories(split)
        return stories if n is None or int(n) >= len(stories) else _Head(stories, int(n))

    def stories(self, split: str) -> Sequence[Story]:
        """The (limited) ``Story`` sequence of a split, e.g. for sampling or metrics."""
        return self._dataset(split).stories

    def fingerprint_stories(self, split: str) -> Sequence[Story]:
        """`stories(split)` with every candidate frame of each story in `frames`: what cache fingerprints read
        (`storyexp.utils.cache.data_fingerprint`), the same on every call whatever `frame_choice` picks."""
        return _AllCandidates(self.stories(split))

    # -- precomputed inputs ---------------------------------------------------------------------------------

    def candidate_frames(self, split: str, index: int) -> tuple[str, list[list[np.ndarray]]]:
        """``(story id, [5][k_j] uint8 frames)``: every frame story `index` of `split` may be read with, resized by
        ``frame_size`` / ``frame_fit`` exactly as batches are (what a precomputed file holds rows for)."""
        return self._dataset(split).candidates(index)

    def candidates_fingerprint(self, split: str, samples: int = 8) -> dict[str, Any]:
        """`storyexp.utils.cache.data_fingerprint` of `split` over every candidate frame (not the randomly picked
        one: the same on every call), with the frame geometry batches get. NumPy's global generator is left as it
        was, so computing the key does not move the random frame choice of the training run."""
        view = _FingerprintView(self.name, self.path, self.fingerprint_stories(split), self._limit_for(split))
        fingerprint = data_fingerprint(view, splits=("train",), samples=samples)  # leaves NumPy's generator as it was
        fingerprint["split"] = split
        fingerprint["frame_size"] = self.frame_size
        fingerprint["frame_fit"] = self.frame_fit
        return fingerprint

    def attach_precomputed(self, path: str | os.PathLike) -> PrecomputedArrays:
        """Training batches (the training split only) carry the arrays of the precomputed file at `path`
        (``batch["precomputed"]``); validation and test keep the live frames only."""
        arrays = PrecomputedArrays(path)
        dataset = self._dataset(self.train_split)
        if len(arrays) != len(dataset):
            raise ConfigurationError(
                f"precomputed file {path} holds {len(arrays)} stories but the {self.name} {self.train_split!r} split "
                f"has {len(dataset)}: recompute it (task=precompute) or drop data.precompute_path"
            )
        dataset.precomputed = arrays
        return arrays

    def detach_precomputed(self) -> None:
        """Training batches without precomputed arrays again (live encoding)."""
        if self.train_split in self.datasets:
            self.datasets[self.train_split].precomputed = None


class _FingerprintView:
    """What `data_fingerprint` reads of a data module, for one split under the name ``train``."""

    def __init__(self, name: str, path: Path, stories: Sequence[Story], limit: int | None) -> None:
        self.name, self.path, self._stories = name, path, stories
        self.limits = {"train": limit}
        self.train_split = "train"

    def stories(self, split: str) -> Sequence[Story]:
        return self._stories


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve()
