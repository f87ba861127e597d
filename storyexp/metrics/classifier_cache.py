"""The character classifier: prepared by a task before evaluation, loaded (never trained) by the callback.

``ensure_classifier(eval_cfg, datamodule, output_dir=...)`` returns the path of a classifier that belongs to this
run. It is needed when ``eval.metrics`` names one of `CLASSIFIER_METRICS` and the dataset has character labels.

**Published** (``eval.classifier.checkpoint`` set; ``eval/classifier=inception_v3``): StoryDALL-E's Inception-v3
file, in the original's layout and without a record. Nothing is trained: the file is loaded and checked against
the dataset's characters, and its path returned. ``load_prepared_classifier`` returns it with ``published=True``;
the quality floor does not apply (there is no record to read it from).

**Project-trained** (``checkpoint: null``), either ``eval.classifier.arch`` (``small_cnn`` / ``inception_v3``):
trained first (through Lightning, :func:`train_character_classifier`) when missing or stale. The file carries a
:mod:`storyexp.utils.cache` record:

* ``config``: the training settings and network sizes read from ``eval.classifier`` (`SETTINGS_BY_ARCH`), with
  ``num_classes`` and ``class_names``. ``small_cnn``: ``epochs``, ``batch_size``, ``lr``, ``seed``,
  ``weight_decay``, ``augment``, ``max_shift``, ``hflip``, ``input_size``, ``channels`` (no ``arch`` key: the
  record files written before there was a choice, which stay valid). ``inception_v3``: ``arch``, ``epochs``,
  ``batch_size``, ``lr``, ``seed``, ``weight_decay``, ``hflip``, ``input_size``, ``aux_weight``,
  ``width_divisor``, ``init_weights``;
* ``data``: the fingerprint of the train and val splits it was trained and selected on;
* ``quality``: ``val_frame_acc`` / ``val_char_f1`` of the kept epoch, ``best_epoch``, ``train_loss``, frame counts.

A cache whose config or data fingerprint differs is rebuilt (one log line says why). A cache whose
``val_frame_acc`` is below ``eval.classifier.min_val_frame_acc`` is refused with one `ConfigurationError` line
(a freshly trained one too, after it is written, so its record can be inspected). When the train or val split is
limited (``data.limit_train`` / ``data.limit_val``), the shared ``eval.classifier.path`` is neither read nor
written: the classifier is trained into the run's own ``eval.classifier.run_path`` (default: the output
directory).

``load_prepared_classifier`` is what `storyexp.callbacks.StoryEvaluation` calls in ``setup``: the same path, the
same record and quality checks, and a one-line `ConfigurationError` (run ``task=train_classifier``) instead of
training. Every classifier it returns has ``published`` set (True only for ``eval.classifier.checkpoint``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from storyexp.errors import ConfigurationError
from storyexp.utils.cache import cache_path, check_quality, data_fingerprint, make_record, matches, plain

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_METRICS",
    "INCEPTION_SETTINGS",
    "KIND",
    "SETTINGS_BY_ARCH",
    "classifier_arch",
    "classifier_path",
    "classifier_settings",
    "ensure_classifier",
    "expected_record",
    "has_labels",
    "load_prepared_classifier",
    "needs_classifier",
    "split_frames_and_labels",
]

KIND = "character_classifier"

# eval.metrics names that need the character classifier
CLASSIFIER_METRICS = ("characters", "fid_demo")

# eval.classifier keys that define the trained network (recorded and compared), with their defaults, per arch
SETTINGS = {
    "epochs": 4,
    "batch_size": 128,
    "lr": 2e-3,
    "seed": 0,
    "weight_decay": 1e-4,
    "augment": True,
    "max_shift": 2,
    "hflip": True,
    "input_size": 32,
    "channels": [24, 48, 96],
}
INCEPTION_SETTINGS = {  # StoryDALL-E's recipe (reference/storydalle.md §6.2)
    "epochs": 50,
    "batch_size": 32,
    "lr": 1e-5,
    "seed": 0,
    "weight_decay": 0.0,
    "hflip": True,
    "input_size": 299,
    "aux_weight": 0.4,
    "width_divisor": 1,
    "init_weights": None,
}
SETTINGS_BY_ARCH = {"small_cnn": SETTINGS, "inception_v3": INCEPTION_SETTINGS}
FLOOR_KEY = "eval.classifier.min_val_frame_acc"
DEFAULT_FLOOR = 0.9


def classifier_arch(clf_cfg: Mapping[str, Any]) -> str:
    """``eval.classifier.arch`` (default ``small_cnn``), checked."""
    arch = str(plain(clf_cfg).get("arch") or "small_cnn")
    if arch not in SETTINGS_BY_ARCH:
        raise ConfigurationError(f"eval.classifier.arch={arch} is unknown; known: {', '.join(SETTINGS_BY_ARCH)}.")
    return arch


def classifier_settings(clf_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings and network sizes of ``eval.classifier`` for its arch (defaults for the keys it
    lacks)."""
    clf_cfg = plain(clf_cfg)
    out = {}
    for key, default in SETTINGS_BY_ARCH[classifier_arch(clf_cfg)].items():
        value = clf_cfg.get(key, default)
        if key == "channels":
            out[key] = [int(v) for v in value]
        elif key == "init_weights":
            out[key] = None if value in (None, "") else str(value)
        else:
            out[key] = type(default)(value)
    return out


