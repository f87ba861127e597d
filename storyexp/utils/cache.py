"""Records of the networks the project trains itself and caches on disk (character classifier, demo stage-1 VQGAN).

A cached network is only reused by a run that would have produced it. Each cached file carries a **record**::

    {
      "kind": "character_classifier" | "stage1_vqgan" | ...,
      "format_version": 1,                 # of this record layout (RECORD_FORMAT)
      "config": {...},                     # the training settings and the network sizes
      "data": {...},                       # a fingerprint of the data it was trained on (see below)
      "quality": {...},                    # its own figures (validation frame accuracy, reconstruction MAE, ...)
    }

stored inside the file (a key of the torch payload, or JSON in the safetensors metadata). ``matches(record,
expected)`` compares kind, format version, config and data fingerprint (never the quality); ``check_quality``
refuses a record whose figures are below the floors the config states, with one `ConfigurationError` line that
names the file, the figure and the fix.

Data fingerprints (``data_fingerprint`` for a datamodule, ``frames_fingerprint`` for an array of frames):

    {"dataset": "demo", "path": ".../demo.h5", "splits": {"train": 3000, "val": 32},
     "limits": {"train": null, "val": null}, "limited": false, "samples": 8, "sha256": "..."}

``sha256`` hashes the split sizes and, for up to ``samples`` stories per split spread evenly over it, the story
id, captions, frames (shape and bytes) and labels: cheap (a few stories are read) and different for another
dataset, another generation of the demo set, another size or a limited split. ``path`` is informational: the same
data moved elsewhere is still the same data, so it is not compared (``INFORMATIONAL_KEYS``).

A run whose training data is limited (``limited``: ``data.limit_train`` / ``data.limit_val`` set) never writes a
shared cache: the callers train into the run's own output directory instead (``cache_path``).

The networks behind these caches train through Lightning with ``single_device_trainer``: one device, no logger, no
checkpoints in the run directory, and its own cluster environment, so it also runs inside a DDP or SLURM job's
process (e.g. from a system's ``prepare_data``) without joining that job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from storyexp.errors import ConfigurationError

__all__ = [
    "INFORMATIONAL_KEYS",
    "RECORD_FORMAT",
    "cache_path",
    "check_quality",
    "data_fingerprint",
    "differences",
    "frames_fingerprint",
    "make_record",
    "matches",
    "plain",
    "quiet_lightning",
    "single_device_trainer",
]

RECORD_FORMAT = 1

# fingerprint keys recorded for the reader but not compared
INFORMATIONAL_KEYS = ("path",)


# ------------------------------------------------------------------------------------------------- records


def plain(value: Any) -> Any:
    """``value`` as plain JSON types (dicts with str keys, lists, str, int, float, bool, None).

    OmegaConf containers, tuples, numpy scalars and paths are converted; a float that is integral stays a float
    (``2e-3`` and ``0.002`` compare equal, ``4`` and ``4.0`` too: see `differences`).
    """
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover (omegaconf is a dependency)
        pass
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot record a value of type {type(value).__name__} ({value!r}) in a cache record")


def make_record(kind: str, config: Mapping[str, Any], data: Mapping[str, Any],
                quality: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A cache record of plain types (storable in a ``weights_only`` torch file and in JSON)."""
    return {
        "kind": str(kind),
        "format_version": RECORD_FORMAT,
        "config": plain(dict(config)),
        "data": plain(dict(data)),
        "quality": plain(dict(quality or {})),
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(have: Mapping[str, Any], want: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``key: recorded -> expected`` for every (dotted) key whose values differ, keys in ``ignore`` left out."""
    ignore = set(ignore)
    a, b = _flatten(plain(dict(have))), _flatten(plain(dict(want)))
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or key.split(".")[-1] in ignore:
            continue
        if key not in a:
            out.append(f"{key}: (none) -> {_short(b[key])}")
        elif key not in b:
            out.append(f"{key}: {_short(a[key])} -> (none)")
        elif not _same(a[key], b[key]):
            out.append(f"{key}: {_short(a[key])} -> {_short(b[key])}")
    return out


def matches(record: Mapping[str, Any] | None, expected: Mapping[str, Any], shown: int = 3) -> tuple[bool, str]:
    """Whether a cached file's ``record`` was produced the way ``expected`` (``{kind, config, data}``) says.

    Returns ``(True, "")`` or ``(False, reason)``, the reason one short line ("config differs: epochs: 1 -> 4").
    The quality figures are not compared (see `check_quality`); data keys in ``INFORMATIONAL_KEYS`` neither.
    """
    if not record or not isinstance(record, Mapping):
        return False, "it has no record of what produced it (written by an older version)"
    version = record.get("format_version")
    if version != RECORD_FORMAT:
        return False, f"its record has format_version {version!r}, this code writes {RECORD_FORMAT}"
    if record.get("kind") != expected.get("kind"):
        return False, f"it is a {record.get('kind')!r}, not a {expected.get('kind')!r}"
    for part, ignore in (("config", ()), ("data", INFORMATIONAL_KEYS)):
        diff = differences(record.get(part) or {}, expected.get(part) or {}, ignore=ignore)
        if diff:
            more = f" (+{len(diff) - shown} more)" if len(diff) > shown else ""
            what = "data fingerprint" if part == "data" else part
            return False, f"{what} differs: {'; '.join(diff[:shown])}{more}"
    return True, ""


def check_quality(record: Mapping[str, Any], path: str | Path, floors: Mapping[str, tuple[str, float | None, str]],
                  what: str, fix: str) -> None:
    """Refuse a cached network whose recorded figures miss the configured floors.

    ``floors``: ``figure -> (config key, floor, "min" | "max")``; a ``None`` floor is not checked. Raises one
    `ConfigurationError` line naming ``what`` and the file, the figure and its value, the config key, and ``fix``.
    """
    quality = record.get("quality") or {}
    for figure, (key, floor, sense) in floors.items():
        if floor is None:
            continue
        value = quality.get(figure)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ConfigurationError(
                f"{what} {path} is refused: it records no {figure} to compare with {key}={floor} (e.g. it was "
                f"trained without a validation split); {fix}"
            )
        bad = float(value) < float(floor) if sense == "min" else float(value) > float(floor)
        if bad:
            relation = "below" if sense == "min" else "above"
            raise ConfigurationError(
                f"{what} {path} is refused: its {figure} {float(value):.4g} is {relation} {key}={floor}; {fix}"
            )


def cache_path(shared: str | Path, fingerprint: Mapping[str, Any], output_dir: str | Path | None,
               run_path: str | Path | None = None) -> Path:
    """Where a cache lives: the ``shared`` path, or, when the data is limited, the run's own file.

    A limited run never writes (nor reads) the shared cache: it uses ``run_path`` when given, otherwise
    ``output_dir / <shared file name>``; without either it is refused (`ConfigurationError`).
    """
    if not fingerprint.get("limited"):
        return Path(shared)
    if run_path:
        return Path(run_path)
    if output_dir is None:
        raise ConfigurationError(
            f"The data is limited ({fingerprint.get('limits')}), so the shared cache {shared} is not used, but no "
            "run output directory was given to train into."
        )
    return Path(output_dir) / Path(shared).name


# ------------------------------------------------------------------------------------------- fingerprints


def _update_array(h: "hashlib._Hash", array: Any) -> None:
    a = np.ascontiguousarray(np.asarray(array))
    h.update(f"{a.dtype.str}{list(a.shape)}".encode())
    h.update(a.tobytes())


def _sample_indices(n: int, samples: int) -> list[int]:
    if n <= 0 or samples <= 0:
        return []
    if n <= samples:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, samples)})


def data_fingerprint(datamodule: Any, splits: Sequence[str] = ("train", "val"), samples: int = 8) -> dict[str, Any]:
    """Fingerprint of the stories a datamodule gives for ``splits`` (``train`` / ``val`` / ``test``).

    Reads ``len`` of each split and up to ``samples`` stories spread evenly over it, so it costs a few story reads
    whatever the dataset's size. ``limited`` is true when a ``limit_<split>`` of one of ``splits`` is set
    (``datamodule.limits``). The stories are ``datamodule.fingerprint_stories(split)`` where the data module has it
    (every candidate frame of a story, so a split read with ``frame_choice=random`` fingerprints the same on every
    call), else ``datamodule.stories(split)``; NumPy's global generator is left as it was (a random frame choice
    must not move because a fingerprint was taken).
    """
    state = np.random.get_state()
    try:
        return _data_fingerprint(datamodule, splits, samples)
    finally:
        np.random.set_state(state)


def _data_fingerprint(datamodule: Any, splits: Sequence[str], samples: int) -> dict[str, Any]:
    h = hashlib.sha256()
    sizes: dict[str, int] = {}
    limits = dict(getattr(datamodule, "limits", {}) or {})
    read = getattr(datamodule, "fingerprint_stories", None) or datamodule.stories
    for split in splits:
        name = getattr(datamodule, f"{split}_split", split)
        stories = read(name)
        n = len(stories)
        sizes[split] = n
        h.update(f"|split {split} {n}|".encode())
        for i in _sample_indices(n, samples):
            story = stories[i]
            h.update(f"|story {i} {story.id}|".encode())
            h.update(json.dumps(list(story.captions)).encode())
            for frame in story.frames:
                _update_array(h, frame)
            if story.labels is None:
                h.update(b"|no labels|")
            else:
                _update_array(h, np.asarray(story.labels, dtype=np.float32))
    used = {split: limits.get(split) for split in splits}
    return {
        "dataset": str(getattr(datamodule, "name", type(datamodule).__name__)),
        "path": str(getattr(datamodule, "path", "")),
        "splits": sizes,
        "limits": used,
        "limited": any(v is not None for v in used.values()),
        "samples": int(samples),
        "sha256": h.hexdigest(),
    }


def frames_fingerprint(frames: Any, limited: bool | None = None) -> dict[str, Any]:
    """Fingerprint of an array of frames (every byte is hashed: the frames are in memory already)."""
    h = hashlib.sha256()
    _update_array(h, frames)
    a = np.asarray(frames) if not hasattr(frames, "shape") else frames
    return {
        "dataset": "frames",
        "splits": {"frames": int(a.shape[0]) if len(a.shape) else 0},
        "shape": [int(s) for s in a.shape],
        "limited": limited,
        "sha256": h.hexdigest(),
    }


# ------------------------------------------------------------------------------------------------ trainers

_QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*defined a `validation_step` but have no `val_dataloader`.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notices (devices, tips, "fit stopped") and known harmless warnings silenced."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def single_device_trainer(**kwargs: Any):
    """A `lightning.Trainer` for training a cached network: one device (CPU unless ``accelerator`` says otherwise),
    no logger, no progress bar, no model summary, no sanity validation, and a private `LightningEnvironment`
    (no DDP / SLURM / torchelastic detection). ``kwargs`` override any of these."""
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    settings: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "plugins": [LightningEnvironment()],
    }
    settings.update(kwargs)
    return L.Trainer(**settings)
