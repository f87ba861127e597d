"""task=benchmark: how fast a model config trains and samples on this machine, and how much memory it takes.

    python launch.py task=benchmark model=mindalle_demo benchmark.steps=20
    python launch.py task=benchmark model=arldm trainer.precision=bf16-mixed benchmark.device=cuda

Runs `benchmark.warmup` + `benchmark.steps` training steps (the system's own `training_step` on real batches of
the configured data, AdamW over the trainable parameters, under the autocast that `trainer.precision` names), then
samples `benchmark.sample_batches` batches of stories with `generate`. Weights are as built (no checkpoint is
needed; a demo model's stage 1 is not fitted first), so the figures are speed and memory, not quality.

Writes `<output_dir>/benchmark.json` and prints a table:
    train_step_s          median seconds per optimizer step (after warm-up)
    train_stories_per_s   stories per second in training (batch size / train_step_s)
    sample_batch_s        seconds to sample one batch of whole stories
    sample_frames_per_s   generated frames per second
    peak_memory_gb        CUDA: peak allocated; CPU: peak resident set size of the process
    params_total, params_trainable

With ``benchmark.precompute=true`` the run then computes the precomputed frozen inputs of the training split
(`storyexp.systems.frozen_inputs`; kept when a matching file exists, at the place ``data.precompute_path`` /
``data.precompute_dir`` name) and times `benchmark.warmup` + `benchmark.steps` more batches twice each, a live
step then a cached step on the same batch (alternating, so both see the same machine load), and reports:
    train_step_live_s     median seconds per optimizer step encoding the frames live
    train_step_cached_s   median seconds per optimizer step on the precomputed inputs
    precompute_speedup    train_step_live_s / train_step_cached_s
    precompute_s          seconds it took to compute the file (0 when a matching one existed)

Lightning's Trainer loop (callbacks, logging, checkpointing) is deliberately left out: it measures the model.

With ``benchmark.suite=<name>`` (storyexp/conf/benchmark_suite/<name>.yaml, e.g. ``cpu``) the run measures a list of cases
instead, each composing its own config, and times every switch (e.g. ``model.network.fused_attention``,
``data.precompute``) against its switched-off baseline in interleaved repetitions (``benchmark.repeats``):
`storyexp.tasks.benchmark_suite`, which writes benchmark.json and benchmark.md.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from storyexp.errors import ConfigurationError
from storyexp.tasks.common import build_data_and_model
from storyexp.utils.io import atomic_write_text

DEVICES = ("auto", "cpu", "cuda")
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigurationError(f"benchmark.device must be one of {DEVICES}, got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("benchmark.device=cuda but no CUDA device is available.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or on Linux the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the process's peak since start-up is reported


def _proc_status_gb(field: str) -> float | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024**2 if match else None


def current_memory_gb(device: torch.device) -> float:
    """What is held now: CUDA allocated, or the process's resident set (0 where /proc is not there)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1024**3
    return _proc_status_gb("VmRSS") or 0.0


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: peak resident set size (VmHWM, reset by `reset_peak_memory`;
    the process's lifetime peak where /proc is not there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    peak = _proc_status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB


def prepare(cfg: DictConfig, device: torch.device):
    """(datamodule, model, trainable params, AdamW, autocast context) of a config, set up for timing on `device`
    (its blocks checkpointed / compiled when the config asks, as a fit's: `strategies.prepare_blocks`)."""
    from storyexp.tasks.strategies import prepare_blocks

    datamodule, model = build_data_and_model(cfg)
    prepare_blocks(cfg, model)
    dtype = AUTOCAST.get(str(cfg.trainer.get("precision", "32-true")))
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return datamodule, model, params, torch.optim.AdamW(params, lr=1e-6), autocast


def run(cfg: DictConfig) -> dict[str, float]:
    if cfg.benchmark.get("suite") is not None:
        from storyexp.tasks import benchmark_suite

        return benchmark_suite.run(cfg)
    opts = cfg.benchmark
    steps, warmup, sample_batches = int(opts.steps), int(opts.warmup), int(opts.sample_batches)
    if steps < 1 or warmup < 0 or sample_batches < 0:
        raise ConfigurationError("benchmark.steps must be >= 1, benchmark.warmup and sample_batches >= 0.")
    device = resolve_device(str(opts.device))
    precision = str(cfg.trainer.get("precision", "32-true"))
    datamodule, model, params, optimizer, autocast = prepare(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, batch = time_training_steps(model, optimizer, datamodule, device, autocast, warmup, steps)
    stories = int(batch["frames"].shape[0])
    results: dict[str, float] = {
        "benchmark/train_step_s": statistics.median(times),
        "benchmark/train_stories_per_s": stories / statistics.median(times),
    }
    if bool(opts.get("precompute", False)):
        results.update(time_precomputed_steps(cfg, model, optimizer, datamodule, device, autocast, warmup, steps))
    if sample_batches:
        model.eval()
        sample_times, frames = [], 0
        loader = iter(datamodule.val_dataloader())
        for _ in range(sample_batches):
            batch = to_device(next(loader), device)
            _sync(device)
            start = time.perf_counter()
            generated = model.generate(batch)
            _sync(device)
            sample_times.append(time.perf_counter() - start)
            frames += int(generated.shape[0] * generated.shape[1])
        results["benchmark/sample_batch_s"] = statistics.mean(sample_times)
        results["benchmark/sample_frames_per_s"] = frames / sum(sample_times)
    results["benchmark/peak_memory_gb"] = peak_memory_gb(device)
    results["benchmark/params_total"] = float(sum(p.numel() for p in model.parameters()))
    results["benchmark/params_trainable"] = float(sum(p.numel() for p in params))
    write_report(cfg, results, device, precision)
    return results


def _batches(datamodule, device: torch.device):
    """Training batches on `device`, epoch after epoch."""
    while True:
        for batch in datamodule.train_dataloader():
            yield to_device(batch, device)


def _timed_step(model, optimizer, batch: dict[str, Any], index: int, device: torch.device, autocast) -> float:
    """Seconds of one optimizer step (forward, backward, update) of the system's own training_step."""
    _sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings():  # training_step logs through self.log; there is no Trainer here
        warnings.filterwarnings("ignore", message=r".*self.trainer` reference is not registered.*")
        warnings.filterwarnings("ignore", message=r".*You are trying to `self.log\(\)`.*")
        with autocast:
            loss = model.training_step(batch, index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a word of
# torch.cuda.get_device_name(); the denominator of MFU (benchmark.peak_tflops overrides it, e.g. for another chip).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The chip's dense bf16 peak in TFLOP/s: `override` when given, else looked up by the CUDA device's name (None
    on a CPU or an unknown GPU: no MFU is reported)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for chip, peak in PEAK_BF16_TFLOPS.items() if chip in name), None)


