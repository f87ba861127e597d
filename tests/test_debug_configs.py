"""debug=<option> overlays (lightning-hydra-template's set) and the config tree printed at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storyexp.tasks import run_task

from .conftest import CONF, TINY_DEMO, TINY_RUN, compose_cfg

OPTIONS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def test_the_debug_options_are_the_template_s():
    assert OPTIONS == ["default", "fdr", "limit", "overfit", "profiler"]


@pytest.mark.parametrize("name", OPTIONS)
def test_every_debug_option_composes_over_any_run(name, tmp_path):
    # (a logger= or trainer= given on the command line would still win: Hydra's command line comes last)
    cfg = compose_cfg(TINY_DEMO + ["model=arldm_tiny", f"debug={name}"], tmp_path)
    assert cfg.task_name == "debug" and cfg.trainer.detect_anomaly is True and cfg.data.num_workers == 0
    assert not cfg.logger and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    expected = {
        "default": {},
        "fdr": {"fast_dev_run": True},
        "limit": {"max_epochs": 3, "limit_train_batches": 0.01, "limit_val_batches": 0.05},
        "overfit": {"overfit_batches": 3, "max_epochs": 20},
        "profiler": {"max_epochs": 1},
    }[name]
    for key, value in expected.items():
        assert cfg.trainer[key] == value, key
    if name == "overfit":
        assert not cfg.callbacks and cfg.test_after_fit is False
    if name == "profiler":
        assert cfg.trainer.profiler._target_.endswith("SimpleProfiler")


def test_fast_dev_run_trains_validates_and_tests_one_batch(tmp_path, shared_data_dir, capsys):
    cfg = compose_cfg(TINY_DEMO + TINY_RUN + ["debug=fdr", "eval=loss_only"], tmp_path, data_dir=shared_data_dir)
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train/loss", "test/loss"} <= set(metrics)
    # the config tree: printed at start-up and saved, resolved (the run's real paths appear)
    printed = capsys.readouterr().out
    tree = (out / "config_tree.log").read_text()
    assert tree.splitlines()[0] == "config" and tree in printed
    for section in ("task", "data", "model", "trainer", "eval", "callbacks"):
        assert f"── {section}\n" in tree, section
    assert str(shared_data_dir) in tree and "${" not in tree


def test_profiler_writes_its_report(tmp_path, shared_data_dir):
    cfg = compose_cfg(TINY_DEMO + TINY_RUN + ["debug=profiler", "eval=loss_only", "trainer.max_steps=2",
                                              "test_after_fit=false"], tmp_path, data_dir=shared_data_dir)
    run_task(cfg)
    report = (Path(cfg.paths.output_dir) / "fit-profile.txt").read_text()
    assert "run_training_batch" in report or "training_step" in report


def test_the_tree_is_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from storyexp.utils.config_tree import print_config_tree

    cfg = compose_cfg(TINY_DEMO, tmp_path)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    print_config_tree(cfg, save_to=tmp_path / "tree.log")
    assert capsys.readouterr().out == "" and not (tmp_path / "tree.log").exists()
