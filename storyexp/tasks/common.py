"""What every task shares: building data, model, callbacks, loggers and trainer from the config; the checkpoint's
model record; reporting (metrics.json, summary.json, the results table); guards.

Composition only: nothing here knows a concrete system or dataset.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import hydra.errors
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from storyexp.callbacks.model_record import RECORD_KEY, ModelRecord
from storyexp.callbacks.resume_state import ResumeState
from storyexp.callbacks.wandb_run import record_best_checkpoint_scores
from storyexp.data import StoryDataError
from storyexp.errors import ConfigurationError, MissingResourceError, StoryexpError
from storyexp.tasks import original_checkpoints, sharded
from storyexp.tasks.strategies import scale_model, strategy_kind
from storyexp.utils.io import atomic_write_text
from storyexp.utils.loading import StoryexpCheckpointIO, load_file

log = logging.getLogger("storyexp")

# what launch.py reports as a message rather than a traceback
UserError = (StoryexpError, StoryDataError)

SUBPROCESS_DDP = {"ddp", "fsdp", "deepspeed", "ddp_find_unused_parameters_true"}
CKPT_HINT = "Pass a .ckpt file written by storyexp (<run>/checkpoints/)."

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
    apply_float32_matmul_precision(cfg)  # task start: every task builds its data module first
    return instantiate(cfg.data)


def build_model(cfg: DictConfig) -> L.LightningModule:
    return instantiate(cfg.model)


#: tasks that run no fit (they test or sample a checkpoint)
NO_FIT_TASKS = ("eval", "sample", "app")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    import warnings

    from lightning.pytorch.callbacks import ProgressBar

    from storyexp.callbacks import ProgressLog
    from storyexp.utils.quiet import quiet_known_noise

    quiet_known_noise()  # every trainer-building task passes here, in-process runs too (storyexp/utils/quiet.py)
    callbacks = [instantiate(c) for c in _targets(cfg.get("callbacks"))]
    if cfg.get("task") in NO_FIT_TASKS:
        # eval / sample keep the training run's checkpoint callbacks, so Lightning restores their state from the
        # checkpoint without asking for them ("callbacks used to create the checkpoint need to be provided") and adds
        # no default ModelCheckpoint (with its litmodels tip); the state is only stale bookkeeping of the training
        # run (its best / last paths), which ModelCheckpoint.load_state_dict would announce for every checkpoint
        # read from another run's folder. A fit (train) keeps that warning: there it says a resume lost its top-k.
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded",
                                category=UserWarning)
    # progress as log lines (callbacks.progress_log: when=auto and stdout not a terminal, or always): the bar is then
    # disabled, not removed, so Lightning adds no default TQDM bar in its place
    if any(isinstance(c, ProgressLog) and c.active for c in callbacks):
        for bar in (c for c in callbacks if isinstance(c, ProgressBar)):
            bar.disable()
    # always: every checkpoint records the model config it was trained with (eval/sample rebuild from it) and the
    # RNG states and loader position (a resumed run draws and trains on what the interrupted one would have)
    return callbacks + [ModelRecord(model_choice(cfg), OmegaConf.to_container(cfg.model, resolve=False)),
                        ResumeState()]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in _targets(cfg.get("logger"))]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, model: L.LightningModule | None = None) -> L.Trainer:
    extra = {}
    # activation checkpointing and FSDP / DeepSpeed read the model's own blocks (strategies.py)
    if model is not None:
        extra.update(scale_model(cfg, model))
    elif cfg.get("activation_checkpointing") or strategy_kind(cfg.trainer):
        raise ValueError("build_trainer needs the model for activation_checkpointing / trainer=fsdp|deepspeed")
    sharded.check_readable_by(cfg.get("ckpt_path"), strategy_kind(cfg.trainer))
    if not cfg.trainer.get("plugins") and str(cfg.trainer.get("strategy", "auto")) in ("auto", "ddp", "ddp_spawn"):
        # checkpoints read through the one safe loader (the tasks also pass weights_only=True, which covers
        # strategies that bring their own checkpoint IO)
        extra["plugins"] = [StoryexpCheckpointIO()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)


def _targets(group: DictConfig | None) -> list[DictConfig]:
    if not group:
        return []
    return [node for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


#: values of the top-level `float32_matmul_precision` (torch.set_float32_matmul_precision)
MATMUL_PRECISIONS = ("highest", "high", "medium")


def check_float32_matmul_precision(value) -> str:
    """`float32_matmul_precision` as given; anything else is a one-line ConfigurationError naming the key."""
    if not isinstance(value, str) or value not in MATMUL_PRECISIONS:
        raise ConfigurationError(f"float32_matmul_precision={value!r} is not valid: it must be one of "
                                 f"{', '.join(MATMUL_PRECISIONS)} (high: TF32 matmuls on Ampere+ GPUs).")
    return value


def apply_float32_matmul_precision(cfg: DictConfig) -> str:
    """`torch.set_float32_matmul_precision(cfg.float32_matmul_precision)` (default `highest`: full float32); returns
    the value set. `high` lets float32 matmuls use TF32 tensor cores on Ampere and later GPUs; `medium` allows
    bfloat16 internally. Applied by `build_datamodule`, which every task calls first (before seeding and building
    the model), so it holds for the whole task."""
    value = check_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
    torch.set_float32_matmul_precision(value)
    return value


def build_data_and_model(cfg: DictConfig):
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    check = getattr(datamodule, "check_available", None)
    if check is not None:  # fail before building a large model when the data is missing
        check()
    return datamodule, build_model(cfg)


def task_loggers(cfg: DictConfig) -> list:
    """The trainer's loggers. Lightning starts every logger's run when fit / predict sets up, so `task=sample` leaves
    W&B out: its W&B run starts only once there are story grids to log (storyexp/callbacks/wandb_run.py
    `log_samples` builds the logger then), and a sample run that writes nothing starts none."""
    loggers = build_loggers(cfg)
    if cfg.get("task") == "sample":
        loggers = [lg for lg in loggers if type(lg).__name__ != "WandbLogger"]
    return loggers


def build_all(cfg: DictConfig):
    datamodule, model = build_data_and_model(cfg)
    return datamodule, model, _build_trainer_for(cfg, model)


def _build_trainer_for(cfg: DictConfig, model: L.LightningModule) -> L.Trainer:
    """The callbacks, loggers and trainer of a built model, and its config logged once (build_all, build_without_data)."""
    trainer = build_trainer(cfg, build_callbacks(cfg), task_loggers(cfg), model)
    log_hyperparameters(cfg, trainer, model)
    return trainer


def build_without_data(cfg: DictConfig):
    """`build_all` for stories the user gives (task=sample with sample.captions / captions_file, task=app): no
    dataset is read, checked or generated. The data module is a predict-only one (`storyexp.data.predict`) with the
    data config's batch size and the recorded frame size / fit (`use_checkpoint_data` puts the checkpoint's data
    facts into `cfg.data` first). Seeding and build order are `build_all`'s, so the model is built identically."""
    from storyexp.data.predict import PredictStories

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    apply_float32_matmul_precision(cfg)
    data = cfg.get("data") or {}
    datamodule = PredictStories(batch_size=int(data.get("batch_size", 8)), frame_size=data.get("frame_size"),
                                frame_fit=str(data.get("frame_fit", "squash")),
                                pin_memory=data.get("pin_memory", "auto"))
    model = build_model(cfg)
    return datamodule, model, _build_trainer_for(cfg, model)


