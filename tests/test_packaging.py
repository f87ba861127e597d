"""The installable tool: a wheel built from this tree holds the whole config tree, the launcher plugin and the
LICENSE; installed (not editable) into a fresh environment it gives a working `storyexp` command that runs from
an empty directory, writing data/ and logs/ there (pyproject.toml, storyexp/cli.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from storyexp import CONFIG_DIR
from tests.conftest import REPO, TINY_DEMO, TINY_RUN

# what a wheel is built from (the rest of the checkout, tests and data, is not part of the package)
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "storyexp", "hydra_plugins"]


def tree_yaml() -> list[str]:
    """Every config file of the tree a wheel must ship (a checkout's own conf/local/*.yaml excepted)."""
    return sorted(f"storyexp/conf/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")
                  if p.parent.name != "local")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (a build in the checkout would leave build/ there), with a
    conf/local/default.yaml of a user's own in the copy, which must not ship."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    (src / "storyexp" / "conf" / "local" / "default.yaml").write_text("# @package _global_\nseed: 99\n")
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (built,) = dist.glob("storyexp-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its other dependencies are this environment's
    site-packages, reached through a .pth file (no network). Only plain path lines: this environment's editable
    finder (a .pth there) is not run, so `storyexp` can only come from the wheel."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "storyexp_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return root


def in_venv(venv: Path, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORYEXP_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_config_tree_plugin_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in tree_yaml() if name not in names]
    assert not missing, missing
    assert len(tree_yaml()) > 50 and "storyexp/conf/hydra/help/storyexp.yaml" in names
    assert "storyexp/conf/local/default.yaml" not in names  # a user's own overrides stay in the checkout
    assert "hydra_plugins/storyexp_launcher.py" in names
    assert not any(name.startswith("hydra_plugins/__init__") for name in names)  # a namespace package
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "storyexp = storyexp.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "data/", "logs/")) for n in names)


def test_the_installed_command_helps_from_an_empty_directory(venv, tmp_path):
    where = in_venv(venv, str(venv / "bin" / "python"), "-c",
                    "import storyexp, hydra_plugins.storyexp_launcher as p; print(storyexp.__file__); print(p.__file__)",
                    cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():  # the wheel's copies, not this checkout (no editable finder)
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    for command in ([str(venv / "bin" / "storyexp"), "--help"], [str(venv / "bin" / "python"), "-m", "storyexp",
                                                                 "--help"]):
        out = in_venv(venv, *command, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("storyexp: ") and "== Tasks (task=...) ==" in out.stdout
        assert "experiment: arldm_flintstones" in out.stdout
    assert not list(tmp_path.iterdir())  # --help writes nothing


@pytest.mark.slow  # a real (tiny) train + test run through the installed command: ~30 s on 2 busy cores
def test_the_installed_command_runs_the_demo_in_the_working_directory(venv, tmp_path):
    out = in_venv(venv, str(venv / "bin" / "storyexp"), *TINY_DEMO, *TINY_RUN, "eval=loss_only",
                  "print_config=false", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data" / "demo").is_dir()  # data/ under the working directory
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # and logs/
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/loss"] > 0 and metrics["test/loss"] > 0
    assert (run / "train.log").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    hydra_cfg = (run / ".hydra" / "hydra.yaml").read_text()
    assert "name: storyexp" in hydra_cfg
