"""Evaluation wiring: FID reference statistics (cache keys, reuse, task=fid_stats), the metric registry, the FID
metric's missing-weights path, metrics during training, and what the test loop writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.metrics import fid as fidmod
from storyexp.metrics import fid_reference as ref
from storyexp.metrics.registry import METRICS, MetricContext, MetricUnavailable, build_metric, check_metric_names
from storyexp.tasks.common import build_datamodule

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg, run_composed


def _datamodule(tmp_path: Path, data_dir: Path, *overrides: str, stage: str = "test"):
    cfg = compose_cfg(TINY_DEMO + list(overrides), tmp_path, data_dir=data_dir)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup(stage)
    return dm


def _weights(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"w_{content.hex()}.pth"
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------------------------------- cache keys


def test_reference_cache_key_changes_when_it_must(tmp_path, shared_data_dir):
    w1, w2 = _weights(tmp_path, b"weights one"), _weights(tmp_path, b"weights two")
    base = _datamodule(tmp_path / "a", shared_data_dir)

    def path(dm, split="test", protocol="fid64", weights=w1):
        return ref.reference_path(tmp_path / "stats", ref.reference_record(dm, split, protocol, weights))

    p0 = path(base)
    assert p0 == path(_datamodule(tmp_path / "b", shared_data_dir))  # the same run gives the same key
    assert p0.name.startswith("test_continuation_fid64_")
    variants = {
        "protocol": path(base, protocol="native"),
        "weights": path(base, weights=w2),
        "split": path(_datamodule(tmp_path / "c", shared_data_dir, stage="validate"), split="val"),
        "task": path(_datamodule(tmp_path / "d", shared_data_dir, "data.task=visualization")),
        "frame_size": path(_datamodule(tmp_path / "e", shared_data_dir, "data.frame_size=16")),
        "frame_fit": path(_datamodule(tmp_path / "h", shared_data_dir, "+data.frame_fit=center_crop")),
        "frame_choice": path(_datamodule(tmp_path / "f", shared_data_dir, "+data.frame_choice={train: random, "
                                                                          "eval: middle}")),
        "data": path(_datamodule(tmp_path / "g", shared_data_dir, "data.demo.seed=1")),
    }
    for what, other in variants.items():
        assert other != p0, what
    assert len(set(variants.values())) == len(variants)


def test_a_reference_with_another_record_is_not_read(tmp_path, shared_data_dir):
    dm = _datamodule(tmp_path, shared_data_dir)
    weights = _weights(tmp_path, b"w")
    record = ref.reference_record(dm, "test", "fid64", weights)
    path = ref.reference_path(tmp_path, record)
    mu, sigma = np.arange(2048, dtype=np.float64), np.eye(2048)
    ref.save_reference(path, mu, sigma, record, num_frames=32)
    got = ref.load_reference(path, record)
    assert got is not None and np.array_equal(got[0], mu) and np.array_equal(got[1], sigma)
    assert ref.recorded_frames(path) == 32
    fidmod.load_stats(path)  # still pytorch-fid's format (mu, sigma)
    other = ref.reference_record(dm, "test", "fid64", _weights(tmp_path, b"other weights"))
    assert ref.load_reference(path, other) is None  # same file name forced: the embedded record decides


# ------------------------------------------------------------------------------------------- registry


def test_metric_names_are_checked():
    assert check_metric_names(["fid", "characters"]) == ["fid", "characters"]
    with pytest.raises(ConfigurationError, match="Unknown eval.metrics.*known"):
        check_metric_names(["fid", "inception_score"])
    with pytest.raises(ConfigurationError, match="twice"):
        check_metric_names(["fid", "fid"])
    assert {"fid", "characters", "fid_demo", "clip"} <= set(METRICS)


def test_unknown_metric_is_one_line_before_anything_is_built(tmp_path):
    from storyexp.tasks import run_task

    cfg = compose_cfg(TINY_DEMO + TINY_RUN + ["eval.metrics=[fid,is]"], tmp_path)
    with pytest.raises(ConfigurationError, match=r"eval.metrics=\['fid', 'is'\] is not valid"):
        run_task(cfg)
    cfg = compose_cfg(TINY_DEMO + TINY_RUN + ["eval.fid.protocols=[fid128]"], tmp_path)
    with pytest.raises(ConfigurationError, match="eval.fid.protocols"):
        run_task(cfg)
    assert not (tmp_path / "data").exists()


def test_missing_fid_weights_skip_fid_with_the_message_or_fail_when_required(tmp_path, shared_data_dir):
    dm = _datamodule(tmp_path, shared_data_dir)
    context = MetricContext(eval_cfg={"fid": {"protocols": ["fid64"], "weights": None}}, datamodule=dm,
                            weights_dir=str(tmp_path / "weights"))
    with pytest.raises(MetricUnavailable) as err:
        build_metric("fid", context)
    message = str(err.value)
    assert "\n" not in message and fidmod.FID_WEIGHTS_FILE in message and fidmod.FID_WEIGHTS_URL in message
    assert str(tmp_path / "weights" / "fid") in message and "eval.fid.required" in message
    required = MetricContext(eval_cfg={"fid": {"protocols": ["fid64"], "required": True}}, datamodule=dm,
                             weights_dir=str(tmp_path / "weights"))
    with pytest.raises(MissingResourceError, match=fidmod.FID_WEIGHTS_FILE):
        build_metric("fid", required)


# ------------------------------------------------------------------------------------ FID reference use


def _cheap_frechet(mu1, sigma1, mu2, sigma2):
    """Stands in for the Fréchet distance (two 2048x2048 eigendecompositions, ~2 s here); these tests are about which
    statistics are used, the distance itself is tested against pytorch-fid in test_fid.py."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) - np.trace(sigma2))


