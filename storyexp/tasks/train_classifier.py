"""task=train_classifier: train the dataset's character classifier (the character metrics' scorer) and cache it.

    python launch.py task=train_classifier data=demo
    python launch.py task=train_classifier data=pororo eval/classifier=inception_v3   # StoryDALL-E's recipe

Trains the `eval.classifier.arch` network (`small_cnn`: `storyexp.metrics.CharacterClassifierSystem`;
`inception_v3`: `InceptionClassifierSystem`) through Lightning on the training split (best epoch by validation
frame accuracy) with the `eval.classifier` settings, and writes it with its record (settings, data fingerprint,
quality) to `eval.classifier.path` — or, when `data.limit_train` / `data.limit_val` is set, to the run's own
`eval.classifier.run_path` (a limited run never writes the shared cache). A cache that already belongs to this
data and these settings is kept (training is deterministic: it would come out the same). With
`eval.classifier.checkpoint` set (a published classifier) nothing is trained: the file is checked against the
dataset's characters. Refused with one line when the dataset has no character labels, or when the classifier
misses `eval.classifier.min_val_frame_acc`. Writes `metrics.json` (`classifier/val_frame_acc`, ...) and returns it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from storyexp.errors import ConfigurationError

log = logging.getLogger("storyexp")


def _build_datamodule(cfg: DictConfig):
    try:
        from storyexp.tasks.common import build_datamodule
    except ImportError:  # pragma: no cover (before the tasks package existed)
        import hydra

        return hydra.utils.instantiate(cfg.data, _convert_="all")
    return build_datamodule(cfg)


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    from storyexp.metrics.character_classifier import load_classifier_with_record
    from storyexp.metrics.classifier_cache import CLASSIFIER_METRICS, ensure_classifier
    from storyexp.utils.cache import plain
    from storyexp.utils.io import atomic_write_text

    datamodule = _build_datamodule(cfg)
    eval_cfg = plain(cfg.eval)
    # this task is asked for the classifier, whatever the test metrics are
    eval_cfg["metrics"] = sorted({*(eval_cfg.get("metrics") or []), CLASSIFIER_METRICS[0]})
    output_dir = Path(cfg.paths.output_dir)
    path = ensure_classifier(eval_cfg, datamodule, output_dir=output_dir)
    if path is None:
        raise ConfigurationError(
            f"data={getattr(datamodule, 'name', '?')} has no per-frame character labels: there is no character "
            "classifier to train (its test metrics are the loss only)."
        )
    published = bool((eval_cfg.get("classifier") or {}).get("checkpoint"))
    if published:  # checked by ensure_classifier; a published file has no record
        record, metrics = None, {}
        log.info("eval.classifier.checkpoint=%s is a published classifier: nothing to train.", path)
    else:
        _, record = load_classifier_with_record(path)
        quality = (record or {}).get("quality") or {}
        metrics = {f"classifier/{k}": float(v) for k, v in sorted(quality.items())
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = {"metrics": metrics, "classifier": str(path), "published": published, "record": record}
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("Character classifier %s: %s", path, metrics)
    return metrics


run = train_classifier  # the tasks package's convention: storyexp.tasks.<module>.run(cfg)