def training_step_flops(model, optimizer, batch: dict[str, Any], index: int, device: torch.device, autocast) -> float:
    """Floating-point operations of one training step (forward + backward; matmuls, convolutions and attention as
    `torch.utils.flop_counter.FlopCounterMode` counts them): the numerator of MFU. Recomputation under activation
    checkpointing is counted too (so with it on the ratio is hardware, not model, FLOP utilisation)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _timed_step(model, optimizer, batch, index, device, autocast)
    return float(counter.get_total_flops())


def time_training_steps(model, optimizer, datamodule, device: torch.device, autocast, warmup: int, steps: int
                        ) -> tuple[list[float], dict[str, Any]]:
    """Seconds of each of `steps` optimizer steps after `warmup` untimed ones, and the last batch."""
    batches, times = _batches(datamodule, device), []
    for i in range(warmup + steps):
        batch = next(batches)
        seconds = _timed_step(model, optimizer, batch, i, device, autocast)
        if i >= warmup:
            times.append(seconds)
    return times, batch


def time_precomputed_steps(cfg: DictConfig, model, optimizer, datamodule, device: torch.device, autocast,
                           warmup: int, steps: int) -> dict[str, float]:
    """Live and precomputed steps on the same batches, alternating (both see the same machine load): their medians
    and the speed-up. The precomputed file is computed first when missing."""
    from storyexp.systems.frozen_inputs import attach, ensure_precomputed

    if not callable(getattr(model, "frozen_inputs", None)):
        raise ConfigurationError(f"benchmark.precompute=true, but {cfg.model.get('_target_')} has no frozen inputs "
                                 "to precompute: set benchmark.precompute=false")
    start = time.perf_counter()
    _, computed = ensure_precomputed(model, datamodule, cfg.paths.output_dir)
    precompute_s = time.perf_counter() - start if computed else 0.0
    attach(model, datamodule, cfg.paths.output_dir)
    model.train()
    live, cached = [], []
    try:
        batches = _batches(datamodule, device)
        for i in range(warmup + steps):
            batch = next(batches)
            without = {k: v for k, v in batch.items() if k != "precomputed"}
            pair = (_timed_step(model, optimizer, without, i, device, autocast),
                    _timed_step(model, optimizer, batch, i, device, autocast))
            if i >= warmup:
                live.append(pair[0])
                cached.append(pair[1])
    finally:
        datamodule.detach_precomputed()
    return {"benchmark/train_step_live_s": statistics.median(live),
            "benchmark/train_step_cached_s": statistics.median(cached),
            "benchmark/precompute_speedup": statistics.median(live) / statistics.median(cached),
            "benchmark/precompute_s": precompute_s}


def write_report(cfg: DictConfig, results: dict[str, float], device: torch.device, precision: str) -> Path:
    from rich.console import Console
    from rich.table import Table

    out = Path(cfg.paths.output_dir) / "benchmark.json"
    context = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "precision": precision,
               "batch_size": int(cfg.data.batch_size), "model": cfg.model.get("_target_")}
    atomic_write_text(out, json.dumps({"results": results, "context": context}, indent=2))
    table = Table(title=f"storyexp benchmark ({context['device']}, {precision})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key.split("/", 1)[1], f"{value:.4g}")
    Console().print(table)
    Console().print(f"benchmark.json: {out}")
    return out
