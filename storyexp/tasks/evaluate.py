"""task=eval: test a checkpoint (loss, sampled stories, metrics, grids). The model is the checkpoint's own."""

from __future__ import annotations

from omegaconf import DictConfig

from storyexp.metrics import ensure_classifier

from storyexp.tasks.common import build_all, collect_metrics, report, require_ckpt, use_checkpoint_model


def run(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = require_ckpt(cfg)
    use_checkpoint_model(cfg, ckpt_path)
    datamodule, model, trainer = build_all(cfg)
    ensure_classifier(cfg.eval, datamodule, output_dir=cfg.paths.output_dir)
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = collect_metrics(trainer)
    report(cfg, trainer, metrics, {"evaluated": ckpt_path})
    return metrics