def expected_record(clf_cfg: Mapping[str, Any], characters: list[str], fingerprint: dict[str, Any]) -> dict:
    settings = classifier_settings(clf_cfg)
    arch = classifier_arch(clf_cfg)
    # the small CNN's record has no "arch": the caches written before there was a choice stay valid
    head = {} if arch == "small_cnn" else {"arch": arch}
    config = {**head, **settings, "num_classes": len(characters), "class_names": list(characters)}
    return {"kind": KIND, "config": config, "data": fingerprint}


def classifier_path(clf_cfg: Mapping[str, Any], fingerprint: dict[str, Any], output_dir: str | Path | None) -> Path:
    """``eval.classifier.path``, or, on limited data, ``eval.classifier.run_path`` / the run's output dir."""
    clf_cfg = plain(clf_cfg)
    if not clf_cfg.get("path"):
        raise ConfigurationError("eval.classifier.path is not set: it names the cached character classifier.")
    return cache_path(clf_cfg["path"], fingerprint, output_dir, run_path=clf_cfg.get("run_path"))


def _floor(clf_cfg: Mapping[str, Any]) -> float | None:
    value = plain(clf_cfg).get("min_val_frame_acc", DEFAULT_FLOOR)
    return None if value is None else float(value)


def _check_quality(record: Mapping[str, Any], path: Path, clf_cfg: Mapping[str, Any], data_name: str) -> None:
    check_quality(
        record, path, {"val_frame_acc": (FLOOR_KEY, _floor(clf_cfg), "min")}, what="Character classifier",
        fix=(f"train it longer or on more data (eval.classifier.epochs, data={data_name} without limits; the "
             f"cache is then rebuilt by `python launch.py task=train_classifier`), or lower {FLOOR_KEY}."),
    )


def has_labels(datamodule) -> bool:
    """Whether the dataset has per-frame character labels (its first training story has them)."""
    stories = datamodule.stories(getattr(datamodule, "train_split", "train"))
    return len(stories) > 0 and stories[0].labels is not None


