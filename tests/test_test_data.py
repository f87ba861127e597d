"""The test data is checked before any test runs, and a skip outside the allowed list fails the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tests.data_paths as data_paths

REPO = Path(__file__).resolve().parents[1]


def test_the_repository_copy_is_complete_and_intact():
    assert data_paths.verify_test_data() == []
    assert data_paths.parity_dir() == (REPO / "tests" / "data" / "parity").resolve()


def test_a_folder_with_a_missing_file_is_named(tmp_path, monkeypatch):
    copy = tmp_path / "fixtures"
    shutil.copytree(data_paths.fixtures_dir(), copy)
    victim = copy / "h5" / "pororo.h5"
    victim.unlink()
    monkeypatch.setenv("STORYEXP_FIXTURES_DIR", str(copy))
    problems = data_paths.verify_test_data()
    assert len(problems) == 1 and str(victim) in problems[0] and "incomplete" in problems[0]
    monkeypatch.setenv("STORYEXP_FIXTURES_DIR", str(tmp_path / "nowhere"))
    assert "does not exist" in data_paths.verify_test_data()[0]


def test_a_changed_file_in_the_repository_copy_is_caught(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("parity", "fixtures"):
        shutil.copytree(data_paths.DATA / name, data / name)
    shutil.copy(data_paths.MANIFEST, data / "MANIFEST.sha256")
    (data / "parity" / "mega" / "vocab.json").write_text("{}")
    monkeypatch.setattr(data_paths, "DATA", data)
    monkeypatch.setattr(data_paths, "MANIFEST", data / "MANIFEST.sha256")
    monkeypatch.delenv("STORYEXP_PARITY_DIR", raising=False)
    monkeypatch.delenv("STORYEXP_FIXTURES_DIR", raising=False)
    problems = data_paths.verify_test_data()
    assert len(problems) == 1 and "vocab.json" in problems[0] and "differ" in problems[0]


def _pytest_on(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    test = tmp_path / "test_probe.py"
    test.write_text("import pytest\n\n\n" + body)
    # tests/conftest.py loaded as a plugin: the same hooks as the real run, on a probe file outside tests/
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(test)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_the_run_unless_its_reason_is_allowed(tmp_path, monkeypatch):
    # a real pytest run (a subprocess) for the failing case: the hooks are wired into pytest's exit status
    bad = _pytest_on(tmp_path, "def test_x():\n    pytest.skip('data not found')\n")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "a skip is a failure here" in bad.stdout and "data not found" in bad.stdout
    # the allowed reason through the same hooks in this process (a second pytest subprocess costs ~5 s of start-up),
    # with a skip list of its own so this session's skips do not count (pytest's `pytester.runpytest_inprocess` was
    # considered: it would load this same tests.conftest module, whose skip list holds this session's skips)
    import pytest

    import tests.conftest as hooks

    def session_after(reason: str):
        monkeypatch.setattr(hooks, "_SKIPPED", [])
        report = pytest.TestReport("probe.py::test_x", ("probe.py", 0, "test_x"), {}, "skipped",
                                   ("probe.py", 1, f"Skipped: {reason}"), "call")
        hooks.pytest_runtest_logreport(report)
        lines: list[str] = []
        writer = type("Writer", (), {"line": lambda self, text, **kw: lines.append(text)})()
        config = type("Config", (), {"get_terminal_writer": lambda self: writer})()
        session = type("Session", (), {"exitstatus": 0, "config": config})()
        hooks.pytest_sessionfinish(session, 0)
        return session.exitstatus, lines

    assert session_after("needs a CUDA GPU (fused attention)") == (0, [])
    status, lines = session_after("data not found")  # the same hooks refuse the other reason here too
    assert status == 1 and "a skip is a failure here" in lines[0] and "probe.py::test_x: data not found" in lines[0]
