"""ProgressLog (storyexp/callbacks/progress_log.py): one log line every N optimizer steps when stdout is not a
terminal, with the progress bar's loss, it/s, ETA and epoch; the RichProgressBar disabled meanwhile."""

from __future__ import annotations

import csv
import logging
import math
import re
import sys

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from storyexp.callbacks import ProgressLog
from storyexp.callbacks.progress_log import format_eta
from storyexp.errors import ConfigurationError
from storyexp.tasks import build_callbacks
from storyexp.utils import register_resolvers
from tests.conftest import TINY_DEMO, TINY_RUN, compose_cfg, run_composed

LINE = re.compile(r"^step (\d+)/(\d+) \| epoch (\d+)/(\d+) \| train/loss (\S+) \| (\S+) it/s \| ETA (\S+)$")
# a short fit, no test loop: the progress lines are what is checked
FIT = [*TINY_DEMO, *TINY_RUN, "eval=loss_only", "test_after_fit=false", "trainer.max_steps=4",
       "callbacks.progress_log.every_n_steps=2"]


def test_the_default_config_composes_progress_log(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.callbacks.progress_log == {"_target_": "storyexp.callbacks.ProgressLog", "every_n_steps": 50,
                                          "when": "auto"}
    cfg = compose_cfg(["callbacks.progress_log.when=never", "callbacks.progress_log.every_n_steps=7"],
                      tmp_path)
    assert (cfg.callbacks.progress_log.when, cfg.callbacks.progress_log.every_n_steps) == ("never", 7)


def progress_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "storyexp.progress"]


def test_lines_at_every_n_steps_with_the_logged_loss(shared_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="storyexp.progress")
    _, out = run_composed([*FIT, "callbacks.progress_log.when=always"], tmp_path, shared_data_dir)
    lines = progress_records(caplog)
    assert len(lines) == 2, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    # the CSV logger's train/loss rows (trainer.log_every_n_steps=1): the loss of each optimizer step
    (metrics_csv,) = out.rglob("metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics_csv.open()) if row.get("train/loss")]
    assert len(losses) == 4
    for match, step in zip(parsed, (2, 4)):
        assert (int(match[1]), int(match[2]), int(match[3]), int(match[4])) == (step, 4, 1, 1)
        assert float(match[5]) == pytest.approx(losses[step - 1], rel=1e-5)
        assert float(match[6]) > 0 and math.isfinite(float(match[6]))
        assert re.fullmatch(r"\d+:\d\d:\d\d", match[7])
    assert parsed[-1][7] == "0:00:00"  # nothing left after the last step


def test_nothing_under_when_never(shared_data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="storyexp.progress")
    run_composed([*FIT, "trainer.max_steps=2", "callbacks.progress_log.when=never",
                  "callbacks.progress_log.every_n_steps=1"], tmp_path, shared_data_dir)
    assert progress_records(caplog) == []


@pytest.mark.parametrize("when, tty, active", [("auto", False, True), ("auto", True, False),
                                               ("always", True, True), ("never", False, False)])
def test_auto_follows_the_terminal_and_disables_the_bar(monkeypatch, tmp_path, when, tty, active):
    register_resolvers()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    cfg = compose_cfg(["model=arldm_tiny", f"callbacks.progress_log.when={when}"], tmp_path)
    callbacks = build_callbacks(cfg)
    (progress,) = [c for c in callbacks if isinstance(c, ProgressLog)]
    (bar,) = [c for c in callbacks if isinstance(c, RichProgressBar)]
    assert progress.active is active
    assert bar.is_disabled is active


@pytest.mark.parametrize("kwargs, key", [({"when": "sometimes"}, "when='sometimes'"),
                                         ({"every_n_steps": 0}, "every_n_steps=0")])
def test_bad_options_are_one_line(kwargs, key):
    with pytest.raises(ConfigurationError) as err:
        ProgressLog(**kwargs)
    assert f"callbacks.progress_log.{key} is not valid" in str(err.value) and "\n" not in str(err.value)


def test_eta_format():
    assert format_eta(3725.4) == "1:02:05"
    assert format_eta(math.inf) == "?" and format_eta(-1) == "?"
