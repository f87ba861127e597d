"""A test-only callback: the process sends itself a signal at the end of a given optimizer step (before the
checkpoint callbacks of that step run), like a pre-empted or crashed job. Deterministic: no timing involved.

SIGKILL (the default) ends the process there. A handled signal (SIGTERM, SIGUSR1 for SLURM's requeue, SIGUSR2 for
submitit's) runs its Python handler right after ``os.kill`` returns, in the main thread, so the signal has arrived
by the time the rest of that batch end (the checkpoint callbacks, ``storyexp.callbacks.Preemption`` among them)
runs: it came "during" that step. ``rank``: only that DDP process signals itself (None: every process)."""

from __future__ import annotations

import os
import signal as signals

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, signal: str = "SIGKILL", rank: int | None = None):
        self.step = int(step)
        self.signum = signals.Signals[signal]
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)
