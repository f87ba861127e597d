"""Character F1 and frame accuracy (StoryDALL-E's ``Char-F1`` and ``Frame-Acc``).

Protocol (``eval_char_clf.py`` of StoryDALL-E, see ``reference/storydalle.md`` §6.1):

* prediction per (frame, character) = ``sigmoid(logit) > 0.5`` (``round`` in the original: 0.5 rounds to 0);
* ``char_f1`` = **micro** F1 over all (frame, character) pairs: ``2·TP / (2·TP + FP + FN)``;
* ``frame_acc`` = fraction of frames whose whole predicted label vector equals the target vector. A frame
  without characters therefore counts as correct only if nothing is predicted in it.

Zero division: when there is no positive at all, neither in the targets nor in the predictions
(``2·TP + FP + FN == 0``), F1 is undefined; it is reported as ``zero_division`` (default ``0.0``, the value
scikit-learn returns with its default ``zero_division="warn"``, without the warning). Pass ``zero_division=1.0``
to count "nothing to find, nothing found" as perfect.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from storyexp.metrics._io import as_label_tensor

__all__ = ["CharacterScores"]

InputFormat = Literal["logits", "probs", "binary"]


class CharacterScores(Metric):
    """Micro character F1 and exact-match frame accuracy for multi-label character predictions.

    Args:
        num_classes: number of characters ``C``.
        input_format: what ``update`` receives as predictions, fixed per metric so it is never guessed:
            ``"logits"`` (raw classifier outputs; thresholded as ``sigmoid(x) > threshold``, computed exactly as
            ``x > log(t / (1 - t))``), ``"probs"`` (values in [0, 1]; ``p > threshold``), or ``"binary"``
            (hard 0/1 predictions, used as they are).
        threshold: probability threshold (strict ``>``), default 0.5.
        zero_division: F1 reported when there are no positives at all (see module docstring).

    ``update(preds [N, C], target [N, C])`` with ``target`` multi-hot 0/1. ``compute()`` returns
    ``{"char_f1": tensor, "frame_acc": tensor}``, both in [0, 1]. All states are counts summed across processes,
    so the result under DDP equals the single-process result on the union of the data.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        *,
        input_format: InputFormat = "logits",
        threshold: float = 0.5,
        zero_division: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if input_format not in ("logits", "probs", "binary"):
            raise ValueError(f"input_format must be 'logits', 'probs' or 'binary', got {input_format!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if not (zero_division in (0.0, 1.0) or math.isnan(zero_division)):
            raise ValueError(f"zero_division must be 0.0, 1.0 or nan, got {zero_division}")
        self.num_classes = int(num_classes)
        self.input_format = input_format
        self.threshold = float(threshold)
        self.zero_division = float(zero_division)
        self.add_state("tp", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("fp", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("fn", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("exact", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("frames", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _binarize(self, preds: Tensor) -> Tensor:
        if self.input_format == "logits":
            if not preds.is_floating_point():
                raise TypeError(f"CharacterScores(input_format='logits'): expected float logits, got {preds.dtype}")
            return preds > math.log(self.threshold / (1.0 - self.threshold))
        if self.input_format == "probs":
            if not preds.is_floating_point():
                raise TypeError(
                    f"CharacterScores(input_format='probs'): expected float probabilities, got {preds.dtype}"
                )
            if preds.numel() and (float(preds.min()) < 0.0 or float(preds.max()) > 1.0):
                raise ValueError(
                    "CharacterScores(input_format='probs'): probabilities must be in [0, 1] "
                    "(use input_format='logits' for raw classifier outputs)"
                )
            return preds > self.threshold
        if preds.numel() and not bool(((preds == 0) | (preds == 1)).all()):
            raise ValueError("CharacterScores(input_format='binary'): predictions must be 0 or 1")
        return preds.bool()

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch: ``preds`` ``[N, C]`` in ``input_format``, ``target`` ``[N, C]`` multi-hot."""
        preds = torch.as_tensor(preds)
        if preds.ndim != 2 or preds.shape[1] != self.num_classes:
            raise ValueError(f"CharacterScores: preds must be [N, {self.num_classes}], got {tuple(preds.shape)}")
        target = as_label_tensor(target, "CharacterScores target", num_classes=self.num_classes)
        if target.shape[0] != preds.shape[0]:
            raise ValueError(f"CharacterScores: preds ({preds.shape[0]}) and target ({target.shape[0]}) differ in N")
        pred = self._binarize(preds).to(self.tp.device)
        true = target.to(self.tp.device).bool()
        self.tp += (pred & true).sum(0)
        self.fp += (pred & ~true).sum(0)
        self.fn += (~pred & true).sum(0)
        self.exact += (pred == true).all(dim=1).sum()
        self.frames += pred.shape[0]

    def _f1(self, tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        denom = 2 * tp + fp + fn
        f1 = (2 * tp).double() / denom.clamp(min=1).double()
        return torch.where(denom > 0, f1, torch.full_like(f1, self.zero_division)).float()

    def compute(self) -> dict[str, Tensor]:
        if int(self.frames) == 0:
            raise RuntimeError("CharacterScores.compute(): no frames were given to update()")
        return {
            "char_f1": self._f1(self.tp.sum(), self.fp.sum(), self.fn.sum()),
            "frame_acc": (self.exact.double() / self.frames.double()).float(),
        }

    def per_class_f1(self) -> Tensor:
        """F1 of each character ``[C]`` (same zero-division rule), over all processes' states so far."""
        with self.sync_context():
            return self._f1(self.tp, self.fp, self.fn)
