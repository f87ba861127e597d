"""End-to-end tasks on the tiny AR-LDM and a tiny demo set: train -> test -> eval -> sample, resume,
W&B offline logging, and the user-facing errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storyexp.errors import ConfigurationError, MissingResourceError

from .conftest import REPO, TINY_DEMO, TINY_RUN, run_composed, storyexp_in_process

METRIC_KEYS = ("test/loss", "test/fid_demo", "test/char_f1_demo", "test/frame_acc_demo", "baseline/char_f1_demo",
               "baseline/frame_acc_demo")


def run(tmp_path: Path, data_dir: Path, *overrides: str, name: str = "run") -> tuple[dict, Path]:
    return run_composed(TINY_DEMO + TINY_RUN + list(overrides), tmp_path / name, data_dir)


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    """One tiny continuation run: 2 training steps, validation, test with sampling and metrics (conftest's session
    run, shared with test_checkpoints_and_seeding.py)."""
    return tiny_trained_run


def test_train_writes_metrics_grids_and_checkpoints(trained):
    metrics, out, _ = trained
    for key in METRIC_KEYS:
        assert key in metrics, key
    for key in ("test/char_f1_demo", "test/frame_acc_demo", "baseline/char_f1_demo", "baseline/frame_acc_demo"):
        assert 0.0 <= metrics[key] <= 1.0
    assert np.isfinite(metrics["test/loss"]) and metrics["test/fid_demo"] >= 0
    assert "val/loss" in metrics
    assert (out / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["best"] and Path(summary["checkpoints"]["best"]).is_file()
    # last.ckpt is named (testing the best checkpoint restored a callback state from before it existed)
    assert summary["checkpoints"]["last"] == str(out / "checkpoints" / "last.ckpt")
    assert summary["checkpoints"]["tested"] == summary["checkpoints"]["best"]
    grids = sorted((out / "grids" / "test").glob("story_*.png"))
    assert len(grids) == 2
    assert list((out / "grids" / "val").glob("epoch*.png"))
    assert (out / "csv" / "metrics.csv").is_file()
    # every generated test frame as <story_id>/<frame>.png (continuation: frames 1-4; one test batch of 4 stories)
    frames = sorted(p.relative_to(out / "generated").as_posix() for p in (out / "generated").rglob("*.png"))
    assert len(frames) == 16 and frames[:4] == [f"demo-test-00000/{j}.png" for j in range(1, 5)]


def test_checkpoints_hold_no_metric_model(trained):
    """Inception, the character classifier and CLIP live in the evaluation callbacks, never in a checkpoint."""
    _, out, _ = trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    metric_words = ("inception", "classifier", "clip_score", "fid", "char_scores")
    assert not [k for k in ckpt["state_dict"] if any(w in k.lower() for w in metric_words)]
    for name, state in ckpt.get("callbacks", {}).items():
        tensors = [k for k, v in (state or {}).items() if isinstance(v, torch.Tensor) and v.numel() > 1]
        assert not tensors, (name, tensors)


def test_eval_reproduces_the_test_loss(trained, shared_data_dir):
    metrics, out, tmp = trained
    best = json.loads((out / "summary.json").read_text())["checkpoints"]["best"]
    evaluated, eval_out = run(tmp, shared_data_dir, "task=eval", f"ckpt_path={best}", name="eval")
    # validation/test losses use fixed noise per story, so the same weights give the same loss
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert evaluated["test/frame_acc_demo"] == pytest.approx(metrics["test/frame_acc_demo"], abs=1e-6)
    summary = json.loads((eval_out / "summary.json").read_text())
    assert summary["checkpoints"] == {"evaluated": best}  # the checkpoint evaluated, not the old run's best


def test_sample_from_split_and_from_captions(trained, shared_data_dir, tmp_path):
    _, out, tmp = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    _, sample_out = run(tmp, shared_data_dir, "task=sample", f"ckpt_path={ckpt}", "sample.num_stories=3",
                        name="sample_split")
    assert len(list((sample_out / "samples").glob("story_*.png"))) == 3
    frames = sorted((sample_out / "samples" / "story_000").glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_1.png", "frame_2.png", "frame_3.png", "frame_4.png"]

    from PIL import Image

    source = tmp_path / "source.png"
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(source)
    captions = "[pip waves in the park .,pip jumps .,bo walks .,gus sleeps .,mo dances .]"
    _, user_out = run(tmp, shared_data_dir, "task=sample", f"ckpt_path={ckpt}", f"sample.captions={captions}",
                      f"sample.source_image={source}", name="sample_user")
    frames = sorted((user_out / "samples" / "story_000").glob("frame_*.png"))
    assert len(frames) == 4
    with Image.open(frames[0]) as im:
        assert im.size == (32, 32)

    with pytest.raises(ConfigurationError, match="has 2 captions; stories have 5 frames"):
        run(tmp, shared_data_dir, "task=sample", f"ckpt_path={ckpt}", "sample.captions=[a,b]",
            f"sample.source_image={source}", name="sample_bad")
    with pytest.raises(ConfigurationError, match="source_image"):
        run(tmp, shared_data_dir, "task=sample", f"ckpt_path={ckpt}", f"sample.captions={captions}",
            name="sample_nosource")


def test_resume_continues_at_the_same_step(trained, shared_data_dir):
    _, out, tmp = trained
    last = out / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step == 2
    _, resumed = run(tmp, shared_data_dir, f"ckpt_path={last}", "trainer.limit_train_batches=2",
                     "trainer.max_steps=-1", "trainer.max_epochs=2", "test_after_fit=false", name="resume")
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    logged_steps = [int(line.split(",")[2]) for line in (resumed / "csv" / "metrics.csv").read_text().splitlines()[1:]
                    if line.split(",")[2]]
    assert min(logged_steps) >= 2  # nothing was re-trained from step 0


def test_visualization_task_trains_and_samples(shared_data_dir, tmp_path):
    metrics, out = run(tmp_path, shared_data_dir, "data.task=visualization", "trainer.limit_train_batches=1",
                       "trainer.max_steps=-1", "eval.baseline=null")
    assert "test/frame_acc_demo" in metrics and "baseline/frame_acc_demo" not in metrics
    from PIL import Image

    with Image.open(sorted((out / "grids" / "test").glob("story_*.png"))[0]) as im:
        assert im.size[0] > 5 * 32  # five generated columns


def test_wandb_offline_run_holds_the_metrics(shared_data_dir, tmp_path, monkeypatch):
    """Every metric reaches the W&B run, and each job is its own offline run.

    What W&B's background process writes to disk is not read here: it may still be writing when the task returns
    (reading it made this test fail under load). The run's `log` calls are seen in this process instead."""
    import wandb.sdk.wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged: list[dict] = []
    original = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return original(self, data, *args, **kwargs)

    summary: dict = {}
    original_set = wandb.sdk.wandb_summary.SummaryDict.__setitem__

    def spy_summary(self, key, value):
        summary[key] = value
        return original_set(self, key, value)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    monkeypatch.setattr(wandb.sdk.wandb_summary.SummaryDict, "__setitem__", spy_summary)
    metrics, out = run(tmp_path, shared_data_dir, "logger=wandb", "trainer.limit_train_batches=1",
                       "trainer.max_steps=-1", "eval=loss_only", "eval.metrics=[characters]", "eval.table_stories=3")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = {k for record in logged for k in record}
    assert {"train/loss", "val/loss", "test/loss", "test/frame_acc_demo"} <= keys
    assert any(record.get("test/loss") == pytest.approx(metrics["test/loss"]) for record in logged)
    # the test stories as a table (id, captions, ground truth, generated) and the story metrics as summary values
    table = next(record["test/samples"] for record in logged if "test/samples" in record)
    assert list(table.columns) == ["story_id", "captions", "ground_truth", "generated"] and len(table.data) == 3
    assert table.data[0][0] == "demo-test-00000"
    assert summary["test/frame_acc_demo"] == pytest.approx(metrics["test/frame_acc_demo"])
    assert wandb.run is None  # the task closed its run
    # a second job gets its own run (wandb.finish() after every task)
    _, out2 = run(tmp_path, shared_data_dir, "logger=wandb", "trainer.limit_train_batches=1",
                  "trainer.max_steps=-1", "eval=loss_only", name="second")
    runs2 = list((out2 / "wandb").glob("offline-run-*"))
    assert len(runs2) == 1 and runs2[0].name != runs[0].name


