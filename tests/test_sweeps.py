"""Sweeps in both ecosystems: the Optuna presets (objective rule, keys, 2-trial runs on the tiny sizes), the W&B
sweep files (every parameter a key of its experiment), the SLURM agent scripts, and the W&B naming of sweep runs."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, read_write

import storyexp.utils  # noqa: F401 (registers the config resolvers, as launch.py does)
from storyexp.errors import ConfigurationError, MissingResourceError

from .conftest import CONF, REPO, TINY_DEMO, TINY_RUN, compose_cfg

SWEEPS = REPO / "sweeps"
FAMILIES = ("arldm", "mindalle", "mega")
PUBLISHED = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("demo"))
MACROS = {"${env}", "${program}", "${args_no_hyphens}"}


def _multirun(cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- Optuna presets


def test_every_family_has_an_optuna_preset_and_every_published_recipe_a_family():
    assert {p.stem for p in (CONF / "hparams_search").glob("*.yaml")} == {f"{f}_optuna" for f in FAMILIES}
    assert PUBLISHED and {e.split("_")[0] for e in PUBLISHED} == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_optuna_preset_composes_at_every_size_with_the_objective_rule(family, tmp_path):
    """Published size (every published recipe of the family): val/fid64, FID required. Tiny and demo sizes
    (model=<family> on data=demo is the demo size): val/loss. Every searched key exists."""
    cases = [([f"experiment={e}"], "val/fid64") for e in PUBLISHED if e.startswith(family + "_")]
    cases += [([f"model={family}_tiny"], "val/loss"), ([f"model={family}_demo"], "val/loss"),
              ([f"model={family}", "data=demo"], "val/loss")]
    for overrides, objective in cases:
        cfg = compose_cfg([f"hparams_search={family}_optuna", *overrides], tmp_path)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert cfg.optimized_metric == objective, overrides
        assert cfg.eval.fid.required is (objective == "val/fid64"), overrides
        assert cfg.hydra.sweeper.study_name == f"{family}-{objective}"
        assert cfg.hydra.sweeper.direction == "minimize" and cfg.test_after_fit is False
        assert "fid" in cfg.eval.val_metrics.metrics and "fid64" in cfg.eval.fid.protocols  # val/fid64 is logged
        for key in cfg.hydra.sweeper.params:
            assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", (overrides, key)


def test_the_command_line_chooses_the_objective(tmp_path):
    cfg = compose_cfg(["hparams_search=arldm_optuna", "experiment=arldm_pororo", "optimized_metric=val/loss"],
                      tmp_path)
    assert cfg.optimized_metric == "val/loss" and cfg.eval.fid.required is False
    assert cfg.hydra.sweeper.study_name == "arldm-val/loss"
    cfg = compose_cfg(["hparams_search=mega_optuna", "model=mega_tiny", "optimized_metric=val/fid64"], tmp_path)
    assert cfg.optimized_metric == "val/fid64" and cfg.eval.fid.required is True


def test_objective_rule():
    from storyexp.utils.resolvers import needs_fid, sweep_objective

    assert sweep_objective("pretrained") == "val/fid64" and sweep_objective("sizes") == "val/loss"
    assert needs_fid("val/fid64") and needs_fid("val/fid") and not needs_fid("val/loss")


def test_an_absent_objective_is_one_line_naming_metric_and_fix(tmp_path, caplog):
    from storyexp.tasks.common import optimized_value

    cfg = _multirun(compose_cfg(["hparams_search=arldm_optuna", "model=arldm_tiny", "optimized_metric=val/fid64"],
                                tmp_path))
    with pytest.raises(ConfigurationError) as err:
        optimized_value(cfg, {"val/loss": 1.0, "train/loss": 2.0})
    message = str(err.value)
    assert "\n" not in message and "optimized_metric=val/fid64 was not logged" in message
    assert "eval.fid.weights" in message and "optimized_metric=val/loss" in message
    with pytest.raises(ConfigurationError, match=r"optimized_metric=val/loss .*limit_val_batches"):
        optimized_value(_multirun(compose_cfg(["hparams_search=arldm_optuna", "model=arldm_tiny"], tmp_path)),
                        {"train/loss": 2.0})
    assert optimized_value(cfg, {"val/fid64": 3.5}) == 3.5  # never another metric in its place
    single = compose_cfg(["model=arldm_tiny", "optimized_metric=val/fid64"], tmp_path)  # a single run: a warning
    assert optimized_value(single, {"val/loss": 1.0}) is None
    assert "optimized_metric=val/fid64 was not logged" in caplog.text


def test_an_fid_objective_without_weights_stops_before_training(tmp_path, shared_data_dir):
    from storyexp.metrics.fid import FID_WEIGHTS_FILE
    from storyexp.tasks import run_task

    cfg = compose_cfg(TINY_DEMO + TINY_RUN + ["hparams_search=arldm_optuna", "optimized_metric=val/fid64",
                                              "callbacks=default", "trainer.limit_train_batches=2"],
                      tmp_path, data_dir=shared_data_dir)
    with pytest.raises(MissingResourceError, match=FID_WEIGHTS_FILE):
        run_task(cfg)
    assert not list((tmp_path / "out").rglob("*.ckpt"))  # no step was trained


# ------------------------------------------------------------------------------------------ W&B sweep files


def _sweep_files() -> list[Path]:
    return sorted((SWEEPS / "wandb").glob("*.yaml"))


def _samples(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def test_every_published_recipe_has_a_wandb_sweep():
    stems = {p.stem for p in _sweep_files()}
    assert {f"{e}_bayes" for e in PUBLISHED} <= stems
    readme = (SWEEPS / "README.md").read_text()
    for path in _sweep_files():
        assert f"wandb/{path.name}" in readme, path.name  # README says what each file backs


@pytest.mark.parametrize("path", _sweep_files(), ids=lambda p: p.stem)
def test_wandb_sweep_file_runs_launch_py_in_the_project_env_and_its_parameters_compose(path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    command = sweep["command"]
    assert sweep["program"] == "launch.py"
    # the project's interpreter, not W&B's ${interpreter} (the bare word `python`, whatever is first on PATH)
    assert command[:3] == ["${env}", ".venv/bin/python", "${program}"] and command[-1] == "${args_no_hyphens}"
    fixed = command[3:-1]
    assert "logger=wandb" in fixed and not any(c.startswith("${") for c in fixed)
    experiment = path.stem.rsplit("_", 1)[0]
    if experiment in PUBLISHED:
        assert f"experiment={experiment}" in fixed
        assert sweep["metric"] == {"name": "val/fid64", "goal": "minimize"}
        assert "eval.fid.required=true" in fixed and "test_after_fit=false" in fixed
    else:
        assert sweep["metric"]["goal"] == "minimize"
    params = sweep["parameters"]
    assert params
    # every key exists before the override (Hydra refuses an unknown key without +) and takes the sampled value
    for sample in range(max(len(_samples(spec)) for spec in params.values())):
        chosen = {key: _samples(spec)[min(sample, len(_samples(spec)) - 1)] for key, spec in params.items()}
        cfg = compose_cfg(fixed + [f"{k}={v}" for k, v in chosen.items()], tmp_path)
        for key, value in chosen.items():
            assert OmegaConf.select(cfg, key) == pytest.approx(value), (path.name, key)
        assert cfg.logger.wandb._target_.endswith("WandbLogger")


# -------------------------------------------------------------------------------------------- SLURM scripts


@pytest.mark.parametrize(("script", "calls"), [
    ("slurm/agent.sbatch", ['"$python" -m wandb agent --count 1']),
    ("launch_wandb_sweep.sh", ['"$python" -m wandb sweep', "sweeps/slurm/agent.sbatch"])])
def test_scripts_parse_and_use_the_project_interpreter(script, calls):
    path = SWEEPS / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert 'python="$root/.venv/bin/python"' in text
    for call in calls:
        assert call in text


def _fake_repo(tmp_path: Path) -> Path:
    """A folder that looks like the repository, whose .venv/bin/python records how it was called."""
    repo = tmp_path / "repo"
    (repo / "sweeps").mkdir(parents=True)
    (repo / "launch.py").write_text("")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/bash\necho "cwd=$(pwd) job=$SLURM_JOB_NAME root=$STORYEXP_ROOT args=$*"\n')
    python.chmod(0o755)
    return repo


def test_agent_array_runs_one_agent_in_the_repository_found_from_the_submit_dir(tmp_path):
    """SLURM runs a copy of the script from its spool folder: the repository comes from $SLURM_SUBMIT_DIR."""
    repo = _fake_repo(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "slurm_script").write_text((SWEEPS / "slurm" / "agent.sbatch").read_text())
    env = {k: v for k, v in os.environ.items() if k != "STORYEXP_ROOT"} | {"SLURM_SUBMIT_DIR": str(repo),
                                                                         "SLURM_JOB_NAME": "storyexp-agent"}
    done = subprocess.run(["bash", str(spool / "slurm_script"), "me/storyexp/abc123"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"cwd={repo} job=interactive root={repo} "
                                   f"args=-m wandb agent --count 1 me/storyexp/abc123")

    (repo / ".venv" / "bin" / "python").unlink()
    done = subprocess.run(["bash", str(spool / "slurm_script"), "x"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "scripts/setup.sh" in done.stderr and len(done.stderr.splitlines()) == 1
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    done = subprocess.run(["bash", str(spool / "slurm_script"), "x"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "STORYEXP_ROOT" in done.stderr and len(done.stderr.splitlines()) == 1
    done = subprocess.run(["bash", str(spool / "slurm_script")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


# ------------------------------------------------------------------------------------ W&B runs of sweep jobs


def test_wandb_name_group_tags_of_a_single_run(tmp_path):
    cfg = compose_cfg(["logger=wandb", "model=arldm_tiny", "model.optimizer.lr=0.001"], tmp_path)
    w = cfg.logger.wandb
    assert w.name == "train-arldm_tiny-demo" and w.group is None
    assert list(w.tags) == ["dev", "arldm_tiny", "demo"]
    cfg = compose_cfg(["logger=wandb", "experiment=mega_flintstones"], tmp_path)
    assert list(cfg.logger.wandb.tags) == ["mega", "flintstones", "continuation"]  # no repeats
    assert compose_cfg(["logger=wandb", "logger.wandb.group=mine"], tmp_path).logger.wandb.group == "mine"


def test_wandb_name_group_tags_of_multirun_jobs(tmp_path):
    # an Optuna trial: named after the sampled keys only (hydra.sweeper.params), grouped by its sweep
    cfg = compose_cfg(["logger=wandb", "hparams_search=arldm_optuna", "model=arldm_tiny", "trainer=cpu",
                       "model.train.cfg_dropout=0.2", "model.optimizer.lr=0.001", "model.lr_schedule.warmup_steps=50"],
                      tmp_path)
    w = cfg.logger.wandb
    assert w.name == "model.lr_schedule.warmup_steps=50,model.optimizer.lr=0.001,model.train.cfg_dropout=0.2"
    assert w.group == f"arldm_optuna-{Path(cfg.hydra.sweep.dir).name}"
    assert {"arldm_tiny", "demo"} <= set(w.tags)
    # a command-line sweep (-m seed=1,2 model=...): every override but the group choices and hydra.*
    cfg = _multirun(compose_cfg(["logger=wandb", "model=mindalle_tiny", "seed=3", "data.batch_size=2",
                                 "hydra.job.chdir=false"], tmp_path))
    w = cfg.logger.wandb
    assert w.name == "data.batch_size=2,seed=3"
    assert w.group == f"multirun-{Path(cfg.hydra.sweep.dir).name}"
    assert {"mindalle_tiny", "demo"} <= set(w.tags)
    assert _multirun(compose_cfg(["logger=wandb", "model=mega_tiny"], tmp_path)).logger.wandb.name == \
        "train-mega_tiny-demo"  # nothing but choices: the single-run name


def test_wandb_name_group_and_id_of_a_wandb_agent_run(tmp_path, monkeypatch):
    """Under `wandb agent`: named after the sampled overrides, grouped by sweep, and the run directory records the
    agent's run id (W&B ignores any other id in a sweep)."""
    params = tmp_path / "config-xyz98765.yaml"
    params.write_text("wandb_version: 1\n\nmodel.optimizer.lr:\n  value: 3.0e-05\nmodel.train.cfg_dropout:\n"
                      "  value: 0.1\n")
    monkeypatch.setenv("WANDB_SWEEP_ID", "ab12cd34")
    monkeypatch.setenv("WANDB_RUN_ID", "xyz98765")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    cfg = compose_cfg(["experiment=arldm_pororo", "logger=wandb", "test_after_fit=false", "eval.fid.required=true",
                       "model.optimizer.lr=3e-05", "model.train.cfg_dropout=0.1"], tmp_path)
    w = cfg.logger.wandb
    assert str(cfg.hydra.mode) != "RunMode.MULTIRUN"  # a plain run; the agent is the sweeper
    assert w.name == "model.optimizer.lr=3e-05,model.train.cfg_dropout=0.1" and w.group == "sweep-ab12cd34"
    assert {"arldm", "pororo"} <= set(w.tags)
    assert w.id == "xyz98765" and (tmp_path / "out" / "wandb_run_id.txt").read_text().strip() == "xyz98765"


