"""task=train: fit (resuming from `ckpt_path` at the same global step if given), then test the best checkpoint."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from storyexp.metrics import ensure_classifier
from storyexp.utils.cache import plain

from storyexp.tasks.common import (
    build_all,
    check_resume_model,
    checkpoint_paths,
    collect_metrics,
    report,
    require_file,
)

log = logging.getLogger("storyexp")


def run(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        require_file(ckpt_path, "Checkpoint to resume from (ckpt_path)")
        check_resume_model(cfg, ckpt_path)
    datamodule, model, trainer = build_all(cfg)
    # before fitting (the test loop and the validation metrics load it): a refused classifier must not cost a
    # training run; nothing is done when no metric of this run needs it (without a test loop, eval.metrics don't)
    needed = plain(cfg.eval)
    if not cfg.get("test_after_fit", True):
        needed["metrics"] = []
    ensure_classifier(needed, datamodule, output_dir=cfg.paths.output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = collect_metrics(trainer)
    checkpoints = checkpoint_paths(trainer)
    if cfg.get("test_after_fit", True) and not trainer.interrupted:
        best = checkpoints.get("best")
        if not best:
            log.warning("No best checkpoint was recorded; testing the current weights.")
        # verbose=False: Lightning would print its own results table before storyexp's (report); one table
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        checkpoints["tested"] = best or None
        metrics.update(collect_metrics(trainer))
    report(cfg, trainer, metrics, checkpoints)
    return metrics

