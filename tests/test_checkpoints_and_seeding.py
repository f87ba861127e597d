"""Checkpoints a user hands in, the model they record, per-story seeding, and config mistakes caught early.

One tiny AR-LDM run (conftest.tiny_trained_run, shared with test_tasks.py) provides the checkpoint; everything else
evaluates or inspects it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storyexp.errors import ConfigurationError
from storyexp.utils.loading import CheckpointMismatchError, UnreadableFileError

from .conftest import REPO, TINY_DEMO, TINY_RUN, compose_cfg, run_composed

NO_MODEL = [o for o in TINY_RUN if not o.startswith("model=")]
EVAL = ["task=eval", "eval.metrics=[]", "eval.baseline=null", "eval.num_grid_stories=4"]


def run(tmp_path: Path, data_dir: Path, *overrides: str, name: str) -> tuple[dict, Path]:
    return run_composed(TINY_DEMO + list(overrides), tmp_path / name, data_dir)


@pytest.fixture(scope="module")
def checkpoint(tiny_trained_run) -> tuple[Path, dict]:
    """The last checkpoint of conftest's session run (2 steps of arldm_tiny) and its metrics; only read here."""
    metrics, out, _ = tiny_trained_run
    return out / "checkpoints" / "last.ckpt", metrics


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("storyexp: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------ files a user hands in


class _Marker:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # what a crafted checkpoint would run on load
        return (Path.touch, (self.path,))


def user_error_line(tmp_path: Path, *overrides: str) -> str:
    """The task's user error, in this process (the CLI prints exactly this after "storyexp: error: ", as
    test_a_bad_trainer_value_is_one_line_before_anything_is_built checks through the command's code)."""
    from storyexp.tasks import UserError

    with pytest.raises(UserError) as err:
        run_composed(list(overrides), tmp_path / "run", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_crafted_checkpoint_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Marker(marker)}, evil)
    for task in ("eval", "sample"):
        line = user_error_line(tmp_path, f"task={task}", f"ckpt_path={evil}")
        assert str(evil) in line and "refused" in line and "pathlib" in line.lower()
    assert not marker.exists()


def test_foreign_files_as_ckpt_path_are_one_line(tmp_path):
    line = user_error_line(tmp_path, "task=eval", "ckpt_path=/etc/passwd")
    assert "/etc/passwd" in line and "not a PyTorch checkpoint" in line
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    line = user_error_line(tmp_path, "task=sample", f"ckpt_path={plain}")
    assert str(plain) in line and "not a Lightning checkpoint" in line


def test_a_checkpoint_that_does_not_fit_is_one_line(checkpoint, shared_data_dir, tmp_path):
    path, _ = checkpoint
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith(".weight"))
    ckpt["state_dict"][key] = torch.zeros(3, 3)
    ckpt["state_dict"]["net.extra.bias"] = torch.zeros(1)
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointMismatchError) as err:
        run(tmp_path, shared_data_dir, *NO_MODEL, *EVAL, f"ckpt_path={bad}", name="bad")
    message = str(err.value)
    assert "\n" not in message and key in message and "net.extra.bias" in message and "(3, 3)" in message


def test_unreadable_checkpoint_inside_a_run(tmp_path, shared_data_dir):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UnreadableFileError, match="broken.ckpt"):
        run(tmp_path, shared_data_dir, *NO_MODEL, *EVAL, f"ckpt_path={broken}", name="broken")


# ------------------------------------------------------------------------------------ the model record


def test_eval_rebuilds_the_model_the_checkpoint_was_trained_with(checkpoint, shared_data_dir, tmp_path):
    """No model= on the command line (the default is another model): the checkpoint's own model is used."""
    path, trained = checkpoint
    metrics, _ = run(tmp_path, shared_data_dir, *NO_MODEL, *EVAL, f"ckpt_path={path}", name="eval")
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-5)


def test_a_contradicting_model_is_one_error_naming_both(checkpoint, shared_data_dir, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigurationError, match=r"model=arldm_tiny checkpoint.*model=mindalle_tiny"):
        run(tmp_path, shared_data_dir, *NO_MODEL, "model=mindalle_tiny", *EVAL, f"ckpt_path={path}", name="other")
    with pytest.raises(ConfigurationError, match=r"model=arldm_tiny checkpoint.*model=mega_tiny"):
        run(tmp_path, shared_data_dir, *NO_MODEL, "model=mega_tiny", f"ckpt_path={path}",
            "trainer.max_steps=-1", "trainer.max_epochs=2", name="resume_other")