def split_frames_and_labels(datamodule, split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """All frames of a split as uint8 [N, H, W, 3] with labels [N, C] (None, None when it has none)."""
    stories = datamodule.stories(getattr(datamodule, f"{split}_split", split))
    frames, labels = [], []
    for story in stories:
        if story.labels is None:
            return None, None
        frames.extend(story.frames)
        labels.append(np.asarray(story.labels, dtype=np.float32))
    if not frames:
        return None, None
    return np.stack(frames), np.concatenate(labels)


def _ready(datamodule) -> None:
    """Make ``datamodule.stories`` usable outside a trainer (the demo set is generated on first use)."""
    if not getattr(datamodule, "datasets", None):
        datamodule.prepare_data()
        datamodule.setup("fit")


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def needs_classifier(eval_cfg: Mapping[str, Any]) -> bool:
    """Whether ``eval.metrics`` or ``eval.val_metrics.metrics`` (during training) names a metric that needs the
    character classifier (`CLASSIFIER_METRICS`)."""
    eval_cfg = plain(eval_cfg)
    names = [*(eval_cfg.get("metrics") or []), *((eval_cfg.get("val_metrics") or {}).get("metrics") or [])]
    return any(name in CLASSIFIER_METRICS for name in names)


def _published_checkpoint(clf_cfg: Mapping[str, Any]) -> Path | None:
    """``eval.classifier.checkpoint`` (a published Inception-v3 file), or None."""
    checkpoint = plain(clf_cfg).get("checkpoint")
    if not checkpoint:
        return None
    arch = classifier_arch(clf_cfg)
    if arch != "inception_v3":
        raise ConfigurationError(
            f"eval.classifier.checkpoint={checkpoint} is a published Inception-v3 classifier, but "
            f"eval.classifier.arch is {arch}: select it with eval/classifier=inception_v3.")
    return Path(checkpoint)


def _load_published(path: Path, characters: list[str], data_name: str | None):
    from storyexp.metrics.inception_classifier import load_published_classifier

    return load_published_classifier(path, class_names=characters, dataset=data_name)


def ensure_classifier(eval_cfg: Mapping[str, Any], datamodule, *, output_dir: str | Path | None,
                      trainer_kwargs: dict[str, Any] | None = None) -> Path | None:
    """The path of a valid classifier for this run's data: the published ``eval.classifier.checkpoint`` (checked,
    never trained), or a cached one, trained first when missing or stale.

    ``eval_cfg``: the ``eval`` config block (``metrics``, ``classifier``); ``trainer_kwargs`` override the
    `lightning.Trainer` arguments of the training (default: ``eval.classifier.trainer``, one CPU device); the
    run's ``output_dir`` is where a limited run trains into when ``eval.classifier.run_path`` is not set.
    Returns None when ``eval.metrics`` names none of `CLASSIFIER_METRICS` or the dataset has no character labels.
    On a process other than global rank 0 nothing is checked or trained (rank 0 prepares the file before the
    trainer's processes meet): the path is returned. Raises `ConfigurationError` when the (cached or new)
    classifier misses ``eval.classifier.min_val_frame_acc``; a published file that is missing or does not fit the
    dataset's characters raises the loader's one-line error.
    """
    from storyexp.metrics.character_classifier import load_classifier_with_record, save_classifier
    from storyexp.metrics.classifier_system import train_character_classifier

    eval_cfg = plain(eval_cfg)
    if not needs_classifier(eval_cfg):
        return None
    clf_cfg = eval_cfg.get("classifier") or {}
    if not clf_cfg:
        raise ConfigurationError(f"eval.metrics contains one of {list(CLASSIFIER_METRICS)} but eval.classifier is "
                                 "not configured.")
    published = _published_checkpoint(clf_cfg)
    _ready(datamodule)
    characters = list(getattr(datamodule, "characters", []) or [])
    if not characters or not has_labels(datamodule):
        log.info("The dataset has no character labels: no character classifier is needed.")
        return None
    if published is not None:
        if _rank() == 0:
            classifier = _load_published(published, characters, getattr(datamodule, "name", None))
            log.info("Using the published character classifier %s (Inception-v3, %d characters, width 1/%d); "
                     "nothing to train.", published, classifier.num_classes, classifier.width_divisor)
        return published
    fingerprint = data_fingerprint(datamodule)
    path = classifier_path(clf_cfg, fingerprint, output_dir)
    if _rank() != 0:
        return path
    expected = expected_record(clf_cfg, characters, fingerprint)
    name = fingerprint["dataset"]
    if path.is_file():
        try:
            _, record = load_classifier_with_record(path)
            ok, reason = matches(record, expected)
        except Exception as err:  # noqa: BLE001 (an unreadable cache is rebuilt, not trusted)
            ok, reason = False, f"it is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        if ok:
            _check_quality(record, path, clf_cfg, name)
            log.info("Character classifier %s is up to date (val frame accuracy %.3f).", path,
                     record["quality"].get("val_frame_acc", float("nan")))
            return path
        log.warning("Rebuilding the character classifier %s: %s.", path, reason)
    else:
        log.info("Training the character classifier (cached at %s).", path)

    settings = classifier_settings(clf_cfg)
    frames, labels = split_frames_and_labels(datamodule, "train")
    val_frames, val_labels = split_frames_and_labels(datamodule, "val")
    classifier, report = train_character_classifier(
        frames, labels, arch=classifier_arch(clf_cfg), val_frames=val_frames, val_labels=val_labels,
        class_names=characters,
        trainer_kwargs=dict(clf_cfg.get("trainer") or {}) if trainer_kwargs is None else trainer_kwargs, **settings,
    )
    quality = {"train_loss": report["train_loss"][-1], "best_epoch": report["best_epoch"],
               "num_train_frames": report["num_train_frames"], "num_val_frames": report.get("num_val_frames", 0)}
    if "best_val_frame_acc" in report:
        quality.update(val_frame_acc=report["best_val_frame_acc"], val_char_f1=report["best_val_char_f1"])
    record = make_record(KIND, expected["config"], fingerprint, quality)
    save_classifier(classifier, path, record=record)
    log.info("Character classifier written to %s in %.1f s: %s", path, report["train_time_s"], quality)
    _check_quality(record, path, clf_cfg, name)
    return path


def load_prepared_classifier(clf_cfg: Mapping[str, Any], datamodule, *, output_dir: str | Path | None,
                             characters: list[str] | None = None):
    """The prepared classifier for this run's data (eval mode), checked against its record; never trains.

    With ``eval.classifier.checkpoint``: the published file, ``published=True`` (one line from the loader when it
    is missing, with where it is published, or does not fit). Otherwise the cached one, ``published=False``; one
    `ConfigurationError` line when it is missing, unreadable, stale or below the quality floor.
    """
    from storyexp.metrics.character_classifier import load_classifier_with_record

    clf_cfg = plain(clf_cfg)
    characters = list(characters or getattr(datamodule, "characters", []) or [])
    published = _published_checkpoint(clf_cfg)
    if published is not None:
        classifier = _load_published(published, characters, getattr(datamodule, "name", None))
        classifier.published = True
        return classifier
    fingerprint = data_fingerprint(datamodule)
    path = classifier_path(clf_cfg, fingerprint, output_dir)
    name = fingerprint["dataset"]
    arch = classifier_arch(clf_cfg)
    select = "" if arch == "small_cnn" else f" eval/classifier={arch}"
    command = (f"`python launch.py task=train_classifier data={name}{select}` (with this run's data and eval "
               "overrides)")
    if not path.is_file():
        raise ConfigurationError(
            f"Character classifier {path} is not prepared: run {command} first (task=train and task=eval prepare "
            "it before testing)."
        )
    try:
        classifier, record = load_classifier_with_record(path)
    except Exception as err:  # noqa: BLE001 (one line naming the file and the fix)
        raise ConfigurationError(f"Character classifier {path} cannot be read ({str(err).splitlines()[0]}); "
                                 f"rebuild it with {command}.") from None
    ok, reason = matches(record, expected_record(clf_cfg, characters, fingerprint))
    if not ok:
        raise ConfigurationError(f"Character classifier {path} does not belong to this run: {reason}; rebuild it "
                                 f"with {command}.")
    _check_quality(record, path, clf_cfg, name)
    classifier.published = False
    return classifier
