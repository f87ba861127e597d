"""FID of generated stories against a split's ground truth, with the split's reference statistics cached on disk.

The reference of a split is the Inception statistics of its ground-truth **target** frames (continuation leaves
frame 0 out), each frame picked by the data module's deterministic eval rule (``data.frame_choice.eval``) and
resized by ``data.frame_size``. It is computed once and written as a pytorch-fid ``.npz`` (``mu``, ``sigma``, plus
``record``: a JSON string of what produced it) under ``eval.fid.stats_dir``:

    <stats_dir>/<split>_<task>_<protocol>_<hash>.npz

``hash`` is of the record: the data fingerprint of the split (:func:`storyexp.utils.cache.data_fingerprint`), the
split, the frame rule, ``frame_size``, the task, the protocol and the SHA-256 of the Inception weights file. Any of
them changing gives another file, so a stale reference is never read (the footgun of the originals'
``fid_cache_%s.npz``, which was keyed by nothing but the split). A file whose embedded record differs is ignored
with a log line.

Who writes it: ``python launch.py task=fid_stats data=...`` precomputes it; otherwise the first evaluation of the
whole split computes the reference from the real frames it sees anyway and writes it at the end (rank 0). A run
on part of a split (``data.limit_test``, ``trainer.limit_test_batches``) scores against the real frames of the
stories it evaluated, never reads nor writes the cache, and the metric's log line says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from storyexp.errors import ConfigurationError
from storyexp.metrics._io import as_uint8_nhwc
from storyexp.metrics.fid import PROTOCOLS, StoryFID, build_inception, find_weights, stream_stats
from storyexp.metrics.registry import MetricContext, MetricUnavailable, fid_protocol
from storyexp.utils.cache import data_fingerprint, make_record, matches, plain

log = logging.getLogger(__name__)

__all__ = ["SplitFID", "build_fid_metric", "compute_reference", "reference_record", "reference_path",
           "load_reference", "recorded_frames", "save_reference", "weights_sha256"]

KIND = "fid_reference"
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the weights file (memoised per path, size and mtime: it is read once per process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def reference_record(datamodule: Any, split: str, protocol: str, weights: str | os.PathLike) -> dict[str, Any]:
    """What the reference statistics of ``split`` depend on (see the module docstring)."""
    stage = "test" if split == getattr(datamodule, "test_split", "test") else "val"
    fingerprint = data_fingerprint(datamodule, splits=(stage,))
    config = {
        "split": str(split),
        "task": str(getattr(datamodule, "task", "visualization")),
        "frame_choice": str((getattr(datamodule, "frame_choice", None) or {}).get("eval", "fixed")),
        "frame_size": getattr(datamodule, "frame_size", None),
        "frame_fit": str(getattr(datamodule, "frame_fit", "squash")),  # squash or centre crop to frame_size
        "protocol": fid_protocol(protocol),
        "weights_sha256": weights_sha256(weights),
    }
    return make_record(KIND, config, fingerprint)


def reference_path(stats_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    config = record["config"]
    digest = hashlib.sha256(json.dumps(plain({k: record[k] for k in ("config", "data")}), sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    return Path(stats_dir) / f"{config['split']}_{config['task']}_{config['protocol']}_{digest}.npz"


def load_reference(path: str | os.PathLike, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(mu, sigma)`` when ``path`` exists and its embedded record matches ``record``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["record"])) if "record" in f.files else None
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except Exception as err:  # noqa: BLE001 (an unreadable cache is recomputed, not trusted)
        log.warning("FID reference %s is unreadable (%s); it is recomputed.", path, err)
        return None
    ok, reason = matches(stored, record)
    if not ok:
        log.warning("FID reference %s is not used: %s.", path, reason)
        return None
    return mu, sigma


def recorded_frames(path: str | os.PathLike) -> int:
    """How many frames the cached reference at ``path`` was computed from (its record's quality)."""
    with np.load(path, allow_pickle=False) as f:
        return int(json.loads(str(f["record"]))["quality"]["num_frames"])


def save_reference(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, record: Mapping[str, Any],
                   num_frames: int) -> Path:
    """Write the statistics (pytorch-fid's ``mu`` / ``sigma``; readable by ``python -m pytorch_fid``) with their
    record, atomically."""
    from storyexp.utils.io import atomic_write

    full = {**record, "quality": {"num_frames": int(num_frames)}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, record=np.array(json.dumps(full)))

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------------------ metric


class SplitFID:
    """FID for each configured protocol of generated target frames against the split's reference (a StoryMetric).

    ``references[protocol]``: cached ``(mu, sigma)`` or None (then the real frames given to ``update`` form the
    reference). ``caches[protocol] = (path, record)`` says where a reference computed here is written when the
    whole split was seen (``expected_frames`` real frames over all processes; written by global rank 0 inside
    ``compute()``). ``compute()`` returns ``{"fid64": ..., "fid": ...}`` for the configured protocols.
    """

    def __init__(self, protocols: list[str], inception: Any, *, references: Mapping[str, Any] | None = None,
                 caches: Mapping[str, tuple[Path, dict]] | None = None, expected_frames: int | None = None) -> None:
        self.protocols = [fid_protocol(p) for p in protocols]
        if not self.protocols:
            raise ConfigurationError("eval.fid.protocols is empty; give fid64 and/or native")
        references = dict(references or {})
        self.caches = dict(caches or {})
        self.expected_frames = expected_frames
        self.metrics = {p: StoryFID(p, inception=inception, reference=references.get(p)) for p in self.protocols}
        self.cached = {p: references.get(p) is not None for p in self.protocols}

    def update(self, generated: Any, real: Any | None = None, labels: Any | None = None, *,
               captions: Any = None, stories: Any = None) -> None:
        generated = as_uint8_nhwc(generated, "generated")
        for protocol, metric in self.metrics.items():
            metric.update(generated, None if self.cached[protocol] else real)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for protocol, metric in self.metrics.items():
            out.update(metric.compute())
            if not self.cached[protocol]:
                self._maybe_write(protocol, metric)
        return out

    def _maybe_write(self, protocol: str, metric: StoryFID) -> None:
        if protocol not in self.caches:
            return
        path, record = self.caches[protocol]
        with metric.sync_context():  # the states summed over processes (compute() unsyncs them on return)
            seen = int(metric.real_n)
            mu, sigma = metric.stats("real") if seen == self.expected_frames else (None, None)
        if self.expected_frames is None or seen != self.expected_frames:
            log.info("%s scored against the real frames of the %d evaluated frames (part of the split): the "
                     "reference %s is not written.", metric.key, seen, path)
            return
        if _global_rank() == 0:
            save_reference(path, mu, sigma, record, seen)
            log.info("FID reference of the whole split written to %s (%d frames).", path, seen)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def to(self, device: Any) -> "SplitFID":
        for metric in self.metrics.values():
            metric.to(device)
        return self


def _global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _split_name(context: MetricContext) -> str:
    dm = context.datamodule
    return str(getattr(dm, "test_split" if context.stage == "test" else "val_split", context.stage))


def _targets_per_story(datamodule: Any) -> int:
    from storyexp.data.story import N_FRAMES

    return N_FRAMES - 1 if str(getattr(datamodule, "task", "")) == "continuation" else N_FRAMES


def build_fid_metric(context: MetricContext) -> SplitFID:
    """``eval.fid`` -> :class:`SplitFID`: weights looked up (``MetricUnavailable`` when absent and not required),
    cached references read for the test split."""
    cfg = context.section("fid")
    protocols = [fid_protocol(p) for p in (cfg.get("protocols") or ["fid64"])]
    try:
        weights = find_weights(cfg.get("weights"), context.weights_dir)
    except Exception as err:  # MissingResourceError: one line saying where to put the file
        if cfg.get("required"):
            raise
        raise MetricUnavailable(f"{err} (FID is skipped; eval.fid.required=true makes this an error)") from None
    inception = build_inception(weights)
    references: dict[str, Any] = {}
    caches: dict[str, tuple[Path, dict]] = {}
    dm = context.datamodule
    expected = None
    whole_split = dm is not None and context.stage == "test" and getattr(dm, "limits", {}).get("test") is None
    if whole_split and cfg.get("stats_dir"):
        split = _split_name(context)
        expected = len(dm.stories(split)) * _targets_per_story(dm)
        for protocol in protocols:
            record = reference_record(dm, split, protocol, weights)
            path = reference_path(cfg["stats_dir"], record)
            references[protocol] = load_reference(path, record)
            caches[protocol] = (path, record)
            if references[protocol] is not None:
                log.info("%s: reference statistics of the %s split read from %s.", PROTOCOLS[protocol], split, path)
    return SplitFID(protocols, inception, references=references, caches=caches, expected_frames=expected)


@torch.no_grad()
def compute_reference(datamodule: Any, split: str, protocol: str, inception: Any, batch_size: int = 50
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` of the split's ground-truth target frames (task=fid_stats), streamed story by story with
    the data module's eval frame rule and ``frame_size``."""
    from storyexp.data.story import N_FRAMES

    first = N_FRAMES - _targets_per_story(datamodule)
    dataset = datamodule._dataset(split)
    frames = (frame for i in range(len(dataset)) for frame in dataset[i]["frames"][first:])
    return stream_stats(frames, inception, protocol, batch_size)
