"""Networks the project trains itself and caches (the demo's character classifier, the demo's stage-1 VQGAN).

Every cache records what produced it (config, data fingerprint, its own quality) and is rebuilt when the config or
the data differs, refused with one line when its quality is below the configured floor, and never written by a run
on limited data. The test callback only loads the classifier; task=train_classifier (or the train / eval tasks)
prepares it. Real networks at tiny sizes, the tiny demo set of tests/conftest.py (seconds each).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import storyexp.metrics.character_classifier as character_classifier
import storyexp.metrics.classifier_system as classifier_system
from storyexp.callbacks import StoryEvaluation
from storyexp.data.demo import generate_demo_story
from storyexp.errors import ConfigurationError
from storyexp.metrics import ensure_classifier, load_classifier_with_record, load_prepared_classifier
from storyexp.models.vqgan import VQGANConfig
from storyexp.systems.vqgan_training import load_or_fit_vqgan, stage1_cache
from storyexp.tasks import build_datamodule
from storyexp.tasks.train_classifier import train_classifier
from storyexp.utils.cache import (
    RECORD_FORMAT,
    cache_path,
    check_quality,
    data_fingerprint,
    frames_fingerprint,
    make_record,
    matches,
)

from .conftest import TINY_DEMO, compose_cfg

# a classifier that reaches validation frame accuracy 1.0 on the tiny demo set in about a second
CLF = ["eval.classifier.epochs=4", "eval.classifier.batch_size=16", "eval.classifier.lr=3e-3"]
FLOOR_KEY = "eval.classifier.min_val_frame_acc"


def demo_cfg(tmp_path: Path, data_dir: Path, *extra: str):
    """The real config tree with the tiny demo set; the shared classifier cache under tmp_path/shared."""
    shared = tmp_path / "shared" / "character_classifier_demo.pt"
    return compose_cfg([*TINY_DEMO, *CLF, f"eval.classifier.path={shared}", *extra], tmp_path, data_dir=data_dir)


def datamodule(cfg):
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def trainings(monkeypatch) -> list[int]:
    """Counts the classifier trainings (each is a lightning fit of CharacterClassifierSystem)."""
    calls: list[int] = []
    real = classifier_system.train_character_classifier

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(classifier_system, "train_character_classifier", counted)
    return calls


def record_of(path: Path) -> dict:
    return load_classifier_with_record(path)[1]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------- records


def test_record_matching_and_reasons():
    data = {"dataset": "demo", "path": "/data/demo.h5", "splits": {"train": 48, "val": 8}, "limited": False,
            "sha256": "ab"}
    record = make_record("character_classifier", {"epochs": 4, "lr": 2e-3, "channels": (24, 48)}, data,
                         {"val_frame_acc": 1.0})
    assert record["format_version"] == RECORD_FORMAT and record["config"]["channels"] == [24, 48]
    assert json.loads(json.dumps(record)) == record  # plain types only (weights_only torch files, JSON metadata)
    expected = {"kind": "character_classifier", "config": {"epochs": 4, "lr": 0.002, "channels": [24, 48]},
                "data": {**data, "path": "/moved/demo.h5"}}  # the same data elsewhere is the same data
    assert matches(record, expected) == (True, "")
    ok, reason = matches(record, {**expected, "config": {**expected["config"], "epochs": 1}})
    assert not ok and reason == "config differs: epochs: 4 -> 1"
    ok, reason = matches(record, {**expected, "data": {**data, "splits": {"train": 16, "val": 8}, "limited": True}})
    assert not ok and reason.startswith("data fingerprint differs:") and "splits.train: 48 -> 16" in reason
    assert "limited: false -> true" in reason
    assert not matches(None, expected)[0] and "no record" in matches(None, expected)[1]
    assert "format_version" in matches({**record, "format_version": 0}, expected)[1]
    assert not matches(record, {**expected, "kind": "stage1_vqgan"})[0]


def test_quality_floor_refusal_is_one_line_naming_file_figure_and_fix():
    floors = {"val_frame_acc": (FLOOR_KEY, 0.9, "min")}
    good = make_record("character_classifier", {}, {}, {"val_frame_acc": 0.95})
    check_quality(good, "/c/clf.pt", floors, what="Character classifier", fix="train it longer.")
    bad = make_record("character_classifier", {}, {}, {"val_frame_acc": 0.0})
    with pytest.raises(ConfigurationError) as err:
        check_quality(bad, "/c/clf.pt", floors, what="Character classifier", fix="train it longer.")
    message = one_line(err)
    assert "/c/clf.pt" in message and "val_frame_acc 0 is below" in message and f"{FLOOR_KEY}=0.9" in message
    assert message.endswith("train it longer.")
    check_quality(bad, "/c/clf.pt", {"val_frame_acc": (FLOOR_KEY, None, "min")}, what="x", fix="y")  # no floor
    with pytest.raises(ConfigurationError, match="records no val_frame_acc"):  # no validation split
        check_quality(make_record("k", {}, {}, {}), "/c/clf.pt", floors, what="x", fix="y")
    with pytest.raises(ConfigurationError, match="mae 30 is above .*max_mae=20"):
        check_quality(make_record("k", {}, {}, {"mae": 30.0}), "/v.ckpt", {"mae": ("max_mae", 20.0, "max")},
                      what="Cached VQGAN stage 1", fix="fit longer.")


def test_data_fingerprint_follows_the_data_and_its_limits(shared_data_dir, tmp_path):
    full = data_fingerprint(datamodule(demo_cfg(tmp_path, shared_data_dir)))
    assert full == data_fingerprint(datamodule(demo_cfg(tmp_path, shared_data_dir)))  # deterministic
    assert full["dataset"] == "demo" and full["splits"] == {"train": 48, "val": 8} and not full["limited"]
    limited = data_fingerprint(datamodule(demo_cfg(tmp_path, shared_data_dir, "data.limit_train=16")))
    assert limited["limited"] and limited["limits"]["train"] == 16 and limited["splits"]["train"] == 16
    assert limited["sha256"] != full["sha256"]
    other = data_fingerprint(datamodule(demo_cfg(tmp_path, shared_data_dir, "data.demo.n_train=40")))
    assert other["sha256"] != full["sha256"] and not other["limited"]
    # only the test split limited: the classifier's data (train, val) is the full data
    assert data_fingerprint(datamodule(demo_cfg(tmp_path, shared_data_dir, "data.limit_test=2"))) == full

    assert cache_path("/shared/c.pt", full, tmp_path) == Path("/shared/c.pt")
    assert cache_path("/shared/c.pt", limited, tmp_path) == tmp_path / "c.pt"
    assert cache_path("/shared/c.pt", limited, None, run_path=tmp_path / "r.pt") == tmp_path / "r.pt"
    with pytest.raises(ConfigurationError, match="limited"):
        cache_path("/shared/c.pt", limited, None)


# -------------------------------------------------------------------------------- character classifier


def test_ensure_classifier_trains_records_and_reuses(shared_data_dir, tmp_path, trainings, caplog):
    caplog.set_level(logging.INFO, logger="storyexp")
    cfg = demo_cfg(tmp_path, shared_data_dir)
    dm = datamodule(cfg)
    path = ensure_classifier(cfg.eval, dm, output_dir=cfg.paths.output_dir)
    assert path == Path(cfg.eval.classifier.path) and path.is_file() and trainings == [240]
    record = record_of(path)
    assert record["kind"] == "character_classifier" and record["format_version"] == RECORD_FORMAT
    config = record["config"]
    assert (config["epochs"], config["batch_size"], config["lr"], config["seed"]) == (4, 16, 3e-3, 0)
    assert config["class_names"] == list(cfg.data.characters) and config["channels"] == [24, 48, 96]
    assert record["data"] == data_fingerprint(dm)
    assert record["quality"]["val_frame_acc"] >= 0.9 and record["quality"]["num_val_frames"] == 40

    written = path.stat().st_mtime_ns
    caplog.clear()
    assert ensure_classifier(cfg.eval, datamodule(cfg), output_dir=cfg.paths.output_dir) == path
    assert trainings == [240] and path.stat().st_mtime_ns == written  # reused, not retrained
    assert "is up to date" in caplog.text
    classifier = load_prepared_classifier(cfg.eval.classifier, dm, output_dir=cfg.paths.output_dir)
    assert classifier.class_names == list(cfg.data.characters) and not classifier.training
    # nothing to prepare without the demo metric
    assert ensure_classifier({**dict(cfg.eval), "metrics": []}, dm, output_dir=tmp_path) is None


def test_a_cache_with_other_settings_or_data_is_rebuilt(shared_data_dir, tmp_path, trainings, caplog):
    caplog.set_level(logging.INFO, logger="storyexp")
    cfg = demo_cfg(tmp_path, shared_data_dir)
    path = ensure_classifier(cfg.eval, datamodule(cfg), output_dir=cfg.paths.output_dir)
    before = record_of(path)

    caplog.clear()
    longer = demo_cfg(tmp_path, shared_data_dir, "eval.classifier.epochs=5")
    assert ensure_classifier(longer.eval, datamodule(longer), output_dir=longer.paths.output_dir) == path
    assert len(trainings) == 2 and record_of(path)["config"]["epochs"] == 5
    lines = [r.getMessage() for r in caplog.records if "Rebuilding" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and str(path) in lines[0]
    assert "config differs: epochs: 4 -> 5" in lines[0]

    caplog.clear()
    other = demo_cfg(tmp_path, shared_data_dir, "eval.classifier.epochs=5", "data.demo.n_train=40")
    dm = datamodule(other)
    assert ensure_classifier(other.eval, dm, output_dir=other.paths.output_dir) == path
    assert len(trainings) == 3 and trainings[-1] == 200
    after = record_of(path)
    assert after["data"] == data_fingerprint(dm) and after["data"]["sha256"] != before["data"]["sha256"]
    lines = [r.getMessage() for r in caplog.records if "Rebuilding" in r.getMessage()]
    assert len(lines) == 1 and "data fingerprint differs" in lines[0] and "splits.train: 48 -> 40" in lines[0]


def test_a_cache_below_the_quality_floor_is_refused(shared_data_dir, tmp_path, trainings):
    # the case: a classifier trained too briefly (validation frame accuracy 0.0) is never used silently
    weak = demo_cfg(tmp_path, shared_data_dir, "eval.classifier.epochs=1", "eval.classifier.batch_size=128")
    dm = datamodule(weak)
    with pytest.raises(ConfigurationError) as err:
        ensure_classifier(weak.eval, dm, output_dir=weak.paths.output_dir)
    message = one_line(err)
    path = Path(weak.eval.classifier.path)
    assert str(path) in message and "val_frame_acc 0 is below" in message and f"{FLOOR_KEY}=0.9" in message
    assert "eval.classifier.epochs" in message  # the fix
    assert path.is_file() and record_of(path)["quality"]["val_frame_acc"] < 0.9  # written, with its record
    # a later run with the same settings refuses the cache without training again, and so does the callback
    with pytest.raises(ConfigurationError, match="is refused"):
        ensure_classifier(weak.eval, dm, output_dir=weak.paths.output_dir)
    with pytest.raises(ConfigurationError, match="is refused"):
        load_prepared_classifier(weak.eval.classifier, dm, output_dir=weak.paths.output_dir)
    assert len(trainings) == 1
    # a lower floor (or none) accepts it
    lax = demo_cfg(tmp_path, shared_data_dir, "eval.classifier.epochs=1", "eval.classifier.batch_size=128",
                   f"{FLOOR_KEY}=null")
    assert ensure_classifier(lax.eval, dm, output_dir=lax.paths.output_dir) == path and len(trainings) == 1


def test_a_limited_run_never_reads_or_writes_the_shared_cache(shared_data_dir, tmp_path, trainings, monkeypatch):
    # (16 training stories are too few for the quality floor: the point here is where the file goes)
    limited = demo_cfg(tmp_path / "a", shared_data_dir, "data.limit_train=16", f"{FLOOR_KEY}=null")
    shared = Path(limited.eval.classifier.path)
    path = ensure_classifier(limited.eval, datamodule(limited), output_dir=limited.paths.output_dir)
    assert path == Path(limited.paths.output_dir) / "character_classifier_demo.pt" == \
        Path(limited.eval.classifier.run_path)
    assert path.is_file() and not shared.exists() and trainings == [80]
    assert record_of(path)["data"]["limited"] and record_of(path)["data"]["limits"]["train"] == 16

    # with a valid shared cache in place, another limited run still trains into its own folder, reading only that
    full = demo_cfg(tmp_path / "a", shared_data_dir)
    assert ensure_classifier(full.eval, datamodule(full), output_dir=full.paths.output_dir) == shared
    written = shared.stat().st_mtime_ns
    loaded = []
    real_load = character_classifier.load_classifier_with_record
    monkeypatch.setattr(character_classifier, "load_classifier_with_record",
                        lambda p, **kw: loaded.append(Path(p)) or real_load(p, **kw))
    again = demo_cfg(tmp_path / "b", shared_data_dir, "data.limit_train=16", f"{FLOOR_KEY}=null")
    path_b = ensure_classifier(again.eval, datamodule(again), output_dir=again.paths.output_dir)
    assert path_b.parent == Path(again.paths.output_dir) and path_b.is_file() and len(trainings) == 3
    assert shared not in loaded and shared.stat().st_mtime_ns == written


def tiny_vqgan_system():
    from storyexp.systems.vqgan import VQGANSystem

    network = {"embed_dim": 8, "n_embed": 32, "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1],
                                                          "num_res_blocks": 1, "attn_resolutions": [8],
                                                          "z_channels": 8}}
    return VQGANSystem(image_size=16, network=network, seed=0)


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_the_test_callback_only_loads_the_prepared_classifier(shared_data_dir, tmp_path, trainings):
    cfg = demo_cfg(tmp_path, shared_data_dir)
    clf_cfg = dict(cfg.eval.classifier)

    def test_run(classifier_cfg):
        evaluation = StoryEvaluation(dirpath=str(tmp_path / "grids"), eval_cfg={"classifier": classifier_cfg},
                                     num_grid_stories=0, metrics=["characters", "fid_demo"], baseline=None,
                                     characters=list(cfg.data.characters))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_test_batches=1, callbacks=[evaluation],
                            default_root_dir=cfg.paths.output_dir)
        trainer.test(tiny_vqgan_system(), datamodule=build_datamodule(cfg))
        return trainer.callback_metrics

    with pytest.raises(ConfigurationError) as err:  # nothing prepared: a one-line message, and no training
        test_run(clf_cfg)
    message = one_line(err)
    assert "is not prepared" in message and "python launch.py task=train_classifier data=demo" in message
    assert clf_cfg["path"] in message and trainings == []

    ensure_classifier(cfg.eval, datamodule(cfg), output_dir=cfg.paths.output_dir)
    metrics = test_run(clf_cfg)
    # the project's own classifier: the *_demo keys (the papers' names are for a published checkpoint)
    assert {"test/frame_acc_demo", "test/char_f1_demo", "test/fid_demo"} <= set(metrics) and len(trainings) == 1

    with pytest.raises(ConfigurationError) as err:  # a cache from other settings is refused, not retrained
        test_run({**clf_cfg, "epochs": 7})
    assert "does not belong to this run: config differs: epochs: 4 -> 7" in one_line(err)
    assert len(trainings) == 1


def test_train_classifier_task_writes_the_cache_with_its_record(shared_data_dir, tmp_path):
    cfg = demo_cfg(tmp_path, shared_data_dir, "task=train_classifier", "eval=loss_only", *CLF)
    metrics = train_classifier(cfg)
    path = Path(cfg.eval.classifier.path)
    record = record_of(path)
    assert record["kind"] == "character_classifier" and record["config"]["epochs"] == 4
    assert record["data"]["dataset"] == "demo" and record["data"]["splits"] == {"train": 48, "val": 8}
    assert metrics["classifier/val_frame_acc"] == record["quality"]["val_frame_acc"] >= 0.9
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "summary.json").read_text())["classifier"] == str(path)
    written = path.stat().st_mtime_ns
    assert train_classifier(cfg) == metrics and path.stat().st_mtime_ns == written  # up to date: kept


# --------------------------------------------------------------------------------------- stage-1 VQGAN


def tiny_config() -> VQGANConfig:
    return VQGANConfig.from_dict({
        "embed_dim": 8, "n_embed": 32,
        "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                    "z_channels": 8},
    })


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack([f for i in range(8) for f in generate_demo_story(0, "train", i, 32).frames])  # [40, ...]


@pytest.fixture
def fits(monkeypatch) -> list[str]:
    """The lightning fits that happen (a refit is one more)."""
    calls: list[str] = []
    real = L.Trainer.fit

    def counted(trainer, model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(trainer, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", counted)
    return calls


FIT = {"steps": 2, "batch_size": 8, "restart_every": 1, "log_every": 1}


def test_stage1_cache_reuses_equal_and_refits_other_config_or_data(frames, tmp_path, fits, caplog):
    caplog.set_level(logging.INFO, logger="storyexp")
    path = tmp_path / "stage1.ckpt"
    read = []

    def frames_fn(lo=0, hi=20):
        read.append((lo, hi))
        return frames[lo:hi]

    first = frames_fingerprint(frames[:20])
    _, report = load_or_fit_vqgan(path, tiny_config(), frames_fn, fingerprint=first, **FIT)
    assert report is not None and fits == ["VQGANSystem"]
    record = torch.load(path, weights_only=True)["record"]
    assert record["kind"] == "stage1_vqgan" and record["data"] == first
    assert record["config"]["network"] == tiny_config().to_dict()
    assert record["config"]["fit"] == {"image_size": 16, "steps": 2, "batch_size": 8, "lr": 2e-3, "betas": [0.5, 0.9],
                                       "beta": 0.25, "seed": 0, "restart_every": 1, "lr_schedule": "cosine"}
    assert 0 < record["quality"]["mae"] < 255 and 0 < record["quality"]["usage"] <= 1
    assert record["quality"]["eval_split"] == "train"

    written = path.stat().st_mtime_ns
    _, report = load_or_fit_vqgan(path, tiny_config(), frames_fn, fingerprint=first, **FIT)
    assert report is None and fits == ["VQGANSystem"] and path.stat().st_mtime_ns == written
    assert read == [(0, 20)]  # the caller's fingerprint stands for the frames: they are not read again

    caplog.clear()
    _, report = load_or_fit_vqgan(path, tiny_config(), frames_fn, fingerprint=first, **{**FIT, "steps": 3})
    assert report is not None and len(fits) == 2
    assert torch.load(path, weights_only=True)["record"]["config"]["fit"]["steps"] == 3
    lines = [r.getMessage() for r in caplog.records if "Refitting" in r.getMessage()]
    assert len(lines) == 1 and "config differs: fit.steps: 2 -> 3" in lines[0]

    caplog.clear()
    second = frames_fingerprint(frames[20:])
    _, report = load_or_fit_vqgan(path, tiny_config(), lambda: frames_fn(20, 40), fingerprint=second,
                                  **{**FIT, "steps": 3})
    assert report is not None and len(fits) == 3 and read[-1] == (20, 40)
    assert torch.load(path, weights_only=True)["record"]["data"] == second
    assert any("data fingerprint differs: sha256" in r.getMessage() for r in caplog.records)


def test_stage1_cache_below_its_quality_floor_is_refused(frames, tmp_path, fits):
    path = tmp_path / "stage1.ckpt"
    with pytest.raises(ConfigurationError) as err:  # a fresh fit that misses the floor: written, then refused
        load_or_fit_vqgan(path, tiny_config(), lambda: frames[:20], max_mae=0.0, **FIT)
    message = one_line(err)
    assert str(path) in message and "mae" in message and "model.network.stage1_fit.max_mae=0.0" in message
    assert path.is_file() and len(fits) == 1
    with pytest.raises(ConfigurationError, match="usage .* is below model.network.stage1_fit.min_usage=1.01"):
        load_or_fit_vqgan(path, tiny_config(), lambda: frames[:20], min_usage=1.01, **FIT)
    assert len(fits) == 1  # the cache matches: refused as it is, not refitted
    vqgan, report = load_or_fit_vqgan(path, tiny_config(), lambda: frames[:20], max_mae=200.0, **FIT)
    assert report is None and len(fits) == 1 and not vqgan.training


def test_stage1_cache_of_a_limited_split_is_the_runs_own(shared_data_dir, tmp_path):
    shared = tmp_path / "shared" / "vqgan.ckpt"
    full = datamodule(demo_cfg(tmp_path, shared_data_dir))
    path, fingerprint = stage1_cache(shared, full, tmp_path / "out")
    assert path == shared and fingerprint == data_fingerprint(full, splits=("train",))
    limited = datamodule(demo_cfg(tmp_path, shared_data_dir, "data.limit_train=4"))
    path, fingerprint = stage1_cache(shared, limited, tmp_path / "out")
    assert path == tmp_path / "out" / "vqgan.ckpt" and fingerprint["limited"]
    assert fingerprint["splits"] == {"train": 4}
