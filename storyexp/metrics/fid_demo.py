"""``fid_demo``: a Fréchet distance in the feature space of the project's own character classifier.

This is **not** FID: FID is defined on the pool3 features of one specific Inception-v3 (pytorch-fid /
torch-fidelity weights), which cannot be downloaded here. ``fid_demo`` uses the same Fréchet distance between
Gaussians fitted to features, through torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor,
but the features are the penultimate layer of a :class:`CharacterClassifier` trained on the demo dataset. Its
values are only comparable between runs that use the same classifier checkpoint; report it as ``fid_demo``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from storyexp.metrics._io import as_uint8_nhwc
from storyexp.metrics.character_classifier import CharacterClassifierBase

__all__ = ["ClassifierFeatureExtractor", "DemoFID"]


class ClassifierFeatureExtractor(nn.Module):
    """Frozen copy of a :class:`CharacterClassifier` that returns its penultimate features.

    Meets torchmetrics' custom-FID feature-extractor contract: an ``nn.Module`` with an ``int`` attribute
    ``num_features`` whose ``forward`` maps a batch of images to ``[N, num_features]``. With ``normalize=True``
    torchmetrics passes the images through untouched, so the input is float NCHW in [0, 1] (uint8 NHWC is
    accepted too, see :meth:`CharacterClassifier.preprocess`).

    Precision: the network runs in float32 (fast oneDNN kernels) and the features are returned as
    ``out_dtype`` (float64 by default). ``FrechetInceptionDistance`` keeps its sums in float64 anyway and casts
    its result to the features' dtype, so ``fid_demo`` is computed and returned in float64 without
    ``set_dtype(torch.float64)``. That call also works, but it converts this module's parameters to float64
    (4x slower on CPU); inputs are cast to the parameters' dtype, so either way runs.

    The classifier is deep-copied, so nothing done to the metric (``set_dtype``, ``.to``) changes the caller's
    classifier. The module stays in eval mode (BatchNorm uses its running statistics) whatever ``train()`` is
    called with, and has no trainable parameters.
    """

    def __init__(self, classifier: CharacterClassifierBase, out_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not isinstance(classifier, CharacterClassifierBase):
            raise TypeError(f"expected a CharacterClassifier, got {type(classifier).__name__}")
        self.classifier = copy.deepcopy(classifier).eval()
        self.classifier.requires_grad_(False)
        self.num_features: int = int(classifier.num_features)
        self.out_dtype = out_dtype

    def train(self, mode: bool = True) -> "ClassifierFeatureExtractor":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x).to(self.out_dtype)


class DemoFID(FrechetInceptionDistance):
    """Fréchet distance between generated and real frames in the classifier's feature space (``fid_demo``).

    Built as ``FrechetInceptionDistance(feature=ClassifierFeatureExtractor(classifier), normalize=True,
    reset_real_features=False)``. Sums, covariances and the result are float64 (see
    :class:`ClassifierFeatureExtractor` for why no ``set_dtype(torch.float64)`` is needed).

    ``update(frames, real)`` takes **uint8 NHWC** ``[N, H, W, 3]`` frames (numpy or torch), like ``Story`` records
    and generated samples; float NCHW in [0, 1] is accepted too (torchmetrics' ``normalize=True`` convention).
    ``real=True`` for reference frames, ``False`` for generated ones.

    ``reset_real_features=False``: ``reset()`` clears the generated side only and keeps the reference statistics,
    so a fixed reference set is encoded once per run; call ``reset_real()`` (or build a new metric) to change
    the reference set.
    """

    def __init__(self, classifier: CharacterClassifierBase, **kwargs: Any) -> None:
        kwargs.setdefault("reset_real_features", False)
        super().__init__(feature=ClassifierFeatureExtractor(classifier), normalize=True, **kwargs)

    def update(self, imgs: Tensor | np.ndarray, real: bool) -> None:  # type: ignore[override]
        if isinstance(imgs, Tensor) and imgs.is_floating_point():
            if imgs.ndim != 4 or imgs.shape[1] != 3:
                raise ValueError(f"DemoFID: float frames must be NCHW [N, 3, H, W] in [0, 1], got {tuple(imgs.shape)}")
            x = imgs
        else:
            frames = as_uint8_nhwc(imgs, "DemoFID frames")
            x = frames.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[0] == 0:
            return
        super().update(x.to(self.device), real=bool(real))

    def compute(self) -> Tensor:
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise RuntimeError(
                f"fid_demo needs at least 2 generated and 2 real frames; got {n_fake} generated and {n_real} real"
            )
        return super().compute()

    def reset_real(self) -> None:
        """Clear both sides, including the kept reference (real) statistics."""
        keep, self.reset_real_features = self.reset_real_features, True
        try:
            self.reset()
        finally:
            self.reset_real_features = keep