def _stories(dm):
    items = [dm._dataset(dm.test_split)[i] for i in range(len(dm._dataset(dm.test_split)))]
    real = np.concatenate([np.stack(it["frames"][1:]) for it in items])
    return items, real


def test_whole_split_reference_is_written_once_reused_and_partial_runs_leave_it(tmp_path, shared_data_dir,
                                                                                 fid_weights, monkeypatch):
    monkeypatch.setattr(fidmod, "frechet_distance", _cheap_frechet)
    dm = _datamodule(tmp_path, shared_data_dir, "data.demo.n_test=2")  # 8 target frames: Inception at 299 is slow
    _, real = _stories(dm)
    fake = real[:, ::-1].copy()  # the frames upside down stand in for generated ones
    eval_cfg = {"fid": {"protocols": ["fid64"], "weights": str(fid_weights), "stats_dir": str(tmp_path / "s")}}
    context = MetricContext(eval_cfg=eval_cfg, datamodule=dm)

    # part of the split: scored against the real frames it saw, nothing written
    metric = build_metric("fid", context)
    metric.update(fake[:6], real[:6])
    metric.compute()
    assert not list((tmp_path / "s").glob("*.npz")) if (tmp_path / "s").exists() else True

    # the whole split: the reference is written from the real frames of the evaluation
    metric = build_metric("fid", context)
    for i in range(0, len(real), 6):
        metric.update(fake[i:i + 6], real[i:i + 6])
    first = metric.compute()["fid64"]
    written = list((tmp_path / "s").glob("test_continuation_fid64_*.npz"))
    assert len(written) == 1 and ref.recorded_frames(written[0]) == len(real)

    # the next evaluation reads it and no longer needs (nor encodes) the real frames
    again = build_metric("fid", context)
    assert again.cached["fid64"]
    for i in range(0, len(real), 6):  # the same batches: float32 convolutions round differently per batch size
        again.update(fake[i:i + 6], None)
    assert again.compute()["fid64"] == pytest.approx(first, rel=1e-9)
    assert int(again.metrics["fid64"].real_n) == 0

    # task=fid_stats computes the same statistics from the data module
    inception = fidmod.build_inception(fid_weights)
    mu, sigma, n = ref.compute_reference(dm, dm.test_split, "fid64", inception, batch_size=7)
    cached_mu, cached_sigma = fidmod.load_stats(written[0])
    assert n == len(real)
    np.testing.assert_allclose(mu, cached_mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, cached_sigma, rtol=1e-8, atol=1e-10)


