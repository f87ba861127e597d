"""The whole config is checked before anything heavy is built: every mistake is one line naming key, value and fix.

What is checked here: that the config resolves, the trainer's run-length / device / precision keys, the data loader
sizes, `seed`, `float32_matmul_precision`, task=benchmark's suite options (`benchmark.suite` names a suite file),
task=app's options (`app.*`), and
the model's own options through its system's `check_config` (the story-system contract,
`storyexp.systems.base.StorySystem.check_config`), located from `model._target_` without building anything.
Lightning and the systems would reject most of these too, but only after data and weights are loaded, and with a
traceback.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from storyexp.errors import ConfigurationError
from storyexp.tasks.strategies import check_strategy_config

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _require(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigurationError(f"{key}={value!r} is not valid: it must be {want}.")


# key -> (test, what it must be); None is always allowed for the keys listed in OPTIONAL
TRAINER_KEYS = {
    "max_epochs": (lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1: no epoch limit)"),
    "max_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1: no step limit)"),
    "num_nodes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "check_val_every_n_epoch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 or null"),
    "val_check_interval": (lambda v: _is_number(v) and v > 0, "a number > 0 (steps, or a fraction of an epoch) or null"),
    "gradient_clip_val": (lambda v: _is_number(v) and v >= 0, "a number >= 0 or null"),
    "num_sanity_val_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    **{f"limit_{split}_batches": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (batches, or a fraction in "
                                  "(0, 1]) or null") for split in ("train", "val", "test", "predict")},
    "precision": (lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "devices": (lambda v: (_is_int(v) and v >= -1) or v == "auto" or isinstance(v, list) or
                (isinstance(v, str) and v.replace(",", "").isdigit()), "a device count, -1, 'auto' or a list of ids"),
}
OPTIONAL = {"check_val_every_n_epoch", "val_check_interval", "gradient_clip_val", "limit_train_batches",
            "limit_val_batches", "limit_test_batches", "limit_predict_batches"}


def validate_config(cfg: DictConfig) -> None:
    resolved = _resolved(cfg)
    _require(resolved.get("seed") is None or _is_int(resolved.get("seed")), "seed", resolved.get("seed"),
             "an integer or null")
    _check_matmul_precision(resolved)
    trainer = resolved.get("trainer") or {}
    for key, (test, want) in TRAINER_KEYS.items():
        if key in trainer and not (trainer[key] is None and key in OPTIONAL):
            _require(trainer[key] is not None and test(trainer[key]), f"trainer.{key}", trainer[key], want)
    check_strategy_config(resolved)  # trainer=fsdp|deepspeed options, activation_checkpointing
    data = resolved.get("data") or {}
    if "batch_size" in data:
        _require(_is_int(data["batch_size"]) and data["batch_size"] >= 1, "data.batch_size", data["batch_size"],
                 "an integer >= 1 (the global batch, split across processes)")
    if "num_workers" in data:
        _require(_is_int(data["num_workers"]) and data["num_workers"] >= 0, "data.num_workers", data["num_workers"],
                 "an integer >= 0")
    _check_eval(resolved.get("eval") or {})
    _check_precompute(resolved)
    _check_benchmark(resolved)
    _check_app(resolved)
    model = cfg.get("model")
    if model is not None and "_target_" in model:
        check = getattr(get_class(str(model._target_)), "check_config", None)
        if check is not None:
            check(resolved["model"])


def _check_matmul_precision(resolved: dict[str, Any]) -> None:
    """The top-level `float32_matmul_precision` (applied at task start: storyexp.tasks.common)."""
    from storyexp.tasks.common import check_float32_matmul_precision

    if "float32_matmul_precision" in resolved:
        check_float32_matmul_precision(resolved["float32_matmul_precision"])


def _check_eval(ev: dict[str, Any]) -> None:
    """Metric names and FID protocols (storyexp.metrics.registry), before any data or model is built."""
    from storyexp.metrics.registry import FID_PROTOCOLS as PROTOCOLS, METRICS

    for key, names in (("eval.metrics", ev.get("metrics")), ("eval.val_metrics.metrics",
                                                             (ev.get("val_metrics") or {}).get("metrics"))):
        for name in names or []:
            _require(name in METRICS, key, names, f"a list of metric names from {sorted(METRICS)}")
    protocols = (ev.get("fid") or {}).get("protocols")
    if protocols is not None:
        _require(isinstance(protocols, list) and len(protocols) > 0 and all(p in PROTOCOLS for p in protocols),
                 "eval.fid.protocols", protocols, f"a non-empty list of {sorted(PROTOCOLS)}")
    val = ev.get("val_metrics") or {}
    for key in ("num_stories", "every_n_steps"):
        value = val.get(key)
        if value is not None:
            _require(_is_int(value) and value >= 0, f"eval.val_metrics.{key}", value, "an integer >= 0 or null")


def _check_precompute(resolved: dict[str, Any]) -> None:
    """The precomputed-inputs switches (storyexp.systems.frozen_inputs) and task=precompute's options."""
    data, bench, task = resolved.get("data") or {}, resolved.get("benchmark") or {}, resolved.get("precompute") or {}
    for key, value in (("data.precompute", data.get("precompute", False)),
                       ("benchmark.precompute", bench.get("precompute", False)),
                       ("precompute.force", task.get("force", False))):
        _require(isinstance(value, bool), key, value, "true or false")
    path = data.get("precompute_path")
    _require(path is None or (isinstance(path, str) and path.endswith((".h5", ".hdf5"))), "data.precompute_path",
             path, "null or the path of an HDF5 file (.h5)")
    device = task.get("device", "auto")
    _require(device in ("auto", "cpu", "cuda"), "precompute.device", device, "one of auto, cpu, cuda")


