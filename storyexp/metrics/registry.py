"""The story metrics ``eval.metrics`` can name, and how each is built from the run (the one place names resolve).

A metric is a :class:`~storyexp.metrics.base.StoryMetric` implementation in its own module plus one line in
:data:`METRICS` naming its builder: ``builder(context: MetricContext) -> StoryMetric``. The evaluation callbacks
(test: :class:`storyexp.callbacks.StoryEvaluation`, validation: :class:`storyexp.callbacks.ValidationMetrics`)
build every configured metric through :func:`build_metric`, so adding a metric never touches them.

A builder that cannot run because an optional resource is absent (FID weights, a CLIP model) raises
:class:`MetricUnavailable` with one line saying what is missing and how to get it; the callback then warns and
goes on without that metric, unless the metric's config says ``required: true``. Builders import lazily, so
naming a metric never imports the libraries of the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from storyexp.errors import ConfigurationError, StoryexpError

__all__ = ["FID_PROTOCOLS", "METRICS", "MetricContext", "MetricSpec", "MetricUnavailable", "build_metric",
           "check_metric_names", "fid_protocol"]

#: FID protocol (config, command line) -> its metric key. Here, not in fid.py, because config validation reads it
#: before anything is built and must not import pytorch-fid.
FID_PROTOCOLS = {"fid64": "fid64", "native": "fid"}


def fid_protocol(name: str) -> str:
    """``fid64`` or ``native`` (``fid``, the native protocol's key, is accepted for it); one line otherwise."""
    name = "native" if name == "fid" else str(name)
    if name not in FID_PROTOCOLS:
        raise ConfigurationError(f"unknown FID protocol {name!r} (eval.fid.protocols / --protocol); expected one of "
                                 f"{sorted(FID_PROTOCOLS)}")
    return name


class MetricUnavailable(StoryexpError):
    """An optional resource of a metric is missing; the message says which and how to get it."""


@dataclass(frozen=True)
class MetricContext:
    """What a metric builder may use.

    * ``eval_cfg``: the resolved ``eval`` config as plain Python (``eval_cfg["fid"]``, ``eval_cfg["classifier"]``);
    * ``datamodule``: the run's ``StoryDataModule`` (its ``name``, ``task``, ``characters``, splits);
    * ``output_dir``: the run's output directory; ``weights_dir``: ``paths.weights_dir``;
    * ``stage``: ``"test"`` or ``"val"`` (the split the generated stories come from);
    * ``task``: ``"visualization"`` or ``"continuation"`` (continuation scores frames 1..n-1 only).
    """

    eval_cfg: dict[str, Any]
    datamodule: Any = None
    output_dir: Path | None = None
    weights_dir: str | None = None
    stage: str = "test"
    task: str = "visualization"
    characters: list[str] = field(default_factory=list)

    def section(self, name: str) -> dict[str, Any]:
        value = self.eval_cfg.get(name) or {}
        return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class MetricSpec:
    module: str
    builder: str
    reports: str  # the keys it reports, for messages and the README


METRICS: dict[str, MetricSpec] = {
    "fid": MetricSpec("storyexp.metrics.fid_reference", "build_fid_metric",
                      "Inception FID per eval.fid.protocols: fid64 (PIL 64x64, the published protocol) / fid (native)"),
    "characters": MetricSpec("storyexp.metrics.classifier_metrics", "build_character_metric",
                             "char_f1, frame_acc (published classifier) or char_f1_demo, frame_acc_demo (own)"),
    "fid_demo": MetricSpec("storyexp.metrics.classifier_metrics", "build_classifier_fid_metric",
                           "fid_demo: Frechet distance in the character classifier's features (not an FID)"),
    "clip": MetricSpec("storyexp.metrics.clip_scores", "build_clip_metric",
                       "clip_score (frame vs caption), clip_consistency (frames of one story)"),
}


def check_metric_names(names: Sequence[str] | None) -> list[str]:
    names = [str(n) for n in (names or [])]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigurationError(f"Unknown eval.metrics {unknown}; known: {sorted(METRICS)}.")
    if len(set(names)) != len(names):
        raise ConfigurationError(f"eval.metrics names a metric twice: {names}.")
    return names


def build_metric(name: str, context: MetricContext):
    """The metric ``name`` for this run; raises :class:`MetricUnavailable` when an optional resource is missing."""
    spec = METRICS[check_metric_names([name])[0]]
    builder = getattr(importlib.import_module(spec.module), spec.builder)
    return builder(context)
