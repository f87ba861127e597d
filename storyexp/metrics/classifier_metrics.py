"""Metrics of a character classifier on generated frames: ``characters`` (Char-F1, Frame-Acc) and ``fid_demo``.

* :class:`CharacterMetric`: the classifier's predictions on the **generated** target frames against the stories'
  ground-truth labels, scored by :class:`~storyexp.metrics.CharacterScores` (torchmetrics' multilabel micro F1 and
  exact match; StoryDALL-E's ``eval_char_clf.py`` protocol). The key says which classifier scored them:
  ``char_f1`` / ``frame_acc`` with a published classifier checkpoint (``eval.classifier.checkpoint``, comparable
  with the papers), ``char_f1_demo`` / ``frame_acc_demo`` with a classifier the project trained itself
  (comparable only between runs that share it).
* :class:`ClassifierFIDMetric`: ``fid_demo``, a Fréchet distance between generated and real frames in the
  classifier's pooled features (:class:`~storyexp.metrics.DemoFID`). Not an Inception FID.

Both take the prepared classifier (:func:`~storyexp.metrics.load_prepared_classifier`, checked against its record;
nothing is trained here), follow the :class:`~storyexp.metrics.StoryMetric` contract and hold torchmetrics states
summed across processes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from storyexp.metrics._io import as_label_tensor, as_uint8_nhwc
from storyexp.metrics.characters import CharacterScores
from storyexp.metrics.fid_demo import DemoFID
from storyexp.metrics.registry import MetricContext, MetricUnavailable

__all__ = ["CharacterMetric", "ClassifierFIDMetric", "build_character_metric", "build_classifier_fid_metric",
           "character_keys"]


def character_keys(published: bool) -> dict[str, str]:
    """CharacterScores' names -> reported keys (published classifier: the papers' names; own: ``*_demo``)."""
    return {"char_f1": "char_f1", "frame_acc": "frame_acc"} if published else {
        "char_f1": "char_f1_demo", "frame_acc": "frame_acc_demo"}


class CharacterMetric:
    """Char-F1 / Frame-Acc of generated frames under ``classifier`` (keys: :func:`character_keys`)."""

    def __init__(self, classifier: Any, *, threshold: float = 0.5, batch_size: int = 64) -> None:
        self.classifier = classifier.eval()
        self.published = bool(getattr(classifier, "published", False))
        self.keys = character_keys(self.published)
        self.batch_size = int(batch_size)
        self.scores = CharacterScores(classifier.num_classes, input_format="logits", threshold=threshold)

    @torch.no_grad()
    def update(self, generated: Any, real: Any | None = None, labels: Any | None = None, *,
               captions: Sequence[str] | None = None, stories: Sequence[str] | None = None) -> None:
        gen = as_uint8_nhwc(generated, "generated")
        if labels is None:
            raise ValueError("character metrics need the ground-truth labels of the generated frames")
        lab = as_label_tensor(labels, "labels", num_classes=self.classifier.num_classes)
        if lab.shape[0] != gen.shape[0]:
            raise ValueError(f"generated ({gen.shape[0]} frames) and labels ({lab.shape[0]} rows) differ in length")
        if gen.shape[0]:
            self.scores.update(self.classifier.predict_logits(gen, batch_size=self.batch_size), lab)

    def compute(self) -> dict[str, float]:
        return {self.keys[name]: float(value) for name, value in self.scores.compute().items()}

    def reset(self) -> None:
        self.scores.reset()

    def to(self, device: Any) -> "CharacterMetric":
        self.classifier.to(device)
        self.scores.to(device)
        return self


class ClassifierFIDMetric:
    """``fid_demo``: generated vs real frames in the classifier's feature space."""

    def __init__(self, classifier: Any, *, batch_size: int = 64) -> None:
        self.fid = DemoFID(classifier, reset_real_features=True)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def update(self, generated: Any, real: Any | None = None, labels: Any | None = None, *,
               captions: Sequence[str] | None = None, stories: Sequence[str] | None = None) -> None:
        gen = as_uint8_nhwc(generated, "generated")
        if real is None:
            raise ValueError("fid_demo needs the real frames aligned with the generated ones")
        ref = as_uint8_nhwc(real, "real")
        for i in range(0, gen.shape[0], self.batch_size):
            self.fid.update(gen[i:i + self.batch_size], real=False)
            self.fid.update(ref[i:i + self.batch_size], real=True)

    def compute(self) -> dict[str, float]:
        return {"fid_demo": float(self.fid.compute())}

    def reset(self) -> None:
        self.fid.reset()

    def to(self, device: Any) -> "ClassifierFIDMetric":
        self.fid.to(device)
        return self


def _classifier(context: MetricContext, metric: str):
    from storyexp.metrics.classifier_cache import has_labels, load_prepared_classifier

    dm = context.datamodule
    if dm is None or not hasattr(dm, "stories"):
        raise MetricUnavailable(f"{metric} needs the run's StoryDataModule; it is skipped.")
    if not context.characters or not has_labels(dm):
        raise MetricUnavailable(f"data={getattr(dm, 'name', '?')} has no per-frame character labels: {metric} is "
                                "skipped.")
    return load_prepared_classifier(context.section("classifier"), dm, output_dir=context.output_dir,
                                    characters=context.characters)


def build_character_metric(context: MetricContext) -> CharacterMetric:
    return CharacterMetric(_classifier(context, "characters"))


def build_classifier_fid_metric(context: MetricContext) -> ClassifierFIDMetric:
    return ClassifierFIDMetric(_classifier(context, "fid_demo"))
