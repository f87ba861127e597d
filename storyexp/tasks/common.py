"""Tasks: composition only. Each builds data, model, callbacks, loggers and trainer from the config and runs.

    train   fit (resuming from `ckpt_path` if given), then test the best checkpoint
    eval    test a checkpoint (`ckpt_path` required)
    sample  generate stories from a checkpoint: a split's stories, or captions given by the user
    benchmark  time the model's training step and story sampling, and its peak memory (storyexp/benchmark.py)

Every task writes `metrics.json` (train/eval) or PNG grids (sample) into the run's output directory and
returns the config's `optimized_metric` so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import hydra.errors
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from storyexp.data import StoryDataError
from storyexp.errors import ConfigurationError, MissingResourceError, StoryexpError
from storyexp.utils import register_resolvers
from storyexp.utils.io import atomic_write_text

log = logging.getLogger("storyexp")

# Known, harmless notices that would otherwise bury the results: the autoencoder is deliberately kept in
# eval mode while training, and Lightning's own pytree code triggers a torch deprecation notice.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")

# what launch.py reports as a message rather than a traceback
UserError = (StoryexpError, StoryDataError)

TASKS = ("train", "eval", "sample", "benchmark")
SUBPROCESS_DDP = {"ddp", "fsdp", "deepspeed", "ddp_find_unused_parameters_true"}


def run_task(cfg: DictConfig) -> float | None:
    register_resolvers()
    if cfg.task not in TASKS:
        raise ConfigurationError(f"Unknown task '{cfg.task}'. Known tasks: {', '.join(TASKS)}.")
    refuse_multirun_with_subprocess_ddp(cfg)
    try:
        metrics = {"train": train, "eval": evaluate, "sample": sample, "benchmark": benchmark}[cfg.task](cfg)
    finally:
        finish_wandb()
    return optimized_value(cfg, metrics)


# --------------------------------------------------------------------------------------------- builders


def instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a user-facing error inside a constructor surfaces as itself
    (Hydra wraps it in InstantiationException, which would turn a clear message into a traceback)."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except hydra.errors.InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def build_model(cfg: DictConfig) -> L.LightningModule:
    return instantiate(cfg.model)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    return [instantiate(c) for c in _targets(cfg.get("callbacks"))]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in _targets(cfg.get("logger"))]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def _targets(group: DictConfig | None) -> list[DictConfig]:
    if not group:
        return []
    return [node for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_data_and_model(cfg: DictConfig):
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    check = getattr(datamodule, "check_available", None)
    if check is not None:  # fail before building a large model when the data is missing
        check()
    return datamodule, build_model(cfg)


def build_all(cfg: DictConfig):
    datamodule, model = build_data_and_model(cfg)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    log_hyperparameters(cfg, trainer, model)
    return datamodule, model, trainer


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule) -> None:
    if not trainer.loggers:
        return
    hparams = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
               for key in cfg if key != "hydra"}
    hparams["params/total"] = sum(p.numel() for p in model.parameters())
    hparams["params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


# ------------------------------------------------------------------------------------------------ tasks


def train(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        require_file(ckpt_path, "Checkpoint to resume from")
    datamodule, model, trainer = build_all(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = collect_metrics(trainer)
    if cfg.get("test_after_fit", True) and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was recorded; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update(collect_metrics(trainer))
    report(cfg, trainer, metrics)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt_path = require_ckpt(cfg)
    datamodule, model, trainer = build_all(cfg)
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    metrics = collect_metrics(trainer)
    report(cfg, trainer, metrics)
    return metrics


def sample(cfg: DictConfig) -> dict[str, float]:
    from storyexp.sampling import run_sampling  # keeps the train/eval import path light

    ckpt_path = require_ckpt(cfg)
    datamodule, model, trainer = build_all(cfg)
    outputs = run_sampling(cfg, datamodule, model, trainer, ckpt_path)
    if trainer.is_global_zero:
        log.info("Story PNGs written to %s", outputs)
    return {}


def benchmark(cfg: DictConfig) -> dict[str, float]:
    from storyexp.benchmark import run_benchmark

    return run_benchmark(cfg, *build_data_and_model(cfg))


# ------------------------------------------------------------------------------------------- reporting


def collect_metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        value = value.item() if isinstance(value, torch.Tensor) else float(value)
        out[key] = value
    return out


def report(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Print the metrics and where everything went; write metrics.json (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {"metrics": dict(sorted(metrics.items()))}
    if trainer.checkpoint_callback is not None:
        ckpt = trainer.checkpoint_callback
        summary["checkpoints"] = {"best": ckpt.best_model_path or None, "last": ckpt.last_model_path or None}
    grids = sorted(str(p) for p in output_dir.glob("grids/**/*.png"))
    summary["grids"] = grids
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            summary["wandb_dir"] = _wandb_run_dir(logger)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics_for_json(metrics), indent=2) + "\n")
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, output_dir)


def metrics_for_json(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sorted(metrics.items())}


def _wandb_run_dir(logger) -> str | None:
    try:
        return str(Path(logger.experiment.dir).parent)
    except Exception:  # a disabled or failed W&B run has no directory; the summary says so
        return None


def print_summary(summary: dict, output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="storyexp results", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"metrics.json: {output_dir / 'metrics.json'}")
    for name, path in (summary.get("checkpoints") or {}).items():
        console.print(f"checkpoint ({name}): {path}")
    if summary["grids"]:
        console.print(f"story grids ({len(summary['grids'])}): {Path(summary['grids'][0]).parent}")
    if "wandb_dir" in summary:
        console.print(f"W&B run directory: {summary['wandb_dir']}")


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name or cfg.task != "train":
        return None
    if name not in metrics:
        message = f"optimized_metric '{name}' was not logged. Logged metrics: {', '.join(sorted(metrics)) or 'none'}."
        if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
            raise ConfigurationError(message)  # a sweeper needs the value
        log.warning(message)
        return None
    return float(metrics[name])


# --------------------------------------------------------------------------------------------- guards


def require_ckpt(cfg: DictConfig) -> str:
    if not cfg.get("ckpt_path"):
        raise ConfigurationError(f"task={cfg.task} needs a checkpoint: add ckpt_path=/path/to/last.ckpt")
    return require_file(cfg.ckpt_path, "Checkpoint")


def require_file(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise MissingResourceError(what, path, "Pass an existing .ckpt file written by storyexp (checkpoints/).")
    return str(path)


def refuse_multirun_with_subprocess_ddp(cfg: DictConfig) -> None:
    """Hydra -m + Lightning's subprocess DDP on the basic launcher hangs or runs the sweep N times.

    Lightning re-runs the script for each extra rank with the original argv, so every child starts its
    own multirun. Refuse it with the working alternatives instead (Lightning #15737, hydra #2070).
    """
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return
    launcher = str(hc.launcher.get("_target_", ""))
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    many = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1) or isinstance(devices, list)
    if "BasicLauncher" in launcher and strategy in SUBPROCESS_DDP and many:
        raise ConfigurationError(
            f"Hydra multirun (-m) with trainer.strategy={strategy} on the basic launcher is not supported: "
            "Lightning re-launches this script per GPU and each copy would start its own sweep. Use one of: "
            "launcher=slurm (one process tree per job), trainer.strategy=ddp_spawn, or a W&B sweep agent "
            "(sweeps/README.md)."
        )


def finish_wandb() -> None:
    """One W&B run per job: close the run so the next multirun job does not log into it."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


__all__ = ["run_task", "UserError", "build_all", "collect_metrics", "TASKS"]

