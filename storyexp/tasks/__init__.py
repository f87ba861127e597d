"""Tasks: composition only. Each builds data, model, callbacks, loggers and trainer from the config and runs.

    train      fit (resuming from `ckpt_path` if given), then test the best checkpoint      tasks/train.py
    eval       test a checkpoint (`ckpt_path` required)                                    tasks/evaluate.py
    sample     generate stories from a checkpoint: a split's stories, or the user's captions  tasks/sample.py
    benchmark  time the model's training step and story sampling, and its peak memory    tasks/benchmark.py
    train_classifier  train (or check) the character classifier the test metrics use    tasks/train_classifier.py
    fid_stats  compute and cache a split's FID reference statistics                      tasks/fid_stats.py
    precompute compute the frozen encoders' outputs of the training split once (data.precompute)  tasks/precompute.py
    app        a browser demo of a checkpoint: captions in, the story streamed frame by frame  tasks/app.py

Every task validates the whole config first (tasks/validate.py), writes its outputs into the run's output
directory and returns the config's `optimized_metric` so Hydra sweepers can optimise it. A new task is one module
with a `run(cfg) -> dict[str, float]` function plus one line in `TASKS`.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

from omegaconf import DictConfig

from storyexp.errors import ConfigurationError
from storyexp.tasks.common import (
    UserError,
    build_all,
    build_callbacks,
    build_data_and_model,
    build_datamodule,
    build_loggers,
    build_model,
    collect_metrics,
    finish_wandb,
    optimized_value,
    refuse_multirun_with_subprocess_ddp,
    resolve_ckpt_path,
)
from storyexp.tasks.validate import validate_config
from storyexp.utils import register_resolvers

# Known, harmless notices that would otherwise bury the results: the autoencoder is deliberately kept in
# eval mode while training, and Lightning's own pytree code triggers a torch deprecation notice.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")

# task name -> module under storyexp.tasks with a `run(cfg)` function (imported on use: sampling and
# benchmarking pull in nothing that training needs)
TASKS = {"train": "train", "eval": "evaluate", "sample": "sample", "benchmark": "benchmark",
         "train_classifier": "train_classifier", "fid_stats": "fid_stats", "precompute": "precompute",
         "app": "app"}


def run_task(cfg: DictConfig) -> float | None:
    register_resolvers()
    if cfg.task not in TASKS:
        raise ConfigurationError(f"Unknown task={cfg.task}. Known tasks: {', '.join(TASKS)}.")
    validate_config(cfg)
    refuse_multirun_with_subprocess_ddp(cfg)
    resolve_ckpt_path(cfg)
    if cfg.get("print_config"):
        from storyexp.utils.config_tree import print_config_tree

        print_config_tree(cfg, save_to=Path(cfg.paths.output_dir) / "config_tree.log")
    try:
        metrics = importlib.import_module(f"storyexp.tasks.{TASKS[cfg.task]}").run(cfg)
    finally:
        finish_wandb()
    return optimized_value(cfg, metrics)


__all__ = [
    "TASKS",
    "UserError",
    "build_all",
    "build_callbacks",
    "build_data_and_model",
    "build_datamodule",
    "build_loggers",
    "build_model",
    "collect_metrics",
    "refuse_multirun_with_subprocess_ddp",
    "run_task",
]
