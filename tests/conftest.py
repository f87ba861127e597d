"""Shared test helpers: compose the real config tree with small overrides, point every path at tmp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from storyexp import CONFIG_DIR
from tests.data_paths import fixtures_dir, parity_dir, verify_test_data  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]
CONF = CONFIG_DIR

os.environ.setdefault("STORYEXP_ROOT", str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The only skips a run may report: tests that need hardware this machine lacks. Any other skip fails the run
# (see pytest_sessionfinish), so a missing file or package can never pass silently. README.md, "Tests".
ALLOWED_SKIP_PREFIXES = ("needs a CUDA GPU",)


def pytest_sessionstart(session) -> None:
    """Fail before the first test when the parity or fixture data is missing or incomplete."""
    problems = verify_test_data()
    if problems:
        pytest.exit("storyexp test data: " + "; ".join(problems), returncode=3)


_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_collectreport(report) -> None:
    pytest_runtest_logreport(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    unexpected = [(node, why) for node, why in _SKIPPED if not why.startswith(ALLOWED_SKIP_PREFIXES)]
    if unexpected and exitstatus == 0:
        session.exitstatus = 1
        lines = "\n".join(f"  {node}: {why}" for node, why in unexpected[:20])
        session.config.get_terminal_writer().line(
            f"\n{len(unexpected)} test(s) skipped for a reason not on tests/conftest.py's ALLOWED_SKIP_PREFIXES; "
            f"a skip is a failure here:\n{lines}", red=True)


# A small demo set shared by the whole session (generated once, a few seconds).
TINY_DEMO = [
    "data.demo.n_train=48",
    "data.demo.n_val=8",
    "data.demo.n_test=8",
    "data.demo.resolution=32",
    "data.batch_size=4",
    "data.num_workers=0",
]

# The tiny AR-LDM and a run that takes seconds on CPU.
TINY_RUN = [
    "model=arldm_tiny",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "eval.classifier.epochs=4",
    "eval.classifier.batch_size=16",
    "eval.classifier.lr=3e-3",
    "eval.num_grid_stories=2",
    "callbacks.story_grids.num_stories=2",
    "logger=csv",
]


def compose_cfg(overrides: list[str], tmp_path: Path, data_dir: Path | None = None):
    """Compose storyexp/conf/config.yaml like launch.py would, with every output under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(data_dir or tmp_path / "data")
        cfg.paths.weights_dir = str(tmp_path / "weights")
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """One data folder for the session, so the tiny demo set and classifier are built once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def demo_train_batch(tmp_path_factory, shared_data_dir) -> dict:
    """The first training batch of the tiny demo set (TINY_DEMO: 4 stories), for tests that run a model on one."""
    import hydra

    cfg = compose_cfg(TINY_DEMO, tmp_path_factory.mktemp("batch"), data_dir=shared_data_dir)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tiny models run faster on one thread than on two that stall each other on a shared machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_composed(overrides: list[str], tmp_path: Path, data_dir: Path) -> tuple[dict, Path]:
    """Compose, run the task, return (metrics.json or {}, the run's output folder)."""
    import json

    from storyexp.tasks import run_task

    cfg = compose_cfg(overrides, tmp_path, data_dir=data_dir)
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return metrics, out


def random_fid_inception_state_dict(seed: int = 0) -> dict:
    """pytorch-fid's ``fid_inception_v3`` body without its download: the same modules, random values (the published
    weights cannot be downloaded here; both storyexp and pytorch-fid load this file in the FID tests)."""
    import torch
    from pytorch_fid import inception as pfid_inception

    torch.manual_seed(seed)
    net = pfid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pfid_inception.FIDInceptionE_2(2048)
    for m in net.modules():  # variance-preserving random init, so pool3 features are O(1) and varied
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    return net.state_dict()


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> Path:
    """A random-valued FID Inception weights file under its published name, written once per session."""
    import torch

    from storyexp.metrics.fid import FID_WEIGHTS_FILE

    path = tmp_path_factory.mktemp("fid_weights") / FID_WEIGHTS_FILE
    torch.save(random_fid_inception_state_dict(), path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _no_local_fid_weights(tmp_path_factory):
    """Tests decide themselves whether FID weights exist: a developer's $STORYEXP_FID_WEIGHTS or torch hub cache
    would otherwise turn FID on in every run."""
    saved = {k: os.environ.get(k) for k in ("STORYEXP_FID_WEIGHTS", "TORCH_HOME")}
    os.environ.pop("STORYEXP_FID_WEIGHTS", None)
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def storyexp_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The `storyexp` command (storyexp.cli.main: Hydra's argument parsing, composition, error reporting and the
    CLI's one-line user errors) run in this process with `args` as its command line, from `cwd` with launch.py's
    environment; returns (exit status, stderr). A subprocess would add ~7 s of interpreter start-up and imports per
    call on 2 cores; one subprocess test (test_checkpoints_and_seeding's
    test_a_bad_trainer_value_is_one_line_before_anything_is_built) keeps the real command line covered.
    pytest's own `pytester.run` was considered: it starts a subprocess too."""
    import logging
    import sys

    from storyexp import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["storyexp", *args])
    for key, value in {"WANDB_MODE": "disabled", "STORYEXP_DATA_DIR": str(cwd / "data"),
                       "STORYEXP_WEIGHTS_DIR": str(cwd / "weights"), "STORYEXP_ROOT": str(REPO)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # Hydra configures logging for the job (a file handler in the run folder): put the session's back afterwards
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main()
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        GlobalHydra.instance().clear()
    code = stopped.value.code
    return (0 if code is None else code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, shared_data_dir) -> tuple[dict, Path, Path]:
    """One tiny AR-LDM continuation run for the session (2 training steps, validation, test with sampling and the
    demo metrics): (metrics.json, its output folder, a folder beside it for runs that start from it). Read by
    test_tasks.py and test_checkpoints_and_seeding.py, which each trained the same run before. Its files are only
    read: tests that change a checkpoint write their copy under their own tmp_path."""
    tmp = tmp_path_factory.mktemp("trained")
    metrics, out = run_composed(TINY_DEMO + TINY_RUN + ["trainer.limit_train_batches=2", "trainer.max_steps=-1"],
                                tmp / "run", shared_data_dir)
    return metrics, out, tmp


def run_forked(fn, args: tuple, nprocs: int = 2, timeout: float = 600) -> None:
    """`fn(rank, *args)` in `nprocs` processes forked from this one (torch.multiprocessing.start_processes with
    start_method="fork": no interpreter start-up or re-imports, ~7 s each on 2 cores, unlike spawn or torchrun);
    raises what a process raised, and fails rather than waits forever should one hang (a lock held by another
    thread at the fork): the processes are killed after `timeout` seconds. CPU only (torch runs 1 thread here)."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):  # re-raises a failed process's exception, after ending the others
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"forked processes still running after {timeout:.0f} s")


# one optimizer step, no validation or test: a checkpoint with its model record, in seconds
ONE_STEP_TRAIN = ["trainer=cpu", "trainer.max_epochs=1", "trainer.max_steps=1", "trainer.limit_val_batches=0",
                  "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false", "callbacks=minimal",
                  "logger=none", "print_config=false", "test_after_fit=false", "eval=loss_only"]


@pytest.fixture(scope="session")
def one_step_checkpoint(tmp_path_factory, shared_data_dir):
    """`make(model, task)`: the last.ckpt of a one-step tiny run of `model=<model> data.task=<task>` on the shared demo
    set, trained once per session for each pair (test_sample_without_data.py and test_app.py sample the same ones).
    Only read: a test that changes a checkpoint writes its copy under its own tmp_path."""
    from storyexp.tasks import run_task

    made: dict[tuple[str, str], Path] = {}

    def make(model: str, task: str) -> Path:
        if (model, task) not in made:
            tmp = tmp_path_factory.mktemp(f"{model}_{task}")
            cfg = compose_cfg(TINY_DEMO + ONE_STEP_TRAIN + [f"model={model}", f"data.task={task}"], tmp,
                              data_dir=shared_data_dir)
            run_task(cfg)
            made[model, task] = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return made[model, task]

    return make