# --------------------------------------------------------------------------- 2-trial Optuna runs (launch.py)


def _wandb_run_record(run_dir: Path):
    """The run record (name, group, tags, id) of the offline W&B run in a run directory, read from its .wandb log
    (LevelDB log format: 7-byte file header, 32 KiB blocks, records of crc32/length/type + data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1, files  # one W&B run per job
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {files[0]}")


def _launch_multirun(tmp_path: Path, data_dir: Path, overrides: list[str], callbacks: str = "minimal") -> Path:
    sweep_dir = tmp_path / "sweep"
    tiny = [o for o in TINY_DEMO + TINY_RUN if not o.startswith(("model=", "logger=", "callbacks."))]
    command = [sys.executable, "launch.py", "-m", *overrides, "data=demo", *tiny, "trainer.limit_train_batches=2",
               "logger=wandb", f"callbacks={callbacks}", "print_config=false", "hydra.sweeper.n_trials=2",
               f"paths.data_dir={data_dir}", f"paths.weights_dir={tmp_path / 'weights'}",
               f"hydra.sweep.dir={sweep_dir}"]
    env = os.environ | {"WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep_dir


def _check_trials(sweep_dir: Path, family: str, objective: str) -> None:
    import json

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"])
    searched = set(yaml.safe_load((CONF / "hparams_search" / f"{family}_optuna.yaml").read_text())
                   ["hydra"]["sweeper"]["params"])
    assert set(results["best_params"]) == searched
    values, ids = [], set()
    for trial in ("0", "1"):
        run_dir = sweep_dir / trial
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert math.isfinite(metrics[objective])
        values.append(metrics[objective])
        run = _wandb_run_record(run_dir)
        ids.add(run.run_id)
        assert run.run_id == (run_dir / "wandb_run_id.txt").read_text().strip()
        assert {item.split("=", 1)[0] for item in run.display_name.split(",")} == searched  # the trial's overrides
        assert run.run_group == f"{family}_optuna-sweep"
        assert {f"{family}_tiny", "demo"} <= set(run.tags)
    assert len(ids) == 2  # every job its own W&B run
    assert results["best_value"] == pytest.approx(min(values))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_optuna_two_trials_on_the_tiny_size(family, tmp_path, shared_data_dir):
    """`launch.py -m hparams_search=<family>_optuna model=<family>_tiny`: both trials write their run directory and
    their own W&B run, the sweeper its optimization_results.yaml with a finite best val/loss."""
    sweep_dir = _launch_multirun(tmp_path, shared_data_dir, [f"hparams_search={family}_optuna",
                                                             f"model={family}_tiny"])
    _check_trials(sweep_dir, family, "val/loss")


@pytest.mark.slow
def test_optuna_two_trials_on_the_fid_objective(tmp_path, shared_data_dir, fid_weights):
    """The published sizes' objective, val/fid64, end to end on the tiny AR-LDM (random-valued Inception weights)."""
    sweep_dir = _launch_multirun(tmp_path, shared_data_dir, [
        "hparams_search=arldm_optuna", "model=arldm_tiny", "optimized_metric=val/fid64",
        f"eval.fid.weights={fid_weights}", "eval.val_metrics.num_stories=4", "callbacks.story_grids.num_stories=1"],
        callbacks="default")
    _check_trials(sweep_dir, "arldm", "val/fid64")