def use_checkpoint_data(cfg: DictConfig, path: str | None) -> list[str]:
    """Put the data facts a storyexp checkpoint recorded (`ModelRecord`: task, character names, caption length,
    tokenizer words, frame size) into `cfg.data`, command-line `data.*` values kept; returns the keys set. An
    original checkpoint (`path` None) or one without the record keeps the composed data config."""
    from storyexp.callbacks.model_record import DATA_RECORD, apply_data_record

    if not path:
        return []
    record = (_load_checkpoint(path) or {}).get(RECORD_KEY) or {}
    return apply_data_record(cfg, record.get(DATA_RECORD), _command_line(cfg))


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule,
                        loggers: list | None = None) -> None:
    """The composed config (every key but `hydra`, resolved) and the parameter counts, once, to every logger: the
    only hyper-parameters a run's loggers get (the systems and the data module save theirs with `logger=False`, so
    Lightning's own logging at fit start adds nothing and overwrites nothing, e.g. `task`).

    `loggers`: these instead of the trainer's (`task=sample` logs the config to its W&B run only once there are
    story grids to log: callbacks/wandb_run.py `log_samples`)."""
    loggers = trainer.loggers if loggers is None else loggers
    if not loggers:
        return
    hparams = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
               for key in cfg if key != "hydra"}
    hparams["params/total"] = sum(p.numel() for p in model.parameters())
    hparams["params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in loggers:
        logger.log_hyperparams(hparams)


# ------------------------------------------------------------------------------------- checkpoint record


def model_choice(cfg: DictConfig) -> str | None:
    """The `model=` option this run composed (None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("model")


def _command_line(cfg: DictConfig) -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at `path`, loaded safely (memory-mapped) and checked to be one storyexp wrote. A sharded
    checkpoint folder (FSDP / DeepSpeed) gives everything but its weights (the model record among it). An original
    AR-LDM / StoryDALL-E checkpoint is refused here with the `init_from_*` option that reads it (eval and sample
    import it instead: `use_checkpoint_model`)."""
    checkpoint = _load_checkpoint(path)
    family = original_checkpoints.classify(checkpoint)
    if family is not None:
        raise ConfigurationError(original_checkpoints.resume_refusal(
            original_checkpoints.OriginalCheckpoint(str(path), family)))
    return _check_lightning(checkpoint, path)


def _load_checkpoint(path: str) -> Any:
    if sharded.sharded_kind(path):
        return sharded.read_metadata(path)
    return load_file(path, "Checkpoint (ckpt_path)", how_to_get=CKPT_HINT, mmap=True)


def _check_lightning(checkpoint: Any, path: str) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        if sharded.sharded_kind(path):  # its metadata holds no weights
            return checkpoint
        raise ConfigurationError(f"Checkpoint (ckpt_path) {path} is not a Lightning checkpoint (it has no "
                                 f"state_dict). {CKPT_HINT}")
    return checkpoint


def use_checkpoint_model(cfg: DictConfig, path: str) -> str | None:
    """Make `cfg.model` the model the checkpoint was trained with; returns the `ckpt_path` to give Lightning.

    An original AR-LDM `last.ckpt` / released StoryDALL-E `{epoch}.pth` (`original_checkpoints`) is imported: the
    composed model (of the file's family) is built with `model.network.init_from_*` = the file, whose loader reads the
    weights strictly, and Lightning gets no checkpoint (None is returned).

    The checkpoint's record (`ModelRecord`) holds the training run's `model=` choice and model config (its
    interpolations unresolved, so `${data.task}`, `${seed}` and the weights paths follow this run). Command-line
    `model.*` overrides apply on top (e.g. `model.sampler.num_candidates=4`); a command-line `model=` that names
    another model is an error naming both. A checkpoint without a record keeps the composed config.
    """
    checkpoint = _load_checkpoint(path)
    family = original_checkpoints.classify(checkpoint)
    if family is not None:
        original_checkpoints.use_original(cfg, original_checkpoints.OriginalCheckpoint(str(path), family))
        log.info("ckpt_path %s is %s: building model=%s from it (model.network.%s).", path, family.what,
                 original_checkpoints.composed_name(cfg), family.init_key)
        return None
    record = _check_lightning(checkpoint, path).get(RECORD_KEY)
    if not isinstance(record, dict) or "config" not in record:
        log.warning("Checkpoint %s has no storyexp model record: using the model composed from the command line.",
                    path)
        return path
    overrides = _command_line(cfg)
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "model"]
    trained = record.get("model")
    if given and trained and given[-1] != trained:
        raise ConfigurationError(
            f"ckpt_path {path} holds a model={trained} checkpoint but the command line says model={given[-1]}: "
            f"drop model= (the checkpoint's own model is used) or pass a model={given[-1]} checkpoint."
        )
    model = OmegaConf.create(record["config"])
    for override in overrides:  # the composed config already holds each command-line value, typed
        key = override.split("=", 1)[0]
        name = key.lstrip("+~")
        if not name.startswith("model."):
            continue
        if key.startswith("~"):
            parent, _, leaf = name[len("model."):].rpartition(".")
            node = OmegaConf.select(model, parent) if parent else model
            if node is not None and leaf in node:
                with open_dict(node):
                    del node[leaf]
            continue
        OmegaConf.update(model, name[len("model."):], OmegaConf.select(cfg, name), force_add=True)
    with open_dict(cfg):
        cfg.model = model
    return path