def _check_benchmark(resolved: dict[str, Any]) -> None:
    """task=benchmark's suite options (storyexp/tasks/benchmark_suite.py); the suite file itself is checked when
    the benchmark task runs."""
    bench = resolved.get("benchmark") or {}
    for key in ("repeats", "loader_batches", "fid_frames"):
        if key in bench:
            _require(_is_int(bench[key]) and bench[key] >= 1, f"benchmark.{key}", bench[key], "an integer >= 1")
    peak = bench.get("peak_tflops")
    _require(peak is None or (isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak > 0),
             "benchmark.peak_tflops", peak, "null or the chip's bf16 peak in TFLOP/s (> 0)")
    suite = bench.get("suite")
    if suite is not None:
        _require(isinstance(suite, str) and suite != "", "benchmark.suite", suite,
                 "null or a suite name (storyexp/conf/benchmark_suite/) or a .yaml path")
        if resolved.get("task") == "benchmark":
            from storyexp.tasks.benchmark_suite import suite_path

            suite_path(suite)


def _check_app(resolved: dict[str, Any]) -> None:
    """task=app's options (storyexp/tasks/app.py); checked for every task, like the other task blocks."""
    app = resolved.get("app") or {}
    host = app.get("host", "127.0.0.1")
    _require(isinstance(host, str) and host.strip() != "", "app.host", host,
             "a host name or address to serve on (127.0.0.1: this machine only)")
    port = app.get("port")
    _require(port is None or (_is_int(port) and 1 <= port <= 65535), "app.port", port,
             "null (the first free port from 7860) or an integer 1-65535")
    for key in ("share", "open_browser"):
        value = app.get(key, False)
        _require(isinstance(value, bool), f"app.{key}", value, "true or false")
    device = app.get("device", "auto")
    _require(device in ("auto", "cpu", "cuda"), "app.device", device, "one of auto, cpu, cuda")
    if resolved.get("task") == "app" and not resolved.get("ckpt_path"):
        network = (resolved.get("model") or {}).get("network") or {}
        if not any(str(k).startswith("init_from_") and v for k, v in network.items()):
            raise ConfigurationError("task=app needs a checkpoint: add ckpt_path=/path/to/last.ckpt (or build the "
                                     "model from original weights: model.network.init_from_*=...)")


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values; an interpolation or value that cannot resolve is one line naming its key."""
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigurationError(f"config key {key} does not resolve: {str(err).splitlines()[0]}") from None
