"""Pre-emption: on SIGTERM or a scheduler's requeue signal, the training state is written at the next safe point,
the process stops, and a SLURM / submitit job is requeued; the run resumes from it with ``ckpt_path=last``.

What Lightning 2.6 does by itself, and what this callback adds to it (one mechanism for every way a job is run):

- **SIGTERM** (``kill``, ``scancel``, SLURM's pre-emption and time limit, torchrun stopping its workers). Lightning's
  signal connector, installed at the start of every fit, only sets ``trainer.received_sigterm`` (and, on the
  process that launched the DDP children, forwards the signal to them); the training loop raises
  ``SIGTERMException`` (a ``SystemExit``: exit status 0) after the batch and its validation, the evaluation loop
  after a validation batch. It writes no checkpoint. Here the state is saved at the end of the batch during which
  the signal came, before any validation that batch would start (a validation run can outlast SLURM's grace period),
  and the same ``SIGTERMException`` stops the fit. A ``SIGTERMException`` that Lightning raises elsewhere (in the
  middle of a validation run) is saved from ``on_exception``: Lightning resumes a fit in the middle of validation.
- **SLURM's requeue signal** (``#SBATCH --signal=USR1@<seconds>``, plain ``sbatch`` + ``srun``:
  ``scripts/slurm_train.sbatch``). With SLURM detected, Lightning's ``SLURMEnvironment(auto_requeue=True)`` writes
  ``hpc_ckpt_<n>.ckpt`` *inside the signal handler* -- at whatever bytecode the signal interrupts (parameters
  updated, optimizer state not yet; under DDP with a collective issued from the handler) and outside
  ``checkpoints/`` where ``ckpt_path=last`` looks -- then runs ``scontrol requeue``. For the fit, this callback
  replaces that handler (installed by Lightning just before ``on_train_start``, restored by Lightning's teardown):
  the signal is recorded, the state saved at the next batch end, then rank 0 runs ``scontrol requeue``.
- **submitit** (``launcher=slurm``, ``launcher=submitit_local``). submitit's handler for its own signal (USR2, or
  ``$SUBMITIT_PREEMPT_SIGNAL``) calls the launcher's ``checkpoint()``, requeues the job and exits at once, mid-step,
  without a checkpoint. Here it is deferred the same way and called after the save (chained to the previous
  handler); storyexp's launcher (``hydra_plugins/storyexp_launcher.py``) makes the resubmitted job resume with
  ``ckpt_path=last`` in its own run directory. submitit ignores SIGTERM; after a SIGTERM the state is saved and
  submitit's ``checkpoint_and_exit`` records the resuming resubmission, so a job SLURM requeues after pre-empting it
  resumes too.

Under DDP the ranks must stop at the same step (a checkpoint is a collective). Every rank reaches
``on_train_batch_end`` at every step, and there they agree (one max-reduce of a small integer) whether any of them
was signalled. Lightning's SIGTERM handling does not hold under DDP: its handler issues a ``broadcast`` from inside
the signal handler, and its stop checks are per rank, so ranks signalled at different moments hang (seen with two
gloo processes, only rank 1 signalled: rank 1 blocked in the handler's broadcast). So with more than one process
this callback also takes SIGTERM over for the fit: its handler records the signal and forwards it to the processes
Lightning launched (as Lightning's does: ``strategy.launcher.kill``), and the agreed decision stops the fit; a SIGTERM
during a validation run then takes effect at the next batch end. One process keeps Lightning's handler.

The signal must leave time for the rest of a batch, a validation run already under way and one checkpoint write:
``--signal=USR1@300`` / ``hydra.launcher.signal_delay_s``. The checkpoint is ``<dirpath>/<filename>.ckpt``, written
atomically through the trainer's checkpoint IO; a fit that later completes removes it once a newer checkpoint
supersedes it. A Lightning ``Checkpoint`` subclass, so it runs after the batch's other callbacks (the state it saves
is the state a step checkpoint of that batch holds); list it after ``model_checkpoint``
(``trainer.checkpoint_callback`` is the first checkpoint callback).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from storyexp.errors import ConfigurationError

log = logging.getLogger("storyexp")

# what stops the fit, agreed across ranks by a max-reduce: a requeue signal outranks SIGTERM
_NOTHING, _SIGTERM, _REQUEUE = 0, 1, 2


def parse_signal(name: str | int) -> signal.Signals:
    """``SIGUSR1`` / ``USR1`` / ``10`` -> ``signal.SIGUSR1``."""
    try:
        if isinstance(name, int) or str(name).isdigit():
            return signal.Signals(int(name))
        text = str(name).upper()
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigurationError(f"Unknown signal '{name}' (callbacks.preemption.requeue_signal): use a name such as "
                                 "SIGUSR1 (the signal given to sbatch --signal).") from None


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def in_slurm_batch_job() -> bool:
    """A SLURM job that can be requeued (not an interactive allocation; Lightning's rule for the job name)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def scontrol_requeue() -> bool:
    """``scontrol requeue`` this SLURM job (an array task by its ``<array job>_<task>`` id)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("storyexp: SLURM job %s was not requeued (scontrol: %s); resubmit it: it resumes with "
                  "ckpt_path=last.", job, err)
        return False
    if done.returncode:
        log.error("storyexp: SLURM job %s was not requeued (scontrol requeue: %s); resubmit it: it resumes with "
                  "ckpt_path=last.", job, (done.stderr or done.stdout).strip() or f"exit status {done.returncode}")
        return False
    log.warning("storyexp: SLURM job %s requeued.", job)
    return True


class Preemption(Checkpoint):
    """Save the training state and stop on SIGTERM or a requeue signal, then requeue (module docstring).

    Args:
        dirpath: where the checkpoint goes (the run's ``checkpoints/``, where ``ckpt_path=last`` looks).
        filename: its name, without ``.ckpt``.
        requeue_signal: on plain SLURM jobs (``sbatch`` + ``srun``), the signal ``#SBATCH --signal`` sends before
            the time limit (Lightning's default: SIGUSR1); ``null``: none. Outside SLURM it is left alone; submitit
            jobs use submitit's own signal.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str, filename: str = "preempted", requeue_signal: str | int | None = "SIGUSR1"):
        super().__init__()
        if not filename:
            raise ConfigurationError("callbacks.preemption.filename must not be empty.")
        self.dirpath = str(dirpath)
        self.filename = str(filename)
        self.requeue_signal = parse_signal(requeue_signal) if requeue_signal is not None else None
        self._signum: signal.Signals | None = None  # the requeue signal this fit listens to
        self._submitit: Any = None  # submitit's SignalHandler, when this is a submitit job
        self._launcher: Any = None  # the strategy's launcher, which SIGTERM is forwarded to (DDP)
        self._received = False  # the requeue signal came
        self._sigterm = False  # SIGTERM came (DDP: this callback's handler; one process: trainer.received_sigterm)
        self._saved = False

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    # ------------------------------------------------------------------------------------------- signals

    def _requeue_signal_here(self) -> signal.Signals | None:
        if in_submitit_job():  # submitit's own, read as submitit reads it (JobEnvironment.USR_SIG)
            return parse_signal(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        return self.requeue_signal if in_slurm_batch_job() else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = self._sigterm = self._saved = False
        self._signum, self._submitit, self._launcher = None, None, None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can be set from the main thread only; Lightning's stay
        if trainer.world_size > 1:
            self._launcher = trainer.strategy.launcher
            signal.signal(signal.SIGTERM, self._record_sigterm)
        signum = self._requeue_signal_here()
        if signum is None:
            return
        previous = signal.getsignal(signum)
        if in_submitit_job():
            owner = getattr(previous, "__self__", None)
            if not (hasattr(owner, "checkpoint_and_try_requeue") and hasattr(owner, "checkpoint_and_exit")):
                log.warning("storyexp: submitit's %s handler is not installed; pre-emption is left to it.",
                            signum.name)
                return
            self._submitit = owner
        # Lightning's SLURM handler (or submitit's) is replaced for the fit, not chained: the work it would do inside
        # the handler happens at the next batch end (_stop_if_asked); Lightning's teardown restores it after the fit
        self._signum = signum
        signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        # a signal handler does nothing else: no logging (its locks), no I/O, no collective; the batch end acts on it
        self._received = True

    def _record_sigterm(self, signum: int, frame: Any) -> None:
        if not self._sigterm and self._launcher is not None:
            self._launcher.kill(signum)  # the DDP processes Lightning started (none where it started none)
        self._sigterm = True

    # ------------------------------------------------------------------------------------- safe points

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_if_asked(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a requeue signal that came during the last validation run: no batch end follows it
        self._stop_if_asked(trainer)
        self._remove_if_superseded(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM stop (mid-validation, epoch end): save where it stopped. Not after the fit (the
        # test loop's stop): the fit's checkpoints are complete. Nothing on other exceptions (a crash's state).
        if isinstance(exception, SIGTERMException) and not self._saved and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer, _SIGTERM)
            if self._submitit is not None:
                self._submitit.checkpoint_and_exit(signal.SIGTERM)

    def _stop_if_asked(self, trainer: L.Trainer) -> None:
        asked = _REQUEUE if self._received else _SIGTERM if self._sigterm or trainer.received_sigterm else _NOTHING
        if trainer.world_size > 1:  # the same decision on every rank, at the same step
            flag = torch.tensor(asked, device=trainer.strategy.root_device)
            asked = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if asked == _NOTHING:
            return
        self._save(trainer, asked)
        if self._submitit is not None:
            # submitit's handler, now that the state is saved: on rank 0 it calls the launcher's checkpoint() (the
            # resubmission resumes with ckpt_path=last), requeues (its signal) and exits; other ranks return here
            if asked == _REQUEUE:
                self._submitit.checkpoint_and_try_requeue(self._signum)
            else:
                self._submitit.checkpoint_and_exit(signal.SIGTERM)
        elif asked == _REQUEUE and trainer.is_global_zero:
            scontrol_requeue()
        raise SIGTERMException  # Lightning's way out of a fit: loggers and strategy are torn down on the way

    def _save(self, trainer: L.Trainer, why: int) -> None:
        trainer.save_checkpoint(self.ckpt_path)  # every rank (a collective); written by rank 0, atomically
        self._saved = True
        if trainer.is_global_zero:
            what = f"requeue signal {self._signum.name}" if why == _REQUEUE and self._signum else "SIGTERM"
            then = ("the job is requeued and resumes from it" if why == _REQUEUE else
                    "the run resumes from it with ckpt_path=last in this run directory (a requeued SLURM job does)")
            log.warning("storyexp: %s at step %d: training state saved to %s; %s.", what, trainer.global_step,
                        self.ckpt_path, then)

    def _remove_if_superseded(self, trainer: L.Trainer) -> None:
        """After a resumed fit completes: the pre-emption checkpoint goes once a newer one holds a later state."""
        if not trainer.is_global_zero or not os.path.isfile(self.ckpt_path):
            return
        mine = os.stat(self.ckpt_path).st_mtime_ns
        others = [e for e in os.scandir(self.dirpath) if e.name.endswith(self.FILE_EXTENSION) and e.is_file()
                  and e.path != self.ckpt_path]
        if any(e.stat().st_mtime_ns > mine for e in others):
            trainer.strategy.remove_checkpoint(self.ckpt_path)
