"""The interface every story-evaluation metric follows, and a suite that runs several of them.

A *story metric* is updated batch by batch with generated frames, their real counterparts and the labels /
captions of those frames, and computes a dict of named floats::

    metric.update(generated, real=None, labels=None, captions=None)
    metric.compute() -> {"fid_demo": 12.3, "char_f1": 0.91, "frame_acc": 0.80}
    metric.reset()

* ``generated``: uint8 ``[N, H, W, 3]`` frames (numpy or torch), the frames a model produced;
* ``real``: uint8 ``[N, H, W, 3]`` ground-truth frames aligned with ``generated`` (or ``None``);
* ``labels``: ``[N, C]`` multi-hot character labels of the frames (or ``None`` for datasets without them);
* ``captions``: ``N`` strings (or ``None``), for text-image metrics such as a CLIP score;
* ``stories``: ``N`` story ids (or ``None``): frames with the same id belong to one story (story-level metrics such
  as CLIP story consistency group by it; a story's frames always arrive in one ``update``).

Metrics that do not need an argument ignore it; metrics that need one raise a clear error when it is missing.
Metric names are flat strings (``fid_demo``, ``char_f1``, ``frame_acc``; later ``fid``, ``clip_score``), the
task layer prefixes them (``val/``, ``test/``). Implementations hold torchmetrics ``Metric`` states summed
across processes, so ``compute()`` gives the same result under DDP as on one process.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["StoryMetric", "StoryMetricSuite"]


@runtime_checkable
class StoryMetric(Protocol):
    def update(
        self,
        generated: Any,
        real: Any | None = None,
        labels: Any | None = None,
        *,
        captions: Sequence[str] | None = None,
        stories: Sequence[str] | None = None,
    ) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


class StoryMetricSuite:
    """Several :class:`StoryMetric` objects behind one ``update`` / ``compute`` / ``reset``.

    ``compute()`` merges their dicts; two metrics producing the same name is an error (so a later Inception
    ``fid`` can never silently overwrite, or be confused with, ``fid_demo``).
    """

    def __init__(self, metrics: Sequence[StoryMetric] | Mapping[str, StoryMetric]) -> None:
        self.metrics: list[StoryMetric] = list(metrics.values() if isinstance(metrics, Mapping) else metrics)
        if not self.metrics:
            raise ValueError("StoryMetricSuite needs at least one metric")

    def update(
        self,
        generated: Any,
        real: Any | None = None,
        labels: Any | None = None,
        *,
        captions: Sequence[str] | None = None,
        stories: Sequence[str] | None = None,
    ) -> None:
        for metric in self.metrics:
            metric.update(generated, real, labels, captions=captions, stories=stories)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.metrics:
            for name, value in metric.compute().items():
                if name in out:
                    raise ValueError(f"two metrics in the suite both produce {name!r}")
                out[name] = float(value)
        return out

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()

    def to(self, device: Any) -> "StoryMetricSuite":
        for metric in self.metrics:
            if hasattr(metric, "to"):
                metric.to(device)
        return self