def check_resume_model(cfg: DictConfig, path: str) -> None:
    """Resuming (`task=train ckpt_path=...`) with another model than the checkpoint's, or from a weights-only
    checkpoint (no optimizer state: `trainer.save_checkpoint(..., weights_only=True)`), is one error."""
    checkpoint = read_checkpoint(path)
    if not sharded.sharded_kind(path) and "optimizer_states" not in checkpoint:
        raise ConfigurationError(
            f"ckpt_path {path} holds weights only (no optimizer or loop state), so training cannot resume from it: "
            "pass a checkpoint the run's callbacks wrote (checkpoints/last.ckpt, latest_step_*.ckpt, preempted.ckpt, "
            "or ckpt_path=last), or evaluate it with task=eval ckpt_path=...")
    record = checkpoint.get(RECORD_KEY)
    trained, now = (record or {}).get("model"), model_choice(cfg)
    if trained and now and trained != now:
        raise ConfigurationError(f"ckpt_path {path} holds a model={trained} checkpoint; this run builds model={now}. "
                                 f"Resume with model={trained}, or start a new run without ckpt_path.")


# ------------------------------------------------------------------------------------------- reporting


def collect_metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        value = value.item() if isinstance(value, torch.Tensor) else float(value)
        out[key] = value
    return out