def test_command_line_model_options_apply_on_top_of_the_record(checkpoint, tmp_path):
    from storyexp.tasks.common import use_checkpoint_model

    path, _ = checkpoint
    cfg = compose_cfg(TINY_DEMO + NO_MODEL + ["task=sample", f"ckpt_path={path}",
                                              "model.sampler.num_inference_steps=7", "seed=3"], tmp_path)
    use_checkpoint_model(cfg, str(path))
    assert cfg.model._target_.endswith("ARLDMSystem")
    assert cfg.model.network.width == 32  # arldm_tiny's, not the default arldm_demo's
    assert cfg.model.sampler.num_inference_steps == 7 and cfg.model.seed == 3  # ${seed} follows this run
    record = torch.load(path, map_location="cpu", weights_only=True)["storyexp"]
    assert record["model"] == "arldm_tiny" and record["config"]["seed"] == "${seed}"


# ------------------------------------------------------------------------------------ per-story seeding


def assert_same_frames(a, b) -> None:
    """Equal up to float rounding: batched kernels (BLAS blocking) may move a value across a uint8 rounding
    boundary, so at most one level, in a tiny fraction of pixels. A different random draw changes most pixels."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def _grid_pixels(out: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((out / "grids" / "test").glob("story_*.png"))]


def test_batch_size_does_not_change_losses_or_frames(checkpoint, shared_data_dir, tmp_path):
    path, _ = checkpoint
    results = {}
    for bs in (1, 4):
        metrics, out = run(tmp_path, shared_data_dir, *NO_MODEL, *EVAL, f"ckpt_path={path}", f"data.batch_size={bs}",
                           "trainer.limit_test_batches=null", name=f"bs{bs}")
        results[bs] = metrics, _grid_pixels(out)
    (m1, g1), (m4, g4) = results[1], results[4]
    assert m1["test/loss"] == pytest.approx(m4["test/loss"], rel=1e-6)
    assert len(g1) == len(g4) == 4
    for a, b in zip(g1, g4):
        assert_same_frames(a, b)


@pytest.mark.parametrize("model", ["arldm_tiny", "mindalle_tiny", "mega_tiny"])
def test_every_model_samples_a_story_the_same_in_any_batch(model, shared_data_dir, tmp_path):
    from storyexp.tasks.common import build_data_and_model

    cfg = compose_cfg(TINY_DEMO + [f"model={model}"], tmp_path, data_dir=shared_data_dir)
    datamodule, system = build_data_and_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    together = system.generate(batch)
    alone = [system.generate({k: None if v is None else v[i:i + 1] for k, v in batch.items()})
             for i in range(len(batch["ids"]))]
    assert_same_frames(together, torch.cat(alone))
    # and the seed matters: another seed draws other frames
    other = system.generate(batch, seed=int(cfg.seed) + 1)
    assert (np.abs(other.numpy().astype(np.int16) - together.numpy().astype(np.int16)) > 1).mean() > 0.05


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_metrics(checkpoint, shared_data_dir, tmp_path, fid_weights,
                                                      monkeypatch):
    """The same checkpoint through task=eval on 1 process and on 2 (trainer=ddp_cpu): identical metrics.json --
    loss, Inception FID (both sides computed in the run: no cached reference), the character scores, fid_demo and
    the baseline -- and the same generated frames on disk; each test story is generated and scored once (the
    distributed sampler's padding is dropped).

    Slow (~55-80 s on 2 cores: two launch.py processes, Inception at 299 px). The default run covers its parts more
    cheaply: DDP on ddp_cpu equals one process (tests/test_ddp_equivalence.py, one training step of every model);
    the eval loaders score each story once on any number of processes
    (tests/test_samplers_distributed.py::test_datamodule_eval_loaders_score_each_story_once); metric states summed
    over 2 gloo processes equal one process (tests/test_clip_scores.py::test_ddp_compute_equals_one_process) and
    over merged parts (tests/test_inception_classifier.py::
    test_character_scores_hand_counted_micro_f1_exact_match_and_batches, tests/test_fid.py streaming); per-story
    seeding makes the frames independent of the batch (test_batch_size_does_not_change_losses_or_frames)."""
    path, _ = checkpoint
    overrides = [o for o in TINY_DEMO + NO_MODEL if not o.startswith("trainer=")] + [
        "task=eval", "eval.metrics=[fid,characters,fid_demo]", "eval.fid.stats_dir=null", "eval.num_grid_stories=4",
        f"ckpt_path={path}", "trainer.limit_test_batches=null", "data.batch_size=6",
        "data.limit_test=5"]  # 5 stories: one process gets 3, the other 2 (Inception at 299 px is the cost here)
    outs, frames = {}, {}
    # 1 process in this one (no interpreter start-up), 2 through launch.py, where Lightning re-launches it for rank 1
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("STORYEXP_FID_WEIGHTS", str(fid_weights))
    outs["cpu"], run_dir = run_composed(overrides + ["trainer=cpu"], tmp_path / "cpu", shared_data_dir)
    frames["cpu"] = sorted(p.relative_to(run_dir / "generated") for p in (run_dir / "generated").rglob("*.png"))
    env = {**os.environ, "STORYEXP_DATA_DIR": str(shared_data_dir)}
    run_dir = tmp_path / "ddp_cpu"
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "trainer=ddp_cpu", *overrides,
                           f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs["ddp_cpu"] = json.loads((run_dir / "metrics.json").read_text())
    frames["ddp_cpu"] = sorted(p.relative_to(run_dir / "generated") for p in (run_dir / "generated").rglob("*.png"))
    assert {"test/loss", "test/fid64", "test/char_f1_demo", "test/frame_acc_demo", "test/fid_demo",
            "baseline/char_f1_demo"} <= outs["cpu"].keys()
    assert outs["cpu"].keys() == outs["ddp_cpu"].keys()
    for key, value in outs["cpu"].items():
        # the Frechet distances (fid64, fid_demo) over these 20 frames move by up to ~1e-5 because the frames differ
        # by one uint8 level in ~10 of 98k values (float rounding of the model's batched kernels; bounded in
        # test_batch_size_does_not_change_losses_or_frames); a frame missing or counted twice changes 1/20 of the
        # statistics and moves them far more
        assert outs["ddp_cpu"][key] == pytest.approx(value, rel=5e-5 if "fid" in key else 1e-6), key
    assert len(frames["cpu"]) == 5 * 4 and frames["cpu"] == frames["ddp_cpu"]  # 5 stories x 4 targets, once each


# ------------------------------------------------------------------------------------ config mistakes


def test_a_bad_trainer_value_is_one_line_before_anything_is_built(tmp_path, monkeypatch, capsys):
    """Through the `storyexp` command's own code (storyexp.cli.main, Hydra's parsing and the CLI's error printing), in
    this process: a subprocess would add ~8 s of imports (tests/test_cli.py runs the real command lines)."""
    from .conftest import storyexp_in_process

    code, stderr = storyexp_in_process(["model=arldm_tiny", "trainer.max_epochs=abc", f"paths.log_dir={tmp_path / 'logs'}"],
                                       tmp_path, monkeypatch, capsys)
    line = one_line_error(subprocess.CompletedProcess([], code, "", stderr))
    assert "trainer.max_epochs='abc'" in line and "integer" in line
    assert not (tmp_path / "data").exists()  # nothing was built or generated


@pytest.mark.parametrize("override, key", [
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.devices=many", "trainer.devices"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("data.batch_size=0", "data.batch_size"),
    ("seed=abc", "seed"),
    ("model.sampler.scheduler=ddimm", "model.sampler.scheduler"),
    ("model.sampler.num_candidates=0", "model.sampler.num_candidates"),
    ("model.train.mode=prompt", "model.train.mode"),
    ("data.task=story", "model.task"),
])
def test_bad_values_name_key_and_value(tmp_path, override, key):
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg(["model=arldm_tiny", override], tmp_path)
    with pytest.raises(ConfigurationError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "\n" not in message and key in message and override.split("=", 1)[1] in message


def test_validation_covers_each_model(tmp_path):
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg(["model=mindalle", "data=demo", "model.train.mode=prompt"], tmp_path)
    with pytest.raises(ConfigurationError, match=r"model.story.preseqlen.*ctx_len_txt"):
        validate_config(cfg)
    cfg = compose_cfg(["model=mega_tiny", "model.sampler.autocast=fp32"], tmp_path)
    with pytest.raises(ConfigurationError, match="model.sampler.autocast='fp32'"):
        validate_config(cfg)
    cfg = compose_cfg(["model=mindalle_tiny", "model.sentence_encoder.kind=bert"], tmp_path)
    with pytest.raises(ConfigurationError, match="model.sentence_encoder.kind='bert'"):
        validate_config(cfg)
    for model in ("arldm_tiny", "mindalle_tiny", "mega_tiny", "arldm", "mindalle", "mega", "vqgan_tiny"):
        validate_config(compose_cfg([f"model={model}"], tmp_path))  # every shipped config is valid


def test_sample_caption_count_is_checked_before_the_model_is_built(checkpoint, shared_data_dir, tmp_path,
                                                                   monkeypatch):
    import storyexp.tasks.sample as sample_task

    path, _ = checkpoint

    def no_build(cfg):
        raise AssertionError("the model was built before the captions were checked")

    monkeypatch.setattr(sample_task, "build_all", no_build)
    with pytest.raises(ConfigurationError, match=r"sample.captions has 2 captions"):
        run(tmp_path, shared_data_dir, *NO_MODEL, "task=sample", f"ckpt_path={path}", "data.task=visualization",
            "sample.captions=[a,b]", name="captions")
