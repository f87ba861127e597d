"""Precomputed frozen inputs: what a system's frozen encoders make of the training frames, computed once, reused.

A system that offers this implements two methods (no system imports another; this helper is shared):

    frozen_inputs(frames uint8 [B, F, H, W, 3]) -> {name: tensor [B, F, ...]}   the frozen encoders' outputs
    frozen_key() -> dict   what those outputs depend on besides the data: system, arrays, image size, input range,
                           and the sha256 of the frozen encoder's tensors as built (`module_sha256`: covers
                           pretrained files and a seeded random init alike)

(an encoder of the captions too adds ``frozen_inputs_need_captions() -> bool``: when true, `frozen_inputs` also gets
``captions=`` [B][F], each frame's caption, i.e. its position's, shared by that position's candidate frames)
and reads ``batch["precomputed"]`` in its loss instead of running the encoder (StoryDALL-E: stage-1 VQGAN codes of
both backbones; AR-LDM: the VAE posterior's mean and std, so the per-story eps still draws the same latents, and the
states of CLIP / BLIP when they are wholly frozen).

The file (:mod:`storyexp.data.precomputed`) holds a row per (story, position, candidate frame) of the training
split; its record (`storyexp.utils.cache.make_record`) is ``{kind: precomputed_inputs, config: frozen_key(),
data: the split's candidate fingerprint (data, split, frame_size, frame_fit)}``. The default file is
``data.precompute_dir / <system>_<16 hex of the record>.h5``, so another key is another file; a limited training
split (``data.limit_train``) uses ``<run output>/<that name>`` instead (never the shared folder). An explicit
``data.precompute_path`` is written when missing and refused (one line) when its record differs.

Training (``data.precompute=true``): `use_precomputed` runs in the system's ``on_fit_start`` (the model is on its
device and in its precision by then): rank 0 computes the file if it is missing or stale, every process waits at
the strategy barrier, then all attach it to the training split. ``task=precompute`` calls `ensure_precomputed`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storyexp.data.precomputed import read_record, write_precomputed
from storyexp.errors import ConfigurationError
from storyexp.utils.cache import cache_path, make_record, matches
from storyexp.utils.fingerprints import tensors_sha256

log = logging.getLogger(__name__)

KIND = "precomputed_inputs"
STORIES_PER_PASS = 8  # stories whose candidate frames go through the encoder together


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module as built: its class tree, plain attributes (e.g. a parameter-free encoder's factor) and
    every parameter / buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        simple = {k: v for k, v in vars(sub).items()
                  if k != "training" and not k.startswith("_") and isinstance(v, (bool, int, float, str))}
        h.update(f"{name}:{type(sub).__name__}:{json.dumps(simple, sort_keys=True)}|".encode())
    h.update(tensors_sha256(module.state_dict().items()).encode())  # the lean checkpoints' hash of the tensors
    return h.hexdigest()


def precompute_record(system: Any, datamodule: Any, split: str | None = None) -> dict[str, Any]:
    """The record a precomputed file of `system` on `datamodule`'s `split` (default: training) must carry."""
    split = split or datamodule.train_split
    return make_record(KIND, config=system.frozen_key(), data=datamodule.candidates_fingerprint(split))


