"""Slow tests (`pytest -m slow`): real multi-process DDP on CPU, and the demo-sized model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY_DEMO, TINY_RUN

pytestmark = pytest.mark.slow


def test_ddp_cpu_two_processes_train_and_test(tmp_path):
    """trainer=ddp_cpu: Lightning re-launches launch.py for rank 1; one output folder, metrics from rank 0."""
    overrides = [o for o in TINY_DEMO + TINY_RUN if not o.startswith("trainer=")]
    env = {**os.environ, "WANDB_MODE": "disabled", "STORYEXP_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "trainer=ddp_cpu", *overrides, "trainer.max_steps=-1",
         "trainer.limit_train_batches=2", f"paths.log_dir={tmp_path / 'logs'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test/loss", "test/frame_acc_demo", "baseline/frame_acc_demo"):
        assert key in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_demo_model_train_step_validation_and_sampling(tmp_path, shared_data_dir):
    """The demo-sized model (not only the tiny one) runs a train step, validation and story sampling."""
    from storyexp.tasks import run_task

    from .conftest import compose_cfg

    cfg = compose_cfg(TINY_DEMO + ["model=arldm_demo", "trainer=cpu", "trainer.max_steps=2",
                                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                                   "trainer.limit_test_batches=1", "model.sampler.num_inference_steps=2",
                                   "eval.classifier.epochs=4", "eval.classifier.batch_size=16",
                                   "eval.classifier.lr=3e-3", "logger=csv"], tmp_path, data_dir=shared_data_dir)
    run_task(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"val/loss", "test/loss", "test/frame_acc_demo"} <= set(metrics)


@pytest.mark.parametrize("model", ["mindalle", "mega"])
def test_storydalle_demo_models_fit_stage1_then_train_validate_and_sample(tmp_path, shared_data_dir, model):
    """`model=mindalle|mega data=demo` (the demo sizes): stage 1 fitted on first use, then steps and sampling."""
    from storyexp.tasks import run_task

    from .conftest import compose_cfg

    cfg = compose_cfg(TINY_DEMO + [f"model={model}", "trainer=cpu", "trainer.max_steps=2",
                                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                                   "trainer.limit_test_batches=1", "model.network.stage1_fit.steps=5",
                                   "model.network.stage1_fit.max_mae=null", "model.network.stage1_fit.min_usage=null",
                                   f"model.network.stage1_fit.cache={tmp_path / 'stage1.ckpt'}",
                                   "eval.classifier.epochs=4", "eval.classifier.batch_size=16",
                                   "eval.classifier.lr=3e-3", "logger=csv"], tmp_path, data_dir=shared_data_dir)
    assert cfg.model.network.source == "sizes"
    run_task(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"val/loss", "test/loss", "test/frame_acc_demo"} <= set(metrics)
    assert (tmp_path / "stage1.ckpt").is_file()
