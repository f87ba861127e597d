"""A test-only callback: the process kills itself with SIGKILL at the end of a given optimizer step (before the
checkpoint callbacks of that step run), like a pre-empted or crashed job. Deterministic: no timing involved."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