def checkpoint_paths(trainer: L.Trainer) -> dict[str, str | None]:
    """Best and last checkpoint of this run. Read right after fitting: testing a checkpoint restores the
    checkpoint callback's state as it was when that file was written (when `last` did not exist yet)."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        return {}
    last = ckpt.last_model_path or None
    if last is None and ckpt.dirpath and (Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}.ckpt").is_file():
        last = str(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}.ckpt")
    return {"best": ckpt.best_model_path or None, "last": last}


def report(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float],
           checkpoints: dict[str, str | None]) -> None:
    """Print the metrics and where everything went; write metrics.json and summary.json (rank 0 only).

    `checkpoints`: train: this run's best / last (and the one tested); eval: the checkpoint evaluated."""
    if not trainer.is_global_zero:
        return
    output_dir = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {"metrics": dict(sorted(metrics.items())), "checkpoints": dict(checkpoints)}
    grids = sorted(str(p) for p in output_dir.glob("grids/**/*.png"))
    summary["grids"] = grids
    # best/<monitored metric> in the W&B summary: the checkpoint callback's best score (the one tested)
    best = record_best_checkpoint_scores(trainer)
    if best:
        summary["best"] = metrics_for_json(best)
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
    """The value of ``optimized_metric`` that launch.py hands to a Hydra sweeper (train only).

    The metric is the config's choice, never a substitute: a sweep (``hparams_search``, whose rule picks
    ``val/fid64`` at the published sizes and ``val/loss`` at the tiny and demo ones) gets the metric it asked for,
    or, in a multirun, a one-line error naming the metric and how to get it -- no study mixes objectives.
    """
    name = cfg.get("optimized_metric")
    if not name or cfg.task != "train":
        return None
    if name not in metrics:
        if str(name).startswith("val/fid"):
            fix = ("It is the FID of eval.val_metrics.num_stories validation stories: it needs fid in "
                   "eval.val_metrics.metrics, its protocol in eval.fid.protocols and the FID Inception weights "
                   "(eval.fid.weights); or pass optimized_metric=val/loss.")
        elif str(name).startswith("val/"):
            fix = ("Validation must run before training ends (trainer.limit_val_batches > 0, and "
                   "trainer.check_val_every_n_epoch / val_check_interval within trainer.max_epochs / max_steps).")
        else:
            fix = "Pass optimized_metric=<one of the logged metrics>."
        message = (f"optimized_metric={name} was not logged (logged: {', '.join(sorted(metrics)) or 'none'}). "
                   f"{fix}")
        if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
            raise ConfigurationError(message)  # a sweeper needs the value
        log.warning(message)
        return None
    return float(metrics[name])


