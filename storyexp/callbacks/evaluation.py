"""Test-time story evaluation: sample every test story, score the frames, draw grids.

The system only knows how to `generate(batch)`; what is measured is decided here, so the same callback
serves every model. Metrics are torchmetrics objects kept in this callback (not in the LightningModule),
so their states never end up in checkpoints and are summed across DDP processes at `compute()`.

Reported (when the dataset has character labels and `metrics` contains `demo`):
    test/fid_demo, test/char_f1, test/frame_acc          generated frames vs ground truth
    baseline/char_f1, baseline/frame_acc                 the same model given another story's captions

The character classifier is prepared before the test loop (`storyexp.metrics.ensure_classifier`, called by
task=train_classifier and by the train / eval tasks); `setup` only loads it, after checking that its record
(config, data fingerprint, quality floor) belongs to this run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from storyexp.callbacks.story_grid import save_png, stack_grids, story_grid
from storyexp.errors import ConfigurationError

log = logging.getLogger(__name__)

KNOWN_METRICS = ("demo",)
KNOWN_BASELINES = (None, "shuffled_captions")


class StoryEvaluation(L.Callback):
    def __init__(
        self,
        dirpath: str,
        num_grid_stories: int = 8,
        metrics: list[str] | None = None,
        baseline: str | None = "shuffled_captions",
        classifier: dict[str, Any] | None = None,
        characters: list[str] | None = None,
        task: str = "continuation",
    ):
        metrics = list(metrics or [])
        unknown = sorted(set(metrics) - set(KNOWN_METRICS))
        if unknown:
            raise ConfigurationError(f"Unknown eval.metrics {unknown}; known: {list(KNOWN_METRICS)}.")
        if baseline not in KNOWN_BASELINES:
            raise ConfigurationError(f"Unknown eval.baseline {baseline!r}; known: {list(KNOWN_BASELINES)}.")
        if "demo" in metrics and not classifier:
            raise ConfigurationError("eval.metrics contains 'demo' but eval.classifier is not configured.")
        self.dirpath = Path(dirpath)
        self.num_grid_stories = int(num_grid_stories)
        self.metrics = metrics
        self.baseline = baseline
        self.classifier_cfg = dict(classifier or {})
        self.characters = list(characters or [])
        self.task = task
        self.evaluator = None
        self.baseline_evaluator = None
        self._grids: list[np.ndarray] = []
        self._grid_count = 0
        self._warned = set()

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # here, not in on_test_start: fail before the first test batch when the classifier is not prepared
        if stage != "test":
            return
        self.evaluator = self.baseline_evaluator = None
        if "demo" in self.metrics and self.characters:
            from storyexp.metrics import DemoStoryEvaluator

            classifier = self._classifier(trainer)
            if classifier is not None:
                self.evaluator = DemoStoryEvaluator(classifier)
                if self.baseline:
                    self.baseline_evaluator = DemoStoryEvaluator(classifier)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._grids, self._grid_count = [], 0
        for evaluator in (self.evaluator, self.baseline_evaluator):
            if evaluator is not None:
                evaluator.reset()
                evaluator.to(pl_module.device)

    def _classifier(self, trainer: L.Trainer):
        """Load the prepared character classifier (checked against its record); None when the data has no labels.

        Nothing is trained here: `storyexp.metrics.ensure_classifier` (task=train_classifier, and the train and
        eval tasks before testing) prepares the file; a missing or stale one is a one-line ConfigurationError.
        """
        from storyexp.metrics.classifier_cache import has_labels, load_prepared_classifier

        trainer.strategy.barrier("storyexp-classifier")  # every process reads the file rank 0 prepared
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "stories"):
            self._warn_once("datamodule", "Character metrics need the run's StoryDataModule; they are skipped.")
            return None
        if not has_labels(datamodule):
            self._warn_once("labels", "The dataset has no character labels: character metrics are skipped.")
            return None
        return load_prepared_classifier(self.classifier_cfg, datamodule, output_dir=trainer.default_root_dir,
                                        characters=self.characters)

    # ----------------------------------------------------------------------------------------- per batch

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0):
        want_grids = trainer.is_global_zero and self._grid_count < self.num_grid_stories
        if self.evaluator is None and not want_grids:
            return
        frames: torch.Tensor = batch["frames"]
        n_targets = pl_module.num_targets
        first = frames.shape[1] - n_targets
        with trainer.precision_plugin.forward_context():
            generated = pl_module.generate(batch)
        real = frames[:, first:]
        labels = batch.get("labels")
        if self.evaluator is not None and labels is not None:
            target_labels = labels[:, first:].reshape(-1, labels.shape[-1])
            self.evaluator.update(_flat(generated), _flat(real), target_labels)
            if self.baseline_evaluator is not None:
                shuffled = _rolled_captions(batch["captions"])
                if shuffled is None:
                    self._warn_once("baseline", "Test batch of one story: the shuffled-caption baseline needs "
                                                "batch_size >= 2 and skips such batches.")
                else:
                    with trainer.precision_plugin.forward_context():
                        base = pl_module.generate(batch, captions=shuffled)
                    self.baseline_evaluator.update(_flat(base), None, target_labels)
        if want_grids:
            self._draw(batch, generated, first)

    def _draw(self, batch, generated: torch.Tensor, first: int) -> None:
        frames = batch["frames"].cpu().numpy()
        generated = generated.cpu().numpy()
        for b in range(frames.shape[0]):
            if self._grid_count >= self.num_grid_stories:
                break
            caps = list(batch["captions"][b])
            source = frames[b, 0] if first > 0 else None
            grid = story_grid(frames[b, first:], generated[b], caps if source is not None else caps[first:],
                              source_frame=source)
            name = str(batch["ids"][b]).replace("/", "_")
            save_png(grid, self.dirpath / f"story_{self._grid_count:03d}_{name}.png")
            self._grids.append(grid)
            self._grid_count += 1

    # ------------------------------------------------------------------------------------------ epoch end

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        for prefix, evaluator in (("test", self.evaluator), ("baseline", self.baseline_evaluator)):
            if evaluator is None:
                continue
            try:
                # the baseline is scored on characters only (no real frames are given to it)
                values = evaluator.compute() if prefix == "test" else evaluator.char_scores.compute()
            except (RuntimeError, ValueError) as err:  # e.g. too few frames for a Fréchet distance
                self._warn_once(prefix, f"{prefix} metrics could not be computed: {err}")
                continue
            for key, value in values.items():
                pl_module.log(f"{prefix}/{key}", float(value), sync_dist=False, rank_zero_only=True)
            evaluator.reset()
        if self._grids and trainer.is_global_zero:
            sheet = stack_grids(self._grids)
            save_png(sheet, self.dirpath / "all_stories.png")
            log_image(trainer, "test/stories", sheet)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)


def _flat(frames: torch.Tensor) -> torch.Tensor:
    return frames.reshape(-1, *frames.shape[2:])


def _rolled_captions(captions: list[list[str]]) -> list[list[str]] | None:
    """Each story gets the next story's captions (a derangement whenever the batch has >= 2 stories)."""
    if len(captions) < 2:
        return None
    return [list(c) for c in captions[1:] + captions[:1]]


def log_image(trainer: L.Trainer, key: str, image: np.ndarray) -> None:
    """Send an image to every logger that takes images (W&B, TensorBoard); CSV has none."""
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[image], step=trainer.global_step)
        elif name == "TensorBoardLogger":
            logger.experiment.add_image(key, image, global_step=trainer.global_step, dataformats="HWC")