def record_digest(record: dict[str, Any]) -> str:
    """16 hex digits of a record's config and data (the ``path`` of the data left out: the same data elsewhere)."""
    data = {k: v for k, v in record["data"].items() if k != "path"}
    text = json.dumps({"config": record["config"], "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def precompute_path(record: dict[str, Any], datamodule: Any, output_dir: str | Path | None) -> tuple[Path, bool]:
    """``(file, explicit)``: ``data.precompute_path`` when set, else the keyed file in ``data.precompute_dir`` (or
    in the run's output folder when the training split is limited)."""
    if datamodule.precompute_path is not None:
        return Path(datamodule.precompute_path), True
    name = f"{record['config']['system']}_{record_digest(record)}.h5"
    if datamodule.precompute_dir is None:
        if output_dir is None:
            raise ConfigurationError("data.precompute_dir is not set: set it (storyexp/conf/data/*.yaml: "
                                     "${paths.data_dir}/precomputed) or give data.precompute_path")
        return Path(output_dir) / name, False
    return cache_path(Path(datamodule.precompute_dir) / name, record["data"], output_dir), False


def _checked(path: Path, record: dict[str, Any], explicit: bool) -> tuple[bool, str]:
    """Whether the file at `path` was made for `record`; an explicit file made for another is refused."""
    have = read_record(path)
    ok, why = matches(have, record)
    if not ok and explicit and path.exists():
        raise ConfigurationError(
            f"data.precompute_path={path} was computed for another model or data ({why}): delete it to recompute "
            "it there, or unset data.precompute_path to use a keyed file in data.precompute_dir"
        )
    return ok, why


def ensure_precomputed(system: Any, datamodule: Any, output_dir: str | Path | None, *, force: bool = False
                       ) -> tuple[Path, bool]:
    """``(file, computed)``: the training split's precomputed file, computed (and written atomically) when missing,
    stale or `force`. Call on one process only (rank 0); the others wait, then `attach`."""
    record = precompute_record(system, datamodule)
    path, explicit = precompute_path(record, datamodule, output_dir)
    ok, why = _checked(path, record, explicit)
    if ok and not force:
        return path, False
    if path.exists():
        log.info("recomputing precomputed inputs %s: %s", path, why or "forced")
    compute_precomputed(system, datamodule, datamodule.train_split, path, record)
    return path, True


def attach(system: Any, datamodule: Any, output_dir: str | Path | None) -> Path:
    """Attach the training split's (existing, matching) precomputed file to the data module's training batches."""
    record = precompute_record(system, datamodule)
    path, explicit = precompute_path(record, datamodule, output_dir)
    ok, why = _checked(path, record, explicit)
    if not ok:
        raise ConfigurationError(f"precomputed inputs {path} cannot be used ({why}): run task=precompute with the "
                                 "same model and data, or set data.precompute=false")
    datamodule.attach_precomputed(path)
    return path


def use_precomputed(system: Any) -> Path | None:
    """A system's ``on_fit_start``: with ``data.precompute=true``, compute the file on rank 0 when needed, wait at
    the strategy barrier, then attach it on every process. None (live encoding) when the option is off."""
    trainer = system.trainer
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not getattr(datamodule, "precompute", False):
        return None
    output_dir = trainer.default_root_dir
    if trainer.is_global_zero:
        ensure_precomputed(system, datamodule, output_dir)
    trainer.strategy.barrier("storyexp_precompute")
    return attach(system, datamodule, output_dir)


# ------------------------------------------------------------------------------------------------- computing


def _story_rows(datamodule: Any, split: str, n: int, captions: bool = False
                ) -> Iterator[tuple[str, list[int], list[np.ndarray], list[str] | None]]:
    """Per story: id, candidates per position, every candidate frame and (when `captions`) each one's caption (its
    position's)."""
    stories = datamodule.stories(split) if captions else None
    for i in range(n):
        story_id, candidates = datamodule.candidate_frames(split, i)
        texts = None
        if stories is not None:
            story = stories[i]
            if story.id != story_id or len(story.captions) != len(candidates):
                raise ConfigurationError(f"story {i} of the {split!r} split reads as {story.id!r} with "
                                         f"{len(story.captions)} captions, its candidate frames as {story_id!r} with "
                                         f"{len(candidates)} positions")
            texts = [str(c) for c, options in zip(story.captions, candidates) for _ in options]
        yield story_id, [len(c) for c in candidates], [f for options in candidates for f in options], texts


def _passes(rows: Iterator[tuple[str, list[int], list[np.ndarray]]], size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def _encode_pass(system: Any, chunk: list[tuple[str, list[int], list[np.ndarray], list[str] | None]]):
    """One encoder pass over every candidate frame of a few stories; yields each story's rows."""
    frames = [f for _, _, story_frames, _ in chunk for f in story_frames]
    shapes = sorted({f.shape for f in frames})
    if len(shapes) > 1:
        raise ConfigurationError(f"candidate frames of different sizes {shapes[:3]} cannot be encoded together: "
                                 "set data.frame_size")
    batch = torch.from_numpy(np.stack(frames))[None].to(system.device)
    captions = [t for *_, texts in chunk for t in (texts or [])]
    outputs = system.frozen_inputs(batch, captions=[captions]) if captions else system.frozen_inputs(batch)
    arrays = {k: v[0].cpu().numpy() for k, v in outputs.items()}
    start = 0
    for story_id, counts, story_frames, _ in chunk:
        stop = start + len(story_frames)
        yield story_id, counts, {k: v[start:stop] for k, v in arrays.items()}
        start = stop


def compute_precomputed(system: Any, datamodule: Any, split: str, path: Path, record: dict[str, Any]) -> Path:
    """Encode every candidate frame of `split` with `system.frozen_inputs` and write the file at `path`."""
    n = len(datamodule.stories(split))
    was_training = system.training
    system.eval()
    state = np.random.get_state()  # reading stories must not move the training run's random frame choice
    captions = bool(getattr(system, "frozen_inputs_need_captions", lambda: False)())
    try:
        rows = (row for chunk in _passes(_story_rows(datamodule, split, n, captions), STORIES_PER_PASS)
                for row in _encode_pass(system, chunk))
        write_precomputed(path, record, rows)
    finally:
        np.random.set_state(state)
        system.train(was_training)
    log.info("precomputed inputs of %d %s stories written to %s", n, split, path)
    return path
