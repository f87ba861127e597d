"""task=eval: test a checkpoint (loss, sampled stories, metrics, frames, grids). The model is the checkpoint's own.

`ckpt_path` may also be an original AR-LDM `last.ckpt` or a released StoryDALL-E `{epoch}.pth`: the composed model
is built from it (tasks/original_checkpoints.py). Without `ckpt_path`, the model built from original weights (`model.network.init_from_storydalle`, `...
init_from_original`) is tested as it is: how a released checkpoint's published numbers are reproduced.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from storyexp.metrics import ensure_classifier

from storyexp.tasks.common import (
    build_all,
    collect_metrics,
    original_weights,
    report,
    require_ckpt,
    use_checkpoint_model,
)

log = logging.getLogger("storyexp")


def run(cfg: DictConfig) -> dict[str, float]:
    given = require_ckpt(cfg, allow_original=True)
    # an original checkpoint as ckpt_path is imported: the model is built from it and Lightning gets None
    ckpt_path = use_checkpoint_model(cfg, given) if given else None
    if not given:
        log.info("No ckpt_path: evaluating the model built from %s.", original_weights(cfg))
    datamodule, model, trainer = build_all(cfg)
    ensure_classifier(cfg.eval, datamodule, output_dir=cfg.paths.output_dir)
    # verbose=False: Lightning would print its own results table before storyexp's (report); one table
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
    metrics = collect_metrics(trainer)
    report(cfg, trainer, metrics, {"evaluated": given or original_weights(cfg)})
    return metrics
