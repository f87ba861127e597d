"""Evaluation metrics shared by every system.

All story metrics follow :class:`StoryMetric`: ``update(generated, real=None, labels=None, captions=None)`` with
uint8 ``[N, H, W, 3]`` frames, ``compute() -> dict[str, float]``, ``reset()``. Available now:

* :class:`DemoStoryEvaluator` -> ``fid_demo``, ``char_f1``, ``frame_acc`` from a :class:`CharacterClassifier`
  the project trains itself (:class:`CharacterClassifierSystem` through Lightning, driven by
  :func:`train_character_classifier`; cached with a record of what produced it by :func:`ensure_classifier`,
  ``python launch.py task=train_classifier``);
* the torchmetrics building blocks :class:`CharacterScores` (StoryDALL-E's Char-F1 / Frame-Acc) and
  :class:`DemoFID` (Fréchet distance in the classifier's feature space, never to be called FID).

* :class:`StoryFID` -> ``fid64`` (StoryDALL-E / AR-LDM's PIL 64x64 protocol) or ``fid`` (native): Inception FID
  on pytorch-fid's network and Fréchet distance (``storyexp.metrics.fid``, also ``python -m storyexp.metrics.fid``).

The other published evaluators (the datasets' Inception-v3 character classifiers, CLIP score) are
meant to be further :class:`StoryMetric` implementations combined with these in a :class:`StoryMetricSuite`.
"""

from storyexp.metrics.base import StoryMetric, StoryMetricSuite
from storyexp.metrics.character_classifier import (
    CharacterClassifier,
    load_classifier,
    load_classifier_with_record,
    save_classifier,
)
from storyexp.metrics.characters import CharacterScores
from storyexp.metrics.classifier_cache import ensure_classifier, load_prepared_classifier
from storyexp.metrics.classifier_system import CharacterClassifierSystem, train_character_classifier
from storyexp.metrics.demo_eval import DemoStoryEvaluator
from storyexp.metrics.fid_demo import ClassifierFeatureExtractor, DemoFID

__all__ = [
    "CharacterClassifier",
    "CharacterClassifierSystem",
    "CharacterScores",
    "ClassifierFeatureExtractor",
    "DemoFID",
    "DemoStoryEvaluator",
    "StoryMetric",
    "StoryFID",
    "StoryMetricSuite",
    "ensure_classifier",
    "load_classifier",
    "load_classifier_with_record",
    "load_prepared_classifier",
    "save_classifier",
    "train_character_classifier",
]


def __getattr__(name: str):
    # StoryFID is imported on first use: `python -m storyexp.metrics.fid` then runs a module the package has not
    # imported yet (no runpy warning), and importing the package does not pull in pytorch-fid / scipy.
    if name == "StoryFID":
        from storyexp.metrics.fid import StoryFID

        return StoryFID
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