def test_eval_requires_a_checkpoint(shared_data_dir, tmp_path):
    with pytest.raises(ConfigurationError, match="ckpt_path"):
        run(tmp_path, shared_data_dir, "task=eval")
    with pytest.raises(MissingResourceError, match="nope.ckpt"):
        run(tmp_path, shared_data_dir, "task=eval", f"ckpt_path={tmp_path / 'nope.ckpt'}")


def test_launch_missing_dataset_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    # the command in this process (conftest.storyexp_in_process); launch.py's own start-up is one subprocess test:
    # test_checkpoints_and_seeding.py::test_a_bad_trainer_value_is_one_line_before_anything_is_built
    code, stderr = storyexp_in_process(["model=arldm", "data=ssid", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path,
                                       monkeypatch, capsys)
    assert code == 1
    assert "storyexp: error: ssid dataset file is missing" in stderr
    assert "IEEE DataPort" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("group,known", [("model", "arldm"), ("data", "flintstones")])
def test_launch_unknown_option_name(tmp_path, monkeypatch, capsys, group, known):
    code, stderr = storyexp_in_process([f"{group}=nope", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path,
                                       monkeypatch, capsys)
    assert code != 0
    assert f"Could not find '{group}/nope'" in stderr and known in stderr


def test_bf16_mixed_precision_trains_on_cpu(shared_data_dir, tmp_path):
    metrics, _ = run(tmp_path, shared_data_dir, "trainer.precision=bf16-mixed", "trainer.limit_train_batches=1",
                     "trainer.max_steps=-1", "eval=loss_only")
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["test/loss"])


@pytest.mark.parametrize("model, system", [("arldm_tiny", "ARLDMSystem"), ("mindalle_tiny", "StoryDalleSystem"),
                                           ("mega_tiny", "StoryMegaSystem")])
def test_benchmark_task_times_training_and_sampling(shared_data_dir, tmp_path, model, system):
    overrides = ["task=benchmark", f"model={model}", "benchmark.steps=2", "benchmark.warmup=1"]
    _, out = run(tmp_path, shared_data_dir, *overrides)
    report = json.loads((out / "benchmark.json").read_text())
    results = report["results"]
    for key in ("train_step_s", "train_stories_per_s", "sample_batch_s", "sample_frames_per_s", "peak_memory_gb"):
        assert results[f"benchmark/{key}"] > 0, key
    assert 0 < results["benchmark/params_trainable"] <= results["benchmark/params_total"]
    assert report["context"]["device"] == "cpu" and report["context"]["batch_size"] == 4
    assert report["context"]["model"].endswith(system)


def test_benchmark_refuses_bad_options(shared_data_dir, tmp_path):
    with pytest.raises(ConfigurationError, match="benchmark.device"):
        run(tmp_path, shared_data_dir, "task=benchmark", "benchmark.device=tpu")


def test_resume_in_place_with_ckpt_path_last(shared_data_dir, tmp_path):
    """ckpt_path=last in the interrupted run's own directory: it continues there, at the same step, with its
    best-checkpoint tracking (one best file, not one per run) and the same W&B run id."""
    from storyexp.utils.resolvers import RUN_ID_FILE, wandb_run_id

    common = ["trainer.limit_train_batches=2", "trainer.max_steps=-1", "test_after_fit=false", "eval=loss_only"]
    _, out = run(tmp_path, shared_data_dir, *common, "trainer.max_epochs=1", name="r")
    run_id = wandb_run_id(str(out))
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    _, again = run(tmp_path, shared_data_dir, *common, "trainer.max_epochs=2", "ckpt_path=last", name="r")
    assert again == out
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and last["epoch"] == 1
    best = sorted((out / "checkpoints").glob("step_*.ckpt"))
    assert len(best) == 1  # the restored top-1 tracking replaced or kept the first run's best, never both
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["best"] == str(best[0])
    assert wandb_run_id(str(out)) == run_id and wandb_run_id(str(tmp_path / "other")) != run_id
    # ckpt_path=<run directory>: its newest checkpoint; ckpt_path=last in a directory without any: one line
    from storyexp.tasks.common import newest_checkpoint

    assert newest_checkpoint(out) in {out / "checkpoints" / "last.ckpt", *(out / "checkpoints").glob("*.ckpt")}
    with pytest.raises(MissingResourceError, match="ckpt_path=last: no checkpoint.*hydra.run.dir"):
        run(tmp_path, shared_data_dir, *common, "ckpt_path=last", name="fresh")


def test_wandb_logger_config_carries_the_run_id(tmp_path):
    from .conftest import compose_cfg

    cfg = compose_cfg(["logger=wandb"], tmp_path)
    assert cfg.logger.wandb.resume == "allow"
    assert cfg.logger.wandb.id == (tmp_path / "out" / "wandb_run_id.txt").read_text().strip()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from storyexp.utils.loading import StoryexpCheckpointIO

    io = StoryexpCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def crash(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# an epoch of 4 steps, step checkpoints every 2, 2 epochs: a run interrupted at step 3 is mid-epoch
INTERRUPTED = ["trainer.limit_train_batches=4", "trainer.max_steps=-1", "trainer.max_epochs=2", "test_after_fit=false",
               "eval=loss_only", "callbacks.step_checkpoint.every_n_train_steps=2",
               "callbacks.story_grids.num_stories=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data_dir) -> dict:
    """The final checkpoint of the 8-step INTERRUPTED run that nothing interrupts (this process: torch on 1 thread)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _, straight = run(tmp, shared_data_dir, *INTERRUPTED, name="straight")
    return torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_a_run_terminated_mid_epoch_resumes_to_the_uninterrupted_weights(uninterrupted, shared_data_dir, tmp_path):
    """SIGTERM in the middle of an epoch (a scheduler's pre-emption): the state of the step under way is saved at
    its end and the run stops cleanly; `ckpt_path=last` in the same directory trains on the batches the stopped run
    had not seen (resumable loader) with the RNG states it had (noise, timesteps), so the final weights equal those
    of a run that was never interrupted. (SIGKILL, which needs a process of its own, is the slow
    test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights.)"""
    import warnings

    a = uninterrupted
    # SIGTERM at step 3 (in this process: Lightning's handler is installed for the fit only): storyexp's Preemption
    # callback saves step 3 at its end and Lightning's SIGTERMException (a SystemExit, status 0) ends the run
    sigterm = ["+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=3",
               "+callbacks.kill.signal=SIGTERM"]
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, shared_data_dir, *INTERRUPTED, *sigterm, name="terminated")
    assert stopped.value.code in (None, 0)
    kept = tmp_path / "terminated" / "out" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["latest_step_0000002.ckpt", "preempted.ckpt"]
    step3 = torch.load(kept / "preempted.ckpt", map_location="cpu", weights_only=True)
    assert step3["global_step"] == 3
    assert step3["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, out = run(tmp_path, shared_data_dir, *INTERRUPTED, "ckpt_path=last", name="terminated")
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning's mid-epoch warning
    c = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == c["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(c["state_dict"][key], value), key
    assert not (kept / "preempted.ckpt").exists()  # superseded by the completed fit's newer checkpoints


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(uninterrupted, shared_data_dir, tmp_path):
    """SIGKILL in the middle of an epoch, after a step checkpoint, through launch.py; `ckpt_path=last` in the same
    directory trains on the batches the killed run had not seen with the RNG states it had, so the final weights
    equal those of a run that was never interrupted. No completed checkpoint is lost.

    Slow (two launch.py processes, ~35 s on 2 cores). The default run covers the same mid-epoch resume to the
    uninterrupted weights in this process with SIGTERM (test_a_run_terminated_mid_epoch_resumes_to_the_uninterrupted_
    weights), and resume from a checkpoint in test_resume_continues_at_the_same_step /
    test_resume_in_place_with_ckpt_path_last; that a checkpoint is never left half written in
    test_checkpoints_are_written_atomically."""
    a = uninterrupted
    # the killed and the resumed processes run torch on 1 thread like this one: the same kernels, bit for bit
    env = {**__import__("os").environ, "WANDB_MODE": "disabled", "STORYEXP_DATA_DIR": str(shared_data_dir),
           "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    args = [sys.executable, str(REPO / "launch.py"), *TINY_DEMO, *TINY_RUN, *INTERRUPTED,
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"]
    killed = subprocess.run(args + ["+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=3"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == ["latest_step_0000002.ckpt"]  # complete (no temporary file), step 2 of epoch 0's 4
    step2 = torch.load(run_dir / "checkpoints" / left[0], map_location="cpu", weights_only=True)
    assert step2["global_step"] == 2 and step2["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2}]

    resumed = subprocess.run(args + ["ckpt_path=last"], capture_output=True, text=True, env=env, timeout=600,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