def test_fid_stats_task_writes_and_keeps_the_reference(tmp_path, shared_data_dir, fid_weights):
    overrides = TINY_DEMO + ["data.demo.n_test=2", "task=fid_stats", f"eval.fid.weights={fid_weights}",
                             f"eval.fid.stats_dir={tmp_path / 'stats'}", "eval.fid.protocols=[fid64,native]"]
    metrics, out = run_composed(overrides, tmp_path / "one", shared_data_dir)
    assert metrics == {"fid_stats/fid64_frames": 8.0, "fid_stats/fid_frames": 8.0}  # 2 stories x 4 targets
    files = sorted((tmp_path / "stats").glob("*.npz"))
    assert [f.name.split("_")[2] for f in files] == ["fid64", "native"]
    stamp = [f.stat().st_mtime_ns for f in files]
    run_composed(overrides, tmp_path / "two", shared_data_dir)  # up to date: kept, not recomputed
    assert [f.stat().st_mtime_ns for f in files] == stamp
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["references"]) == {"fid64", "fid"}


def test_fid_stats_without_weights_is_one_line(tmp_path, shared_data_dir):
    from storyexp.tasks import run_task

    cfg = compose_cfg(TINY_DEMO + ["task=fid_stats"], tmp_path, data_dir=shared_data_dir)
    with pytest.raises(MissingResourceError, match=fidmod.FID_WEIGHTS_FILE):
        run_task(cfg)


# ------------------------------------------------------------------------------------- during training


def test_validation_metrics_are_logged_on_schedule_and_monitorable(tmp_path, shared_data_dir):
    """val/<key> on a fixed validation subset, at the first validation after every_n_steps steps; the checkpoint
    callback and optimized_metric can monitor it."""
    import csv

    from storyexp.tasks import run_task

    overrides = TINY_DEMO + TINY_RUN + [
        "trainer.limit_train_batches=2", "trainer.max_steps=-1", "trainer.max_epochs=3", "eval=loss_only",
        "eval.val_metrics.metrics=[characters]", "eval.val_metrics.num_stories=4", "eval.val_metrics.every_n_steps=3",
        "callbacks.model_checkpoint.monitor=val/frame_acc_demo", "callbacks.model_checkpoint.mode=max",
        "optimized_metric=val/frame_acc_demo"]
    cfg = compose_cfg(overrides, tmp_path, data_dir=shared_data_dir)
    value = run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["val/frame_acc_demo"] <= 1.0 and value == pytest.approx(metrics["val/frame_acc_demo"])
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    validations = [r["step"] for r in rows if r.get("val/loss")]
    evaluated = [r["step"] for r in rows if r.get("val/frame_acc_demo")]
    # three validations, after 2, 4 and 6 steps: evaluated at the first and the third (>= 3 steps later)
    assert len(validations) == 3 and evaluated == [validations[0], validations[2]]
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["checkpoints"]["best"]).is_file()


def test_validation_schedule():
    from storyexp.callbacks import ValidationMetrics

    every = ValidationMetrics(eval_cfg={}, metrics=["fid"], every_n_steps=None)
    assert every._due(10) and (setattr(every, "_last_step", 10) or not every._due(10)) and every._due(11)
    spaced = ValidationMetrics(eval_cfg={}, metrics=["fid"], every_n_steps=100)
    assert spaced._due(5)
    spaced._last_step = 5
    assert not spaced._due(104) and spaced._due(105)
    assert ValidationMetrics(eval_cfg={}, metrics=["fid"]).state_dict() == {"last_step": None}


def test_a_run_without_test_loop_prepares_no_classifier(tmp_path, shared_data_dir):
    """eval.metrics belong to the test loop: with test_after_fit=false (a sweep trial) the classifier is neither
    trained nor checked (an impossible floor would refuse it), unless eval.val_metrics needs it."""
    from storyexp.tasks import run_task

    base = TINY_DEMO + TINY_RUN + ["test_after_fit=false", "eval.classifier.min_val_frame_acc=1.5",
                                   f"eval.classifier.path={tmp_path / 'clf.pt'}"]
    run_task(compose_cfg(base, tmp_path / "a", data_dir=shared_data_dir))
    assert not (tmp_path / "clf.pt").exists()
    with pytest.raises(ConfigurationError, match="min_val_frame_acc=1.5"):
        run_task(compose_cfg(base + ["eval.val_metrics.metrics=[characters]"], tmp_path / "b",
                             data_dir=shared_data_dir))