# --------------------------------------------------------------------------------------------- guards


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``.ckpt`` of a run directory (its ``checkpoints/``) or of a checkpoint folder;
    on equal times ``last.ckpt`` wins. Temporary files of an interrupted write are never picked."""
    folder = Path(folder)
    place = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    files = [p for p in place.glob("*.ckpt") if p.is_file() or sharded.sharded_kind(p)]
    if not files:
        return None
    return max(files, key=lambda p: (_written_ns(p), p.name == "last.ckpt"))


def _written_ns(path: Path) -> int:
    """When a checkpoint file, or the newest file of a sharded checkpoint folder, was written."""
    if path.is_file():
        return path.stat().st_mtime_ns
    return max((f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime_ns)


def resolve_ckpt_path(cfg: DictConfig) -> None:
    """``ckpt_path=last``: the newest checkpoint of this run's directory (resume in place with
    ``hydra.run.dir=<run>``); ``ckpt_path=<run directory>``: the newest checkpoint of that run. A file is kept."""
    value = cfg.get("ckpt_path")
    if not value:
        return
    value = str(value)
    if value == "last":
        folder = Path(cfg.paths.output_dir)
        how = ("ckpt_path=last resumes the run whose directory this is: pass hydra.run.dir=<that run's directory> "
               "(logs/<task>/runs/<time>), or ckpt_path=<run directory or .ckpt file>")
    elif Path(value).is_dir() and not sharded.sharded_kind(value):  # a sharded checkpoint folder is kept
        folder, how = Path(value), "pass a run directory with checkpoints/ or a .ckpt file"
    else:
        return
    found = newest_checkpoint(folder)
    if found is None:
        raise MissingResourceError(f"ckpt_path={value}: no checkpoint in '{folder / 'checkpoints'}'; {how}.")
    log.info("ckpt_path=%s: %s", value, found)
    with open_dict(cfg):
        cfg.ckpt_path = str(found)


def original_weights(cfg: DictConfig) -> str | None:
    """The original (non-storyexp) checkpoint the model is built from, when one is configured
    (`model.network.init_from_*`: a released StoryDALL-E `.pth`, an original AR-LDM Lightning checkpoint)."""
    network = (cfg.get("model") or {}).get("network") or {}
    for key in sorted(network):
        if str(key).startswith("init_from_") and network.get(key):
            return f"model.network.{key}={network.get(key)}"
    return None


def require_ckpt(cfg: DictConfig, allow_original: bool = False) -> str | None:
    """`ckpt_path` (checked to exist: a storyexp checkpoint, or an original AR-LDM `last.ckpt` / StoryDALL-E
    `{epoch}.pth`, which `use_checkpoint_model` imports); with `allow_original`, None when the model is built from
    original weights (`model.network.init_from_*`)."""
    if not cfg.get("ckpt_path"):
        if allow_original and original_weights(cfg):
            return None
        alt = " (or build the model from original weights: model.network.init_from_*=...)" if allow_original else ""
        raise ConfigurationError(f"task={cfg.task} needs a checkpoint: add ckpt_path=/path/to/last.ckpt{alt}")
    return require_file(cfg.ckpt_path, "Checkpoint")


def require_file(path: str, what: str) -> str:
    """`path` if it is a file, or a sharded checkpoint folder (FSDP / DeepSpeed)."""
    if not Path(path).is_file() and not sharded.sharded_kind(path):
        raise MissingResourceError(what, path, "Pass an existing .ckpt file written by storyexp (checkpoints/), or "
                                   "for eval / sample an original AR-LDM last.ckpt or StoryDALL-E {epoch}.pth.")
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
    strategy = strategy_kind(cfg.trainer) or str(cfg.trainer.get("strategy", "auto"))
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


