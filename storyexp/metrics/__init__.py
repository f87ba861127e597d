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

from typing import TYPE_CHECKING, Any

# name -> module: every name is imported on first use (PEP 562), so importing one light module of the package
# (the registry, when a task validates its config) does not pull in torchmetrics, torchvision or pytorch-fid,
# and `python -m storyexp.metrics.fid` runs a module the package has not imported yet
_EXPORTS = {
    "StoryMetric": "base", "StoryMetricSuite": "base",
    "CharacterClassifier": "character_classifier", "CharacterClassifierBase": "character_classifier",
    "load_classifier": "character_classifier", "load_classifier_with_record": "character_classifier",
    "save_classifier": "character_classifier",
    "CharacterScores": "characters",
    "CLASSIFIER_METRICS": "classifier_cache", "ensure_classifier": "classifier_cache",
    "load_prepared_classifier": "classifier_cache",
    "CharacterMetric": "classifier_metrics", "ClassifierFIDMetric": "classifier_metrics",
    "CharacterClassifierSystem": "classifier_system", "InceptionClassifierSystem": "classifier_system",
    "train_character_classifier": "classifier_system",
    "ClassifierFeatureExtractor": "fid_demo", "DemoFID": "fid_demo",
    "StoryFID": "fid",
    "InceptionCharacterClassifier": "inception_classifier", "load_published_classifier": "inception_classifier",
    "METRICS": "registry", "MetricContext": "registry", "MetricUnavailable": "registry", "build_metric": "registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from storyexp.metrics.base import StoryMetric, StoryMetricSuite  # noqa: F401
    from storyexp.metrics.fid import StoryFID  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"storyexp.metrics.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
