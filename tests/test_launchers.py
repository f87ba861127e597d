"""Beyond one process: the SLURM launcher's job settings (composed and turned into an sbatch script, not submitted:
there is no SLURM here), the requeue signal of a plain sbatch job (a checkpoint, then `scontrol requeue`), and a
multirun through submitit's local executor with a pre-empted job that is requeued and resumes (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict, read_write

from .conftest import REPO, TINY_DEMO, TINY_RUN, compose_cfg, run_composed

# the tiny run with checkpoints only (callbacks=minimal: no story grids, no sampling)
TINY_MINIMAL = TINY_DEMO + [o for o in TINY_RUN if not o.startswith("callbacks.")] + [
    "callbacks=minimal", "test_after_fit=false", "eval=loss_only"]


def _sbatch_of(cfg, monkeypatch) -> tuple[str, object, list]:
    """Run the configured launcher's `launch()` up to the submission: (sbatch script, executor, submissions)."""
    import hydra
    from submitit.slurm.slurm import SlurmExecutor

    seen: dict = {}

    def capture(self, delayed_submissions):
        seen["executor"], seen["submissions"] = self, delayed_submissions
        return []  # nothing submitted, no job to wait for

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were installed
    monkeypatch.setattr(SlurmExecutor, "_internal_process_submissions", capture)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0) == []
    executor = seen["executor"]
    sbatch = executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    return sbatch, executor, seen["submissions"]


def test_slurm_launcher_follows_the_trainer_and_requeues_into_the_same_run(tmp_path, monkeypatch):
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    overrides = ["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                 "hydra.launcher.partition=gpu"]
    cfg = compose_cfg(overrides, tmp_path)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 90
    # Hydra finds the launcher (plugins load only from the hydra_plugins package)
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert launcher._target_ in found

    sbatch, executor, submissions = _sbatch_of(cfg, monkeypatch)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                 "--time=1440", "--partition=gpu", f"--signal=USR2@{launcher.signal_delay_s}"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert f"export STORYEXP_ROOT={cfg.paths.root_dir}\n" in sbatch
    assert executor.max_num_timeout == launcher.max_num_timeout
    assert executor.python.strip("'") == sys.executable  # jobs run this environment's interpreter

    # a job unpickles the launcher by value (no import of hydra_plugins/ needed) and rebuilds its config with the
    # launch's resolver cache: the same sweep directory, though ${now:} (microseconds) would tell a new one apart
    import cloudpickle

    job = cloudpickle.loads(cloudpickle.dumps(submissions[0]))
    assert job.args[0] == ["seed=1"] and job.args[2] == 0
    fresh = compose_cfg(overrides, tmp_path)
    assert str(fresh.hydra.sweep.dir) != str(cfg.hydra.sweep.dir)
    fresh = compose_cfg(overrides, tmp_path)
    OmegaConf.copy_cache(from_config=job.function.config, to_config=fresh)  # what load_sweep_config does
    assert str(fresh.hydra.sweep.dir) == str(cfg.hydra.sweep.dir)

    # requeued by submitit, the job resumes (ckpt_path=last) once its run directory holds a checkpoint
    from hydra.core.hydra_config import HydraConfig

    run_dir = tmp_path / "job"
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    args = (["seed=1", "ckpt_path=/elsewhere.ckpt"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    assert job.function.checkpoint(*args).args[0] == args[0]  # nothing to resume from yet: the same job
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "preempted.ckpt").write_bytes(b"")
    again = job.function.checkpoint(*args)
    assert again.args[0] == ["seed=1", "ckpt_path=last"] and again.args[1:] == args[1:]


def test_slurm_requeue_signal_saves_the_step_then_requeues(tmp_path, shared_data_dir, monkeypatch):
    """A plain sbatch + srun job gets SIGUSR1 (`#SBATCH --signal=USR1@300`) during step 1: that step is saved at its
    end into checkpoints/, `scontrol requeue <job>` runs (a stand-in here: no SLURM), the fit stops cleanly. Lightning's
    own SLURM handler, which would save hpc_ckpt_1.ckpt inside the signal handler, is replaced for the fit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # one SLURM task, so Lightning detects SLURMEnvironment (auto-requeue on) as under srun
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "storyexp", "SLURM_NTASKS": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGUSR1)
    overrides = TINY_MINIMAL + [
        "+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=1",
        "+callbacks.kill.signal=SIGUSR1"]
    with pytest.raises(SystemExit) as stopped:
        run_composed(overrides, tmp_path, shared_data_dir)
    assert stopped.value.code in (None, 0)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["preempted.ckpt"]
    state = torch.load(out / "checkpoints" / "preempted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert calls.read_text() == "requeue 4242\n"
    assert not list(out.rglob("hpc_ckpt_*"))
    assert signal.getsignal(signal.SIGUSR1) == before  # the fit's handlers are gone with it


@pytest.mark.slow
def test_submitit_local_multirun_with_a_preempted_job(tmp_path, shared_data_dir):
    """Two jobs through submitit's local executor, the same run but job 0 is pre-empted (submitit's USR2) after step
    1: it saves, submitit requeues it, and it resumes with ckpt_path=last in its own directory. Both complete, and
    the requeued job ends with the weights of the uninterrupted one."""
    from storyexp.tasks import build_datamodule

    build_datamodule(compose_cfg(TINY_DEMO, tmp_path, data_dir=shared_data_dir)).prepare_data()  # not by 2 jobs at once
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "STORYEXP_DATA_DIR": str(shared_data_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # jobs import tests/
    args = [sys.executable, str(REPO / "launch.py"), "-m", "launcher=submitit_local", *TINY_MINIMAL,
            "trainer.max_steps=-1", "trainer.limit_train_batches=2",
            "+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.signal=SIGUSR2",
            "+callbacks.kill.step=1,99", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0", "1"]  # no new run dir
    finals = []
    for job in ("0", "1"):
        run_dir = sweep / job
        assert "val/loss" in json.loads((run_dir / "metrics.json").read_text())
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 2
        finals.append(last["state_dict"])
    log = (sweep / "0" / "train.log").read_text()
    assert "requeue signal SIGUSR2 at step 1" in log and "ckpt_path=last" in log
    assert "ckpt_path=last" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path=last" not in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert not (sweep / "0" / "checkpoints" / "preempted.ckpt").exists()  # superseded once the job completed
    for key, value in finals[1].items():
        assert torch.equal(finals[0][key], value), key


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_is_terminated(tmp_path, shared_data_dir):
    """trainer=ddp_cpu (2 processes), SIGTERM to rank 1 only during step 1: both ranks save step 1 and stop (with
    Lightning's own SIGTERM handler, rank 1 blocks in the broadcast it issues from the handler); the run resumes."""
    from storyexp.tasks import build_datamodule

    build_datamodule(compose_cfg(TINY_DEMO, tmp_path, data_dir=shared_data_dir)).prepare_data()
    env = {**os.environ, "WANDB_MODE": "disabled", "STORYEXP_DATA_DIR": str(shared_data_dir), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "launch.py"), *[o for o in TINY_MINIMAL if not o.startswith("trainer=")],
            "trainer=ddp_cpu", "trainer.max_steps=-1", "trainer.limit_train_batches=3",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"]
    kill = ["+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=1",
            "+callbacks.kill.signal=SIGTERM", "+callbacks.kill.rank=1"]
    stopped = subprocess.run(args + kill, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["preempted.ckpt"]
    state = torch.load(run_dir / "checkpoints" / "preempted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    resumed = subprocess.run(args + ["ckpt_path=last"], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
