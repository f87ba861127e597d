"""Story metrics during training: generate a fixed validation subset and log ``val/<metric>`` (e.g. ``val/fid64``).

At the end of a validation run (never the sanity check), when at least ``every_n_steps`` optimizer steps have
passed since the last evaluation (``null``: at every validation), the first ``num_stories`` validation stories are
generated (each seeded by its story id, so the subset and its samples are the same at every evaluation) and scored
by ``eval.val_metrics.metrics``. The values are logged as ``val/<key>`` on every process (the metric states are
summed across processes, so every process holds the same value), before the checkpoint and early-stopping
callbacks run, so ``model_checkpoint.monitor``, ``EarlyStopping`` and ``optimized_metric`` can name them. Between
evaluations the last value stays in the trainer's metrics.

The reference of the FID is the subset's own ground-truth frames: a monitoring figure, not the published protocol
(which is ``test/fid64`` over the whole test split).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from storyexp.callbacks.evaluation import EvaluationBase


class ValidationMetrics(EvaluationBase):
    def __init__(
        self,
        eval_cfg: dict[str, Any] | None = None,
        metrics: list[str] | None = None,
        num_stories: int = 32,
        every_n_steps: int | None = None,
        characters: list[str] | None = None,
        task: str = "continuation",
        weights_dir: str | None = None,
    ):
        super().__init__(eval_cfg, metrics, characters, task, weights_dir)
        self.num_stories = int(num_stories)
        self.every_n_steps = None if every_n_steps in (None, 0) else int(every_n_steps)
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.metric_names and self.num_stories > 0:
            self.metrics = self._build(trainer, "val", self.metric_names)

    def _due(self, step: int) -> bool:
        if self._last_step is None or self.every_n_steps is None:
            return self._last_step != step
        return step - self._last_step >= self.every_n_steps

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.metrics or trainer.sanity_checking or not self._due(trainer.global_step):
            return
        self._last_step = trainer.global_step
        datamodule = trainer.datamodule
        self._to(pl_module.device)
        for metric in self.metrics.values():
            metric.reset()
        for batch in datamodule.subset_loader(datamodule.val_split, self.num_stories):
            batch = trainer.strategy.batch_to_device(batch)
            with trainer.precision_plugin.forward_context():
                generated = pl_module.generate(batch)
            self._update(self.metrics, batch, generated, batch["frames"].shape[1] - pl_module.num_targets)
        for key, value in self._compute(self.metrics, "val").items():
            pl_module.log(key, torch.tensor(value, dtype=torch.float64), sync_dist=False)  # float64 kept

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}  # a resumed run keeps the schedule

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
