"""Character F1 and frame accuracy (StoryDALL-E's ``Char-F1`` and ``Frame-Acc``), on torchmetrics' multilabel metrics.

Protocol (``eval_char_clf.py`` of StoryDALL-E, see ``reference/storydalle.md`` §6.1):

* prediction per (frame, character) = ``round(sigmoid(logit))``, i.e. ``sigmoid(logit) > 0.5``: ``torch.round``
  rounds half to even, so a probability of exactly 0.5 is "absent";
* ``char_f1`` = **micro** F1 over all (frame, character) pairs: ``2·TP / (2·TP + FP + FN)``
  (torchmetrics' ``MultilabelF1Score(average="micro")``);
* ``frame_acc`` = fraction of frames whose whole predicted label vector equals the target vector
  (``MultilabelExactMatch``). A frame without characters counts as correct only if nothing is predicted in it.

Zero division: when there is no positive at all, neither in the targets nor in the predictions
(``2·TP + FP + FN == 0``), F1 is undefined; it is reported as ``zero_division`` (default ``0.0``, the value
scikit-learn returns with its default ``zero_division="warn"``, without the warning, and torchmetrics' default).
Pass ``zero_division=1.0`` to count "nothing to find, nothing found" as perfect, or ``nan``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

from storyexp.metrics._io import as_label_tensor

__all__ = ["CharacterScores"]

InputFormat = Literal["logits", "probs", "binary"]


class CharacterScores(Metric):
    """Micro character F1 and exact-match frame accuracy for multi-label character predictions.

    Args:
        num_classes: number of characters ``C``.
        input_format: what ``update`` receives as predictions, fixed per metric so it is never guessed:
            ``"logits"`` (raw classifier outputs; ``sigmoid(x) > threshold``, the sigmoid in the logits' dtype as
            the original computes it), ``"probs"`` (values in [0, 1]; ``p > threshold``), or ``"binary"`` (hard
            0/1 predictions, used as they are).
        threshold: probability threshold (strict ``>``), default 0.5.
        zero_division: F1 reported when there are no positives at all (see module docstring).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...), given to the
            wrapped torchmetrics metrics too.

    ``update(preds [N, C], target [N, C])`` with ``target`` multi-hot 0/1. ``compute()`` returns
    ``{"char_f1": tensor, "frame_acc": tensor}``, both in [0, 1]. Every state is a count summed across processes
    (torchmetrics' ``MultilabelF1Score`` / ``MultilabelExactMatch`` states), so the result under DDP equals the
    single-process result on the union of the data.
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
        self._kwargs = dict(kwargs)
        # Inputs are checked here (messages naming this metric), so torchmetrics' own checks are skipped. Its
        # threshold is strict (`preds > threshold`), like `round`; probabilities are passed, never logits:
        # torchmetrics applies a sigmoid only when some value lies outside [0, 1], so logits that all happen to
        # lie in [0, 1] would be read as probabilities.
        tm_zero = 0.0 if math.isnan(self.zero_division) else self.zero_division  # torchmetrics allows 0 or 1
        self.f1 = MultilabelF1Score(num_labels=self.num_classes, threshold=self.threshold, average="micro",
                                    zero_division=tm_zero, validate_args=False, **kwargs)
        self.f1_per_class = MultilabelF1Score(num_labels=self.num_classes, threshold=self.threshold, average="none",
                                              zero_division=tm_zero, validate_args=False, **kwargs)
        self.exact_match = MultilabelExactMatch(num_labels=self.num_classes, threshold=self.threshold,
                                                validate_args=False, **kwargs)
        self.add_state("frames", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _as_probs_or_binary(self, preds: Tensor) -> Tensor:
        if self.input_format == "logits":
            if not preds.is_floating_point():
                raise TypeError(f"CharacterScores(input_format='logits'): expected float logits, got {preds.dtype}")
            # a NaN logit is "absent" (NaN > t is false); torchmetrics would sigmoid the whole batch for it
            return torch.nan_to_num(torch.sigmoid(preds), nan=0.0)
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
            return torch.nan_to_num(preds, nan=0.0)
        if preds.numel() and not bool(((preds == 0) | (preds == 1)).all()):
            raise ValueError("CharacterScores(input_format='binary'): predictions must be 0 or 1")
        return preds.long()  # integer predictions: torchmetrics uses them as labels, no threshold

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch: ``preds`` ``[N, C]`` in ``input_format``, ``target`` ``[N, C]`` multi-hot."""
        preds = torch.as_tensor(preds)
        if preds.ndim != 2 or preds.shape[1] != self.num_classes:
            raise ValueError(f"CharacterScores: preds must be [N, {self.num_classes}], got {tuple(preds.shape)}")
        target = as_label_tensor(target, "CharacterScores target", num_classes=self.num_classes)
        if target.shape[0] != preds.shape[0]:
            raise ValueError(f"CharacterScores: preds ({preds.shape[0]}) and target ({target.shape[0]}) differ in N")
        device = self.frames.device
        pred = self._as_probs_or_binary(preds).to(device)
        true = target.to(device).long()
        for metric in self._counts():
            metric.update(pred, true)
        self.frames += pred.shape[0]

    def _counts(self) -> tuple[Metric, ...]:
        return self.f1, self.f1_per_class, self.exact_match

    def _with_zero_division(self, metric: MultilabelF1Score, f1: Tensor, micro: bool) -> Tensor:
        if math.isnan(self.zero_division):  # torchmetrics knows 0 and 1 only
            with metric.sync_context(should_sync=metric.sync_on_compute):
                denom = 2 * metric.tp + metric.fp + metric.fn
                denom = denom.sum() if micro else denom
            f1 = torch.where(denom > 0, f1, torch.full_like(f1, math.nan))
        return f1.float()

    def compute(self) -> dict[str, Tensor]:
        if int(self.frames) == 0:
            raise RuntimeError("CharacterScores.compute(): no frames were given to update()")
        return {"char_f1": self._with_zero_division(self.f1, self.f1.compute(), micro=True),
                "frame_acc": self.exact_match.compute().float()}

    def per_class_f1(self) -> Tensor:
        """F1 of each character ``[C]`` (same zero-division rule), over all processes' states so far."""
        return self._with_zero_division(self.f1_per_class, self.f1_per_class.compute(), micro=False)

    # The wrapped torchmetrics metrics hold the counts: reset, merge and forward go through them.
    def reset(self) -> None:
        super().reset()
        for metric in self._counts():
            metric.reset()

    def merge_state(self, incoming_state: "CharacterScores") -> None:  # type: ignore[override]
        """Add another ``CharacterScores``' counts to these (what DDP's sum reduction does)."""
        if not isinstance(incoming_state, CharacterScores):
            raise ValueError(f"CharacterScores.merge_state: expected a CharacterScores, got "
                             f"{type(incoming_state).__name__}")
        super().merge_state(incoming_state)
        for mine, theirs in zip(self._counts(), incoming_state._counts()):
            mine.merge_state(theirs)

    def forward(self, preds: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Accumulate the batch and return the scores of this batch alone (torchmetrics' ``forward``)."""
        batch = CharacterScores(self.num_classes, input_format=self.input_format, threshold=self.threshold,
                                zero_division=self.zero_division, **{**self._kwargs, "sync_on_compute": False})
        batch.to(self.frames.device)
        batch.update(preds, target)
        self.update(preds, target)
        return batch.compute()
