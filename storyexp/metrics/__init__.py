"""Evaluation metrics shared by every system.

All story metrics follow :class:`StoryMetric`: ``update(generated, real=None, labels=None, captions=None)`` with
uint8 ``[N, H, W, 3]`` frames, ``compute() -> dict[str, float]``, ``reset()``. Available now:

* :class:`DemoStoryEvaluator` -> ``fid_demo``, ``char_f1``, ``frame_acc`` from a :class:`CharacterClassifier`
  the project trains itself (:func:`train_character_classifier`);
* the torchmetrics building blocks :class:`CharacterScores` (StoryDALL-E's Char-F1 / Frame-Acc) and
  :class:`DemoFID` (Fréchet distance in the classifier's feature space, never to be called FID).

The published evaluators (Inception FID, the datasets' Inception-v3 character classifiers, CLIP score) are
meant to be further :class:`StoryMetric` implementations combined with these in a :class:`StoryMetricSuite`.
"""

from storyexp.metrics.base import StoryMetric, StoryMetricSuite
from storyexp.metrics.character_classifier import (
    CharacterClassifier,
    load_classifier,
    save_classifier,
    train_character_classifier,
)
from storyexp.metrics.characters import CharacterScores
from storyexp.metrics.demo_eval import DemoStoryEvaluator
from storyexp.metrics.fid_demo import ClassifierFeatureExtractor, DemoFID

__all__ = [
    "CharacterClassifier",
    "CharacterScores",
    "ClassifierFeatureExtractor",
    "DemoFID",
    "DemoStoryEvaluator",
    "StoryMetric",
    "StoryMetricSuite",
    "load_classifier",
    "save_classifier",
    "train_character_classifier",
]
