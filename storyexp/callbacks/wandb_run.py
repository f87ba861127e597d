"""What a storyexp W&B run holds beyond Lightning's metric history: the best value of every validation metric in the
run summary, checkpoints as artifacts offline too, and the story grids of `task=sample`.

Built on Lightning's `WandbLogger` (its name is kept, so `type(logger).__name__ == "WandbLogger"` checks hold):

* `offline=True` runs offline through `wandb.init(mode="offline")` instead of Lightning's way (which sets
  ``WANDB_MODE=dryrun`` for the whole process, overriding ``WANDB_MODE=disabled``, and refuses ``log_model`` offline).
  W&B records artifacts offline and `wandb sync` uploads them, so ``log_model`` works offline too.
* ``best/<metric>`` summary values: the minimum (loss, FID) or maximum (character F1, frame accuracy, CLIP scores)
  of every ``val/*`` metric logged so far, and, at the end of a fit, the checkpoint callback's best monitored value
  (`record_best_checkpoint_scores`, which survives a resume). A summary key of its own rather than
  ``wandb.define_metric(name, summary="min")``: that turns ``summary["val/fid64"]`` into ``{"min": ...}``, which a
  W&B sweep whose metric is ``val/fid64`` (sweeps/wandb/) would no longer read as a number; and wandb-core applies
  summary options to exact names only, not to globs such as ``val/fid*``.
* `log_samples`: the sample task's story grids, one ``wandb.Image`` per story and a table of captions + grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

BEST_PREFIX = "best/"
# leaf names (after "val/") whose best is the smallest / the largest value
LOWER_IS_BETTER = ("loss", "fid")
HIGHER_IS_BETTER = ("char_f1", "frame_acc", "clip_score", "clip_consistency")


def goal(key: str) -> str | None:
    """"min" or "max" for a validation metric with a best value (val/loss, val/fid64, val/char_f1_demo, ...)."""
    if not key.startswith("val/"):
        return None
    leaf = key[len("val/"):]
    if leaf.startswith(HIGHER_IS_BETTER):
        return "max"
    if leaf.startswith(LOWER_IS_BETTER) or leaf.endswith("loss"):
        return "min"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with offline runs through wandb.init(mode="offline") (so `log_model` works offline)
    and ``best/<val metric>`` summary values."""

    def __init__(self, *args: Any, offline: bool = False, log_model: bool | str = False, **kwargs: Any) -> None:
        # explicit, not through the environment: wandb reads WANDB_MODE once per process (wandb.setup), so a later
        # change of it (tests, notebooks) would otherwise be ignored
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            kwargs.setdefault("mode", "disabled")
        elif offline:
            kwargs.setdefault("mode", "offline")
        super().__init__(*args, offline=False, log_model=log_model, **kwargs)
        # Lightning always passes anonymous=None, and wandb warns about any value of that deprecated setting
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.storyexp_offline = bool(offline)
        self._best: dict[str, float] = {}

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        better = {}
        for key, value in metrics.items():
            direction = goal(key)
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if direction is None or value != value:  # NaN is never a best
                continue
            old = self._best.get(key)
            if old is None or (value < old if direction == "min" else value > old):
                self._best[key] = better[BEST_PREFIX + key] = value
        if better:
            self.experiment.summary.update(better)


def record_best_checkpoint_scores(trainer) -> dict[str, float]:
    """``best/<monitor>`` = each checkpoint callback's best score, in every W&B run's summary; returns them.

    The checkpoint callback's state is restored on resume, so this is the run's best even across restarts (the
    logger's own tracking starts afresh in each process)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    values = {}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_score is not None:
            score = float(callback.best_model_score)
            if score == score:
                values[BEST_PREFIX + callback.monitor] = score
    if values and trainer.is_global_zero:
        for logger in wandb_loggers(trainer):
            if logger._experiment is not None:  # never start a run just for this
                logger.experiment.summary.update(values)
    return values


def wandb_loggers(trainer) -> list:
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


# ------------------------------------------------------------------------------------------- task=sample


def _is_wandb(node) -> bool:
    target = str(node.get("_target_", "") or "") if hasattr(node, "get") else ""
    return target.rsplit(".", 1)[-1] == "WandbLogger"


SAMPLES_KEY = "samples/stories"
TABLE_KEY = "samples/table"


def log_samples(cfg, trainer, out_dir: Path, stories: Sequence) -> int:
    """Send the sample task's story grids (``<out_dir>/story_NNN.png``, one per story) to the config's W&B logger
    (`cfg.logger`, built here: `tasks/common.py` `task_loggers` keeps it off the trainer): one ``wandb.Image`` per
    story under ``samples/stories`` and a table (story, story_id, captions, grid) under ``samples/table``, after the
    run's config. Called by every process after it wrote its stories; rank 0 reads every process's files. Without a
    grid (nothing sampled) no W&B run is started at all. Returns the number of grids logged."""
    from storyexp.tasks.common import instantiate, log_hyperparameters

    nodes = [node for node in (cfg.get("logger") or {}).values() if _is_wandb(node)]
    if not nodes:
        return 0
    if trainer.world_size > 1:
        trainer.strategy.barrier("storyexp-samples")  # the other processes' grids are written
    if not trainer.is_global_zero:
        return 0
    out_dir = Path(out_dir)
    grids = [(i, out_dir / f"story_{i:03d}.png") for i in range(len(stories))]
    grids = [(i, path) for i, path in grids if path.is_file()]
    if not grids:
        return 0
    import wandb

    # built here, not by the task: Lightning starts the trainer's loggers whether or not anything is sampled
    loggers = [instantiate(node) for node in nodes]
    log_hyperparameters(cfg, trainer, trainer.lightning_module, loggers=loggers)
    images, rows = [], []
    for i, path in grids:
        story = stories[i]
        captions = " | ".join(str(c) for c in story.captions)
        image = wandb.Image(str(path), caption=f"{story.id}: {captions}")
        images.append(image)
        rows.append([i, str(story.id), captions, wandb.Image(str(path))])
    for logger in loggers:
        table = wandb.Table(columns=["story", "story_id", "captions", "grid"], data=rows)
        logger.experiment.log({SAMPLES_KEY: images, TABLE_KEY: table})
    return len(grids)
