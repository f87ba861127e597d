"""The storyexp command: one app whichever way it starts, its --help, user configs through Hydra's search path,
one-line messages for missing extras, and a tiny train + eval through the real command that prints none of the
known noise (storyexp/cli.py, storyexp/conf/hydra/, storyexp/utils/quiet.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from storyexp import CONFIG_DIR, cli
from storyexp.errors import ConfigurationError
from storyexp.utils import extras
from tests.conftest import REPO, TINY_DEMO, TINY_RUN, compose_cfg

PY = sys.executable
STORYEXP = Path(PY).with_name("storyexp")  # the console script of this environment (pip install -e .)


def run(*args: str, cwd: Path, via: str = "launch", env: dict | None = None) -> subprocess.CompletedProcess:
    """The command three ways: `python launch.py`, `python -m storyexp`, the installed `storyexp` script."""
    head = {"launch": [PY, str(REPO / "launch.py")], "module": [PY, "-m", "storyexp"], "script": [str(STORYEXP)]}
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("STORYEXP_ROOT", None)  # as a user's shell has it: each entry point sets its own
    return subprocess.run([*head[via], *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def config_groups() -> dict[str, list[str]]:
    """Every config group of storyexp/conf (a folder holding yaml files, nested ones as a/b), outside hydra/."""
    groups = {}
    for folder in sorted(p for p in CONFIG_DIR.rglob("*") if p.is_dir()):
        rel = folder.relative_to(CONFIG_DIR).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options and not rel.startswith("hydra"):
            groups[rel] = options
    return groups


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    out = run("--help", cwd=tmp_path_factory.mktemp("help"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_lists_every_task_group_and_example(help_text):
    from storyexp.tasks import TASKS

    tasks = help_text.split("== Tasks (task=...) ==")[1].split("==")[0]
    listed = {line.split()[0] for line in tasks.splitlines() if line.strip()}
    assert set(TASKS) | {"app"} <= listed, set(TASKS) - listed
    assert help_text.startswith("storyexp: ")  # the app's name (hydra.job.name), not the calling file's
    groups = config_groups()
    assert {"model", "data", "trainer", "experiment", "eval/classifier", "launcher"} <= set(groups)
    for group, options in groups.items():
        line = re.search(rf"^{re.escape(group)}: (.*)$", help_text, re.M)
        assert line, f"config group {group} missing from storyexp --help"
        assert line.group(1).split(", ") == options
    examples = help_text.split("== Examples ==")[1]
    commands = [line.split()[1:] for line in examples.splitlines() if line.startswith("  storyexp")]
    assert len(commands) == 5
    joined = [" ".join(c) for c in commands]
    assert any(not c or c[0].startswith("#") for c in commands)  # the demo: no arguments
    assert any("task=eval" in c for c in joined) and any("sample.captions=" in c for c in joined)
    assert any(c.startswith("-m ") for c in joined) and any("experiment=" in c for c in joined)


def test_help_is_the_same_from_every_entry_point(help_text, tmp_path):
    assert run("--help", cwd=tmp_path, via="module").stdout == help_text
    assert run("--help", cwd=tmp_path, via="script").stdout == help_text


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job", "experiment=arldm_pororo"]])
def test_help_and_composition_import_no_torch(args, tmp_path):
    code = ("import sys; sys.argv = ['storyexp', *sys.argv[1:]]\nfrom storyexp import cli\ntry:\n    cli.main()\n"
            "except SystemExit:\n    pass\nprint('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'lightning', 'diffusers', 'transformers'}))")
    out = subprocess.run([PY, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_every_entry_point_composes_the_same_job_named_storyexp(tmp_path):
    args = ["model=arldm_tiny", "seed=7"]
    jobs = {via: run("--cfg", "job", *args, cwd=tmp_path, via=via) for via in ("launch", "module", "script")}
    assert all(j.returncode == 0 for j in jobs.values()), {v: j.stderr for v, j in jobs.items()}
    assert len({j.stdout for j in jobs.values()}) == 1
    assert yaml.safe_load(jobs["script"].stdout)["seed"] == 7
    for via in ("launch", "module"):
        hydra_cfg = yaml.safe_load(run("--cfg", "hydra", cwd=tmp_path, via=via).stdout)["hydra"]
        assert hydra_cfg["job"]["name"] == "storyexp"


def test_a_users_experiment_composes_through_config_dir_and_searchpath(tmp_path):
    mine = tmp_path / "my_configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: arldm_tiny\nseed: 1234\ntags: [mine]\n")
    expected = run("--cfg", "job", "model=arldm_tiny", "seed=1234", "tags=[mine]", cwd=tmp_path)
    assert expected.returncode == 0, expected.stderr
    by_flag = run("--config-dir", str(mine), "--cfg", "job", "experiment=mine", cwd=tmp_path, via="script")
    by_path = run("--cfg", "job", f"hydra.searchpath=[file://{mine}]", "experiment=mine", cwd=tmp_path)
    for out in (by_flag, by_path):
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected.stdout
    assert yaml.safe_load(by_flag.stdout)["seed"] == 1234


# ------------------------------------------------------------------------------------ missing extras, one line


@pytest.mark.parametrize("argv, picked", [(["-m", "launcher=slurm", "seed=1,2"], "slurm"),
                                          (["-m", "launcher=local,submitit_local"], "submitit_local")])
def test_a_submitit_launcher_without_its_extra_is_one_line(monkeypatch, capsys, argv, picked):
    assert cli.launcher_extra_error(argv) is None  # installed here (requirements.txt)
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)  # as if not installed
    monkeypatch.setattr(sys, "argv", ["storyexp", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"storyexp: error: launcher={picked} needs the hydra-submitit-launcher package: "
                   "pip install 'storyexp[slurm]' (or pip install -r requirements.txt in a checkout).\n")
    assert cli.launcher_extra_error(["launcher=local", "seed=1"]) is None


def test_deepspeed_without_its_extra_is_one_line(monkeypatch, tmp_path):
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg(TINY_DEMO + ["model=mega_tiny", "trainer=deepspeed"], tmp_path)
    monkeypatch.setattr(extras, "is_installed", lambda module: module != "deepspeed")
    with pytest.raises(ConfigurationError) as err:
        validate_config(cfg)
    assert str(err.value) == ("trainer=deepspeed needs the deepspeed package: pip install 'storyexp[deepspeed]' "
                              "(or pip install -r requirements.txt in a checkout).")


def test_adamw8bit_without_its_extra_is_one_line(monkeypatch):
    from storyexp.systems.schedules import make_adamw

    monkeypatch.setattr(extras, "is_installed", lambda module: module != "bitsandbytes")
    param = torch.nn.Parameter(torch.zeros(2))
    opt = {"impl": "adamw8bit", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.99]}
    with pytest.raises(ConfigurationError) as err:
        make_adamw([param], opt, param.device)
    assert str(err.value) == ("model.optimizer.impl=adamw8bit needs the bitsandbytes package: "
                              "pip install 'storyexp[bnb]' (or pip install -r requirements.txt in a checkout).")


# ------------------------------------------------------------------------------------------------- the terminal

NOISE = [
    "litlogger",  # Lightning's advertisements (on every Trainer(); with its default ModelCheckpoint)
    "litmodels",
    "Test metric",  # Lightning's own results table (storyexp prints its table)
    "DataLoader 0",
    "dirpath has changed",  # a training checkpoint's ModelCheckpoint state restored into eval's callbacks
    "callbacks used to create the checkpoint need to be provided",  # ... and eval without them
    "INFO: ",  # lightning's own console handler printing every Lightning line a second time
    "gemm_4bit_forward",  # bitsandbytes' CPU kernel notice
]


@pytest.mark.slow  # two real runs through the command (about a minute on a busy 2-core machine)
def test_tiny_train_and_eval_print_no_known_noise(shared_data_dir, tmp_path):
    # eval=loss_only: no classifier or FID to prepare (what is checked here is the terminal, not the metrics)
    common = [*TINY_DEMO, *TINY_RUN, "eval=loss_only", f"paths.data_dir={shared_data_dir}",
              f"paths.log_dir={tmp_path / 'logs'}", "print_config=false", "callbacks.progress_log.every_n_steps=1"]
    train = run(*common, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    (ckpt,) = (tmp_path / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    evaluate = run(*common, "task=eval", f"ckpt_path={ckpt}", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    for name, out in (("train", train), ("eval", evaluate)):
        text = out.stdout + out.stderr
        assert "storyexp results" in text and "test/loss" in text  # storyexp's table stays
        for noise in NOISE:
            assert noise not in text, f"{name} printed {noise!r}"
    # not a terminal: progress as log lines (callbacks.progress_log when=auto), and no progress bar
    assert re.search(r"step 1/2 \| epoch 1/1 \| train/loss [0-9.]+ \| [0-9.e+-]+ it/s \| ETA ", train.stdout)
    assert re.search(r"step 2/2 \| ", train.stdout)
    assert "Epoch 0/0" not in train.stdout and "Testing" not in train.stdout + evaluate.stdout
    # the run's log file (named after the task) holds each Lightning line once, and so does the console
    (log_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/train.log")
    assert log_file.read_text().count("`Trainer.fit` stopped") == 1
    assert train.stdout.count("`Trainer.fit` stopped") == 1


def test_the_wandb_logger_passes_no_anonymous_setting(tmp_path):
    """wandb warns "The anonymous setting has no effect" for any value of it but its own unset marker, and
    Lightning's WandbLogger always passes anonymous=None: storyexp's logger must not hand it on."""
    from hydra.utils import instantiate

    from storyexp.utils import register_resolvers

    register_resolvers()
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    logger = instantiate(cfg.logger.wandb)
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["project"] == "storyexp"
