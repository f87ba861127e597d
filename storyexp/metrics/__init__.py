"""Evaluation metrics shared by every system.

All story metrics follow :class:`StoryMetric`: ``update(generated, real=None, labels=None, *, captions=None,
stories=None)`` with uint8 ``[N, H, W, 3]`` frames, ``compute() -> dict[str, float]``, ``reset()``. The names
``eval.metrics`` can use, and how each is built from a run, are in :mod:`storyexp.metrics.registry`:

* ``fid`` -> :class:`~storyexp.metrics.fid_reference.SplitFID`: Inception FID on pytorch-fid's network and Fréchet
  distance, ``fid64`` (StoryDALL-E / AR-LDM's PIL 64x64 protocol) and ``fid`` (native) (:class:`StoryFID`,
  ``python -m storyexp.metrics.fid``), against the split's cached reference statistics;
* ``characters`` -> :class:`CharacterMetric`: Char-F1 / Frame-Acc (:class:`CharacterScores`, torchmetrics'
  multilabel F1 and exact match) under a character classifier: the published Inception-v3
  (:class:`InceptionCharacterClassifier`, :func:`load_published_classifier`) or the project's own
  (:class:`CharacterClassifier`, trained through Lightning by :func:`train_character_classifier`, cached with a
  record by :func:`ensure_classifier`, ``python launch.py task=train_classifier``);
* ``fid_demo`` -> :class:`ClassifierFIDMetric`: a Fréchet distance in that classifier's features (:class:`DemoFID`;
  never to be called FID);
* ``clip`` -> :class:`~storyexp.metrics.clip_scores.StoryCLIPScores`: CLIP score and story consistency.
"""

from storyexp.metrics.base import StoryMetric, StoryMetricSuite
from storyexp.metrics.character_classifier import (
    CharacterClassifier,
    CharacterClassifierBase,
    load_classifier,
    load_classifier_with_record,
    save_classifier,
)
from storyexp.metrics.characters import CharacterScores
from storyexp.metrics.classifier_cache import CLASSIFIER_METRICS, ensure_classifier, load_prepared_classifier
from storyexp.metrics.classifier_metrics import CharacterMetric, ClassifierFIDMetric
from storyexp.metrics.classifier_system import (
    CharacterClassifierSystem,
    InceptionClassifierSystem,
    train_character_classifier,
)
from storyexp.metrics.fid_demo import ClassifierFeatureExtractor, DemoFID
from storyexp.metrics.inception_classifier import InceptionCharacterClassifier, load_published_classifier
from storyexp.metrics.registry import METRICS, MetricContext, MetricUnavailable, build_metric

__all__ = [
    "CLASSIFIER_METRICS",
    "METRICS",
    "CharacterClassifier",
    "CharacterClassifierBase",
    "CharacterClassifierSystem",
    "CharacterMetric",
    "CharacterScores",
    "ClassifierFIDMetric",
    "ClassifierFeatureExtractor",
    "DemoFID",
    "InceptionCharacterClassifier",
    "InceptionClassifierSystem",
    "MetricContext",
    "MetricUnavailable",
    "StoryFID",
    "StoryMetric",
    "StoryMetricSuite",
    "build_metric",
    "ensure_classifier",
    "load_classifier",
    "load_classifier_with_record",
    "load_prepared_classifier",
    "load_published_classifier",
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
