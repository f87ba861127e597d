"""Evaluation of generated stories with the project's own character classifier (the ``demo`` dataset)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from storyexp.metrics._io import as_label_tensor, as_uint8_nhwc
from storyexp.metrics.character_classifier import CharacterClassifier
from storyexp.metrics.characters import CharacterScores
from storyexp.metrics.fid_demo import DemoFID

__all__ = ["DemoStoryEvaluator"]


class DemoStoryEvaluator(nn.Module):
    """``fid_demo``, ``char_f1`` and ``frame_acc`` of generated frames, from one trained classifier.

    Follows the :class:`storyexp.metrics.base.StoryMetric` interface::

        ev = DemoStoryEvaluator(classifier)
        ev.update(generated, real, labels)   # uint8 [N,H,W,3], uint8 [N,H,W,3], [N,C] multi-hot
        ev.compute()  # {"fid_demo": float, "char_f1": float, "frame_acc": float}

    * ``char_f1`` / ``frame_acc`` (:class:`CharacterScores`): the classifier's predictions on the **generated**
      frames against the ground-truth ``labels`` of the story (sigmoid > ``threshold``).
    * ``fid_demo`` (:class:`DemoFID`): generated frames against the ``real`` frames, in the classifier's
      feature space. Not an Inception FID.

    Reference statistics: by default ``reset()`` clears everything, so each pass of ``update(generated, real,
    labels)`` is self-contained. ``reset(keep_reference=True)`` (or :meth:`freeze_reference`) keeps the real-frame
    statistics and ignores real frames in later updates (counted in ``ignored_real_frames``), which saves
    encoding a fixed validation set again at every epoch. :meth:`add_reference` adds real frames without
    generated ones.

    It is an ``nn.Module`` so that ``.to(device)`` moves the classifier and all metric states. The classifier is
    used as given (eval mode) for the character scores; the FID holds a frozen copy.
    """

    def __init__(
        self,
        classifier: CharacterClassifier,
        *,
        threshold: float = 0.5,
        zero_division: float = 0.0,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, CharacterClassifier):
            raise TypeError(f"expected a CharacterClassifier, got {type(classifier).__name__}")
        self.classifier = classifier.eval()
        self.batch_size = int(batch_size)
        self.char_scores = CharacterScores(
            classifier.num_classes, input_format="logits", threshold=threshold, zero_division=zero_division
        )
        self.fid = DemoFID(classifier)
        self.reference_frozen = False
        self.ignored_real_frames = 0

    def train(self, mode: bool = True) -> "DemoStoryEvaluator":
        return super().train(False)  # an evaluator: BatchNorm always uses running statistics

    @torch.no_grad()
    def update(  # type: ignore[override]
        self,
        generated: Any,
        real: Any | None = None,
        labels: Any | None = None,
        *,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of generated frames, their real counterparts and their labels (``captions`` unused)."""
        gen = as_uint8_nhwc(generated, "generated")
        if labels is None:
            raise ValueError("DemoStoryEvaluator.update: labels are required (character scores of generated frames)")
        lab = as_label_tensor(labels, "labels", num_classes=self.classifier.num_classes)
        if lab.shape[0] != gen.shape[0]:
            raise ValueError(f"generated ({gen.shape[0]} frames) and labels ({lab.shape[0]} rows) differ in length")
        if real is not None:
            ref = as_uint8_nhwc(real, "real")
            if ref.shape[0] != gen.shape[0]:
                raise ValueError(f"generated ({gen.shape[0]}) and real ({ref.shape[0]}) differ in frame count")
            self.add_reference(ref)
        if gen.shape[0] == 0:
            return
        self.char_scores.update(self.classifier.predict_logits(gen, batch_size=self.batch_size), lab)
        for i in range(0, gen.shape[0], self.batch_size):
            self.fid.update(gen[i : i + self.batch_size], real=False)

    @torch.no_grad()
    def add_reference(self, real: Any) -> None:
        """Add real frames to the ``fid_demo`` reference statistics (ignored while the reference is frozen)."""
        ref = as_uint8_nhwc(real, "real")
        if self.reference_frozen:
            self.ignored_real_frames += int(ref.shape[0])
            return
        for i in range(0, ref.shape[0], self.batch_size):
            self.fid.update(ref[i : i + self.batch_size], real=True)

    def freeze_reference(self) -> None:
        """Keep the current reference statistics; later real frames are ignored until ``reset()``."""
        if int(self.fid.real_features_num_samples) < 2:
            raise RuntimeError("cannot freeze the fid_demo reference: fewer than 2 real frames were added")
        self.reference_frozen = True

    def compute(self) -> dict[str, float]:
        scores = self.char_scores.compute()
        return {
            "fid_demo": float(self.fid.compute()),
            "char_f1": float(scores["char_f1"]),
            "frame_acc": float(scores["frame_acc"]),
        }

    def reset(self, keep_reference: bool = False) -> None:
        """Clear generated-frame statistics and scores; the reference too unless ``keep_reference``."""
        self.char_scores.reset()
        self.ignored_real_frames = 0
        if keep_reference:
            self.fid.reset()  # reset_real_features=False: keeps the real statistics
            self.freeze_reference()
        else:
            self.fid.reset_real()
            self.reference_frozen = False
