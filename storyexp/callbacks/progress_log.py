"""Training progress as one log line every N optimizer steps, for output that is not a terminal.

A progress bar redraws one line in place: in a file (SLURM's slurm-<job>.out, CI logs, `storyexp ... | tee`) that
is either nothing until the end or thousands of carriage-return fragments. ProgressLog writes a plain line instead
(logger `storyexp.progress`: the console and the run's <task>.log under the storyexp command):

    step 50/1200 | epoch 1/3 | train/loss 0.8123 | 2.41 it/s | ETA 0:07:57

The metrics are the progress bar's own (`trainer.progress_bar_metrics`, what `self.log(..., prog_bar=True)`
recorded: the training loss), it/s counts optimizer steps since the previous line, and the ETA divides the steps
left (`trainer.estimated_stepping_batches`: max_steps, or max_epochs x batches per epoch / accumulation) by the
mean rate of this fit. Rank 0 only.

`when`: auto (active only when sys.stdout is not a terminal), always, never. When active, build_callbacks
(storyexp/tasks/common.py) disables the RichProgressBar of the same run. Lightning has no line-per-N-steps
progress callback of its own (its TQDMProgressBar and RichProgressBar both redraw in place), hence this one.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as L

from storyexp.errors import ConfigurationError

__all__ = ["WHEN", "ProgressLog", "format_eta"]

log = logging.getLogger("storyexp.progress")

WHEN = ("auto", "always", "never")


def format_eta(seconds: float) -> str:
    """h:mm:ss, or ? when unknown (no rate yet, or no end: max_steps=-1 with max_epochs=-1)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(timedelta(seconds=int(round(seconds))))


class ProgressLog(L.Callback):
    def __init__(self, every_n_steps: int = 50, when: str = "auto") -> None:
        if when not in WHEN:
            raise ConfigurationError(f"callbacks.progress_log.when={when!r} is not valid: it must be one of "
                                     f"{', '.join(WHEN)} (auto: only when stdout is not a terminal).")
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ConfigurationError(f"callbacks.progress_log.every_n_steps={every_n_steps!r} is not valid: it must "
                                     "be a whole number of optimizer steps >= 1.")
        self.every_n_steps = every_n_steps
        self.when = when
        # decided once, when the run's callbacks are built (a run does not move between a terminal and a file)
        self.active = when == "always" or (when == "auto" and not _isatty(sys.stdout))
        self._total: float = math.inf
        self._start = (0.0, 0)  # (time, global step) when this fit's training started
        self._last = (0.0, 0)  # ... at the previous line

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._total = float(trainer.estimated_stepping_batches)
        now = time.perf_counter()
        self._start = self._last = (now, trainer.global_step)  # a resumed fit counts from where it resumed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps (the batch end of an accumulating micro-batch repeats it)
        if not self.active or not trainer.is_global_zero or step == self._last[1] or step % self.every_n_steps:
            return
        now = time.perf_counter()
        rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
        mean_rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)
        self._last = (now, step)
        log.info(self.line(trainer, rate, (self._total - step) / mean_rate if mean_rate > 0 else math.inf))

    def line(self, trainer: L.Trainer, rate: float, eta_s: float) -> str:
        step = trainer.global_step
        parts = [f"step {step}/{int(self._total)}" if math.isfinite(self._total) else f"step {step}"]
        max_epochs = trainer.max_epochs
        epoch = trainer.current_epoch + 1
        parts.append(f"epoch {epoch}/{max_epochs}" if max_epochs and max_epochs > 0 else f"epoch {epoch}")
        for name, value in trainer.progress_bar_metrics.items():
            if isinstance(value, (int, float)):
                parts.append(f"{name} {value:.6g}")
        parts.append(f"{rate:.3g} it/s")
        parts.append(f"ETA {format_eta(eta_s)}")
        return " | ".join(parts)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
