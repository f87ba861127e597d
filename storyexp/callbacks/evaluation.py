"""Test-time story evaluation: sample every test story, score the frames, write frames, grids and a W&B table.

The system only knows how to `generate(batch)`; what is measured is `eval.metrics`, resolved by
`storyexp.metrics.registry` (so the same callback serves every model and every metric). Metric states live in
this callback, not in the LightningModule, so they are never in a checkpoint, and they are summed across DDP
processes at `compute()`: under DDP each process generates its shard of the stories (each story once, seeded
by its id) and every frame counts once.

Reported, for the configured metrics (`eval.metrics`) that are available:
    test/fid64, test/fid                     Inception FID (eval.fid.protocols)
    test/char_f1, test/frame_acc             published character classifier (eval.classifier.checkpoint)
    test/char_f1_demo, test/frame_acc_demo   the project's own character classifier
    test/fid_demo                            Frechet distance in that classifier's features
    test/clip_score, test/clip_consistency   CLIP (eval.clip.model)
    baseline/<character keys>                the same model given the next test story's captions

Written (rank 0, except the frames: each process writes the stories it generated, each story once):
    <dirpath>/story_NNN_<id>.png, all_stories.png       grids of the first eval.num_grid_stories stories
    <frames_dir>/<story_id>/<frame>.png                  every generated target frame (eval.save_frames)
    W&B: test/stories (image), test/samples (table: id, captions, ground truth, generated), summary values
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from storyexp.callbacks.story_grid import save_png, stack_grids, story_grid
from storyexp.errors import ConfigurationError

log = logging.getLogger(__name__)

KNOWN_BASELINES = (None, "shuffled_captions")
CHARACTER_METRIC = "characters"


def build_metrics(eval_cfg: dict[str, Any], names: list[str], trainer: L.Trainer, *, stage: str,
                  characters: list[str], task: str, weights_dir: str | None, warn) -> dict[str, Any]:
    """The available metrics among ``names`` for this run; a missing optional resource is one warning."""
    from storyexp.metrics.registry import MetricContext, MetricUnavailable, build_metric

    context = MetricContext(eval_cfg=eval_cfg, datamodule=trainer.datamodule, stage=stage, task=task,
                            output_dir=Path(trainer.default_root_dir), weights_dir=weights_dir,
                            characters=list(characters))
    metrics = {}
    for name in names:
        try:
            metrics[name] = build_metric(name, context)
        except MetricUnavailable as err:
            warn(name, str(err))
    return metrics


class EvaluationBase(L.Callback):
    """What the test and validation evaluations share: the metric set, its device, warnings, logging."""

    def __init__(self, eval_cfg: dict[str, Any] | None, metrics: list[str] | None, characters: list[str] | None,
                 task: str, weights_dir: str | None) -> None:
        from storyexp.metrics.registry import check_metric_names

        self.eval_cfg = dict(eval_cfg or {})
        self.metric_names = check_metric_names(metrics)
        self.characters = list(characters or [])
        self.task = task
        self.weights_dir = weights_dir
        self.metrics: dict[str, Any] = {}
        self._warned: set[str] = set()

    def _build(self, trainer: L.Trainer, stage: str, names: list[str]) -> dict[str, Any]:
        # every process reads the files rank 0 prepared before the trainer started (classifier, references)
        trainer.strategy.barrier("storyexp-metrics")
        return build_metrics(self.eval_cfg, names, trainer, stage=stage, characters=self.characters,
                             task=self.task, weights_dir=self.weights_dir, warn=self._warn_once)

    def _to(self, device: torch.device) -> None:
        for metric in self.metrics.values():
            metric.to(device)

    def _update(self, metrics: dict[str, Any], batch: dict[str, Any], generated: torch.Tensor, first: int) -> None:
        frames = batch["frames"]
        labels = batch.get("labels")
        n = generated.shape[1]
        captions = [c for caps in batch["captions"] for c in list(caps)[first:]]
        stories = [str(sid) for sid in batch["ids"] for _ in range(n)]
        flat_labels = None if labels is None else labels[:, first:].reshape(-1, labels.shape[-1])
        for metric in metrics.values():
            metric.update(_flat(generated), _flat(frames[:, first:]), flat_labels, captions=captions,
                          stories=stories)

    def _compute(self, metrics: dict[str, Any], prefix: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, metric in metrics.items():
            try:
                out = metric.compute()
            except (RuntimeError, ValueError) as err:  # e.g. too few frames for a Frechet distance
                self._warn_once(f"{prefix}/{name}", f"{prefix} {name} could not be computed: {err}")
                continue
            finally:
                metric.reset()
            for key, value in out.items():
                if f"{prefix}/{key}" in values:
                    raise ConfigurationError(f"two metrics both report {prefix}/{key}")
                values[f"{prefix}/{key}"] = float(value)
        return values

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)  # once: a warnings.warn copy would print the same line a second time


class StoryEvaluation(EvaluationBase):
    def __init__(
        self,
        dirpath: str,
        eval_cfg: dict[str, Any] | None = None,
        num_grid_stories: int = 8,
        metrics: list[str] | None = None,
        baseline: str | None = "shuffled_captions",
        characters: list[str] | None = None,
        task: str = "continuation",
        frames_dir: str | None = None,
        table_stories: int = 0,
        weights_dir: str | None = None,
    ):
        eval_cfg = dict(eval_cfg or {})
        super().__init__(eval_cfg, eval_cfg.get("metrics") if metrics is None else metrics, characters, task,
                         weights_dir)
        if baseline not in KNOWN_BASELINES:
            raise ConfigurationError(f"Unknown eval.baseline {baseline!r}; known: {list(KNOWN_BASELINES)}.")
        self.dirpath = Path(dirpath)
        self.num_grid_stories = int(num_grid_stories)
        self.baseline = baseline
        self.frames_dir = Path(frames_dir) if frames_dir else None
        self.table_stories = int(table_stories)
        self.baseline_metrics: dict[str, Any] = {}
        self._grids: list[np.ndarray] = []
        self._rows: list[list[Any]] = []

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # here, not in on_test_start: fail before the first test batch when a required resource is missing
        if stage != "test":
            return
        self.metrics = self._build(trainer, "test", self.metric_names)
        self.baseline_metrics = {}
        if self.baseline and CHARACTER_METRIC in self.metrics:
            self.baseline_metrics = self._build(trainer, "test", [CHARACTER_METRIC])

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._grids, self._rows = [], []
        for metrics in (self.metrics, self.baseline_metrics):
            for metric in metrics.values():
                metric.reset()
                metric.to(pl_module.device)

    # ----------------------------------------------------------------------------------------- per batch

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0):
        zero = trainer.is_global_zero
        want_grids = zero and len(self._grids) < self.num_grid_stories
        want_rows = zero and len(self._rows) < self.table_stories and _has_wandb(trainer)
        if not (self.metrics or self.frames_dir or want_grids or want_rows):
            return
        first = batch["frames"].shape[1] - pl_module.num_targets
        with trainer.precision_plugin.forward_context():
            generated = pl_module.generate(batch)
        self._update(self.metrics, batch, generated, first)
        if self.baseline_metrics:
            shuffled = _next_story_captions(trainer.datamodule, batch)
            if shuffled is None:
                self._warn_once("baseline", "The test split has one story: the shuffled-caption baseline needs "
                                            "at least two and is skipped.")
            else:
                with trainer.precision_plugin.forward_context():
                    base = pl_module.generate(batch, captions=shuffled)
                self._update(self.baseline_metrics, batch, base, first)
        frames = batch["frames"].cpu().numpy()
        generated = generated.cpu().numpy()
        if self.frames_dir is not None:
            self._save_frames(batch["ids"], generated, first)
        if want_grids or want_rows:
            self._collect(batch, frames, generated, first, want_grids, want_rows)

    def _save_frames(self, ids, generated: np.ndarray, first: int) -> None:
        for sid, story in zip(ids, generated):
            folder = self.frames_dir / _safe(sid)
            for j, frame in enumerate(story):
                save_png(frame, folder / f"{first + j}.png")

    def _collect(self, batch, frames: np.ndarray, generated: np.ndarray, first: int, grids: bool, rows: bool):
        for b in range(frames.shape[0]):
            caps = list(batch["captions"][b])
            sid = str(batch["ids"][b])
            if grids and len(self._grids) < self.num_grid_stories:
                source = frames[b, 0] if first > 0 else None
                grid = story_grid(frames[b, first:], generated[b], caps if source is not None else caps[first:],
                                  source_frame=source)
                save_png(grid, self.dirpath / f"story_{len(self._grids):03d}_{_safe(sid)}.png")
                self._grids.append(grid)
            if rows and len(self._rows) < self.table_stories:
                self._rows.append([sid, " | ".join(caps), np.concatenate(list(frames[b]), axis=1),
                                   np.concatenate(list(generated[b]), axis=1)])

    # ------------------------------------------------------------------------------------------ epoch end

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        values = self._compute(self.metrics, "test")
        values.update(self._compute(self.baseline_metrics, "baseline"))
        for key, value in values.items():
            # every process holds the same (synced) value; logged once, in float64 (a float would become float32)
            pl_module.log(key, torch.tensor(value, dtype=torch.float64), sync_dist=False, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        if self._grids:
            sheet = stack_grids(self._grids)
            save_png(sheet, self.dirpath / "all_stories.png")
            log_image(trainer, "test/stories", sheet)
        for logger in _wandb_loggers(trainer):
            if self._rows:
                import wandb

                data = [[sid, caps, wandb.Image(real), wandb.Image(gen)] for sid, caps, real, gen in self._rows]
                logger.log_table(key="test/samples", columns=["story_id", "captions", "ground_truth", "generated"],
                                 data=data, step=trainer.global_step)
            for key, value in values.items():
                logger.experiment.summary[key] = value


def _flat(frames: torch.Tensor) -> torch.Tensor:
    return frames.reshape(-1, *frames.shape[2:])


def _safe(story_id: Any) -> str:
    return str(story_id).replace("/", "_").replace("\\", "_")


def _next_story_captions(datamodule, batch: dict[str, Any]) -> list[list[str]] | None:
    """Each story gets the captions of the next story of the split (the last one the first's): a derangement that
    does not depend on how the stories are batched or sharded, so the baseline is the same on 1 and N processes."""
    stories = datamodule.stories(datamodule.test_split)
    n = len(stories)
    if n < 2:
        return None
    return [list(stories[(int(i) + 1) % n].captions) for i in batch["index"]]


def _wandb_loggers(trainer: L.Trainer) -> list:
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def _has_wandb(trainer: L.Trainer) -> bool:
    return bool(_wandb_loggers(trainer))


def log_image(trainer: L.Trainer, key: str, image: np.ndarray) -> None:
    """Send an image to every logger that takes images (W&B, TensorBoard); CSV has none."""
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[image], step=trainer.global_step)
        elif name == "TensorBoardLogger":
            logger.experiment.add_image(key, image, global_step=trainer.global_step, dataformats="HWC")
