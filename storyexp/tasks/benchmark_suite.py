"""benchmark.suite=<name>: a list of benchmark cases, each composed and measured in one run, with on/off ratios.

    python launch.py task=benchmark benchmark.suite=cpu                     # storyexp/conf/benchmark_suite/cpu.yaml
    python launch.py task=benchmark benchmark.suite=cpu benchmark.repeats=5 benchmark.device=cuda
    python launch.py task=benchmark benchmark.suite=/path/to/my_suite.yaml

A suite file (storyexp/conf/benchmark_suite/<name>.yaml, or any .yaml path) holds

    overrides: [data.batch_size=2, ...]     # applied to every case, before the command line's own overrides
    cases:
      - name: mega_demo                      # unique; the row of the tables
        model: mega_demo                     # the `model=` option
        measure: [train, sample, loader, fid, checkpoint]
        overrides: [...]                     # optional: this case only (after the command line's)
        switch:                              # optional: the optimisation timed against its switched-off baseline
          name: skip_unconditional
          with: [model.sampler.skip_unconditional=true]       # the `on` side
          without: [model.sampler.skip_unconditional=false]   # the `off` side (the baseline)

Each case's config is composed with Hydra's compose API from storyexp/conf/ (inside a launch.py run: the app's own config
search path), from `model=<model>`, the suite's `overrides`, this run's command-line overrides (all but `task`,
`model`, `model.*`, `benchmark.suite` and `hydra.*`: `benchmark.repeats=5` or `data.batch_size=1` reach every case)
and the case's own, then the switch's `with` (side `on`) or `without` (side `off`) list. A case whose overrides do
not compose (a key this config tree does not have, e.g. a switch not implemented yet) or whose config is refused by
the checks of `storyexp/tasks/validate.py` is reported skipped, with the reason, and the suite goes on.

Every case runs on one device: the last `benchmark.device` of the suite's overrides and the command line (the
command line wins; `benchmark.device=cuda` without a GPU is one error before any case runs).

Measures, each repeated `benchmark.repeats` times (a switch case alternates on and off within every repetition,
each repetition starting with the other side, so both see the same machine load); reported as the repetitions'
values, their median and their min:
    train_s_per_story     seconds per story of an optimizer step (mean of `benchmark.steps` steps after
                          `benchmark.warmup` untimed ones, taken once per side before the first repetition);
                          train_stories_per_s = 1 / its median. train_tflop_per_story: the FLOPs of one more untimed
                          step after the warm-up (torch's FlopCounterMode: matmuls, convolutions, attention; forward
                          and backward); train_tflops = that / the median s per story; mfu = train_tflops / the
                          chip's dense bf16 peak (`benchmark.peak_tflops`, or known CUDA chips by name; none on CPU)
    sample_s_per_story    seconds per story of sampling one validation batch of whole stories (`generate`)
    peak_memory_gb        per side, the most over its repetitions: CUDA peak allocated, or on CPU the peak resident
                          set of the process (reset at every repetition through /proc/self/clear_refs); both sides'
                          models are resident during a switch case. peak_memory_added_gb: that peak less what was
                          held when the repetition began (what the measured work itself adds; on CPU the resident set
                          includes what earlier cases left, PyTorch's allocator keeping freed memory).
                          peak_memory_own_gb: that peak less what the other side of a switch holds (its weights,
                          buffers, gradients and optimizer states): what the side would peak at alone
and once per case, on its `on` (or only) config:
    loader_s_per_story    iterating the training loader alone (`benchmark.loader_batches` batches per repetition,
                          the same loader every time, after one untimed batch: persistent workers' start-up is a
                          one-off of a run, not a cost per step); loader_stories_per_s = 1 / its median
    loader_headroom       a case measuring both train and loader: loader_stories_per_s / train_stories_per_s of the
                          side the loader was measured on (> 1: the loader keeps up with the training step; < 1:
                          the step waits for data, flagged "loader-bound", loader_bound = true). The loader runs
                          with the case's `data.num_workers`, in this process while the model is idle
    fid_s_per_frame       the FID path (storyexp/metrics/fid.py: fid64 / native pre-processing, pytorch-fid's
                          Inception pool3 features) on the generated frames, repeated to `benchmark.fid_frames`;
                          fid_frames_per_s = 1 / its median. Weights: eval.fid.weights or the usual look-up; without a
                          weights file the same network with random values (the speed is the same; "fid_weights" says
                          which)
    checkpoint_mb         the tensors a checkpoint holds (`saved_state_keys()`: lean, what trains, by default),
                          computed from the state dict; checkpoint_full_mb every tensor; params_total/params_trainable
A switch case also reports, per timed measure, ratio = on median / off median and speedup = off median / on median
(> 1: the switch helps). Weights are as built (no checkpoint, a demo stage 1 is not fitted), so the figures are
speed and memory, not quality. On CUDA the models are built directly on the device (random initialisation there;
`built_on` says where, a builder that cannot run there is built on the CPU and moved); `activation_checkpointing`
wraps the model's blocks as a fit does (`checkpointed_blocks`); between cases the memory is collected, so each case
measures its own peak.

Writes `<output_dir>/benchmark.json` (context, every case with its overrides and raw values) and
`<output_dir>/benchmark.md` (a headline line on the loader headroom, the ratios, then one row per case with its
loader headroom, then the skipped cases), rewritten after every case, so a run stopped by a time limit keeps what
it measured (`context.complete` false, `cases_done` of `cases_total`).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from storyexp import CONFIG_DIR
from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.tasks.benchmark import current_memory_gb, peak_memory_gb, peak_tflops, reset_peak_memory
from storyexp.utils.io import atomic_write_text

CONF_DIR = CONFIG_DIR
SUITE_DIR = CONF_DIR / "benchmark_suite"
REPEATED = ("train", "sample")  # measured in every repetition, on both sides of a switch
ONCE = ("loader", "fid", "checkpoint")  # once per case, on its `on` (or only) config
MEASURES = REPEATED + ONCE
CASE_KEYS = {"name", "model", "measure", "overrides", "switch"}
DROPPED_OVERRIDES = re.compile(r"^[~+]*(task|model|model\..*|benchmark\.suite|hydra\..*)=")
MIB = 1024**2


# ------------------------------------------------------------------------------------------------ the suite file


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def suite_path(name: str) -> Path:
    """storyexp/conf/benchmark_suite/<name>.yaml, or `name` itself when it is a .yaml path."""
    path = Path(name).expanduser() if str(name).endswith((".yaml", ".yml")) else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigurationError(f"benchmark.suite={name!r} is not valid: no {path}. Known suites: "
                                 f"{', '.join(suite_names()) or 'none'} (storyexp/conf/benchmark_suite/), or a .yaml path.")
    return path


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{where} must be a list of override strings, got {value!r}.")
    return list(value)


def load_suite(name: str) -> dict[str, Any]:
    """The suite file, checked: {"path", "overrides", "cases": [{name, model, measure, overrides, switch}]}."""
    path = suite_path(name)
    where = f"benchmark suite {path}"
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # YAML syntax: one line naming the file
        raise ConfigurationError(f"{where} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise ConfigurationError(f"{where}: it must hold a non-empty `cases:` list.")
    cases, names = [], set()
    for i, case in enumerate(raw["cases"]):
        at = f"{where}, case {i}"
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or not isinstance(case.get("model"),
                                                                                                  str):
            raise ConfigurationError(f"{at}: each case needs a `name` and a `model` (strings), got {case!r}.")
        unknown = set(case) - CASE_KEYS
        if unknown:
            raise ConfigurationError(f"{at} ({case['name']}): unknown keys {sorted(unknown)}; known are "
                                     f"{sorted(CASE_KEYS)}.")
        if case["name"] in names:
            raise ConfigurationError(f"{at}: the case name {case['name']!r} is used twice.")
        names.add(case["name"])
        measure = case.get("measure", list(REPEATED))
        if not isinstance(measure, list) or not measure or not set(measure) <= set(MEASURES):
            raise ConfigurationError(f"{at} ({case['name']}): measure must be a non-empty list of {MEASURES}, got "
                                     f"{measure!r}.")
        switch = case.get("switch")
        if switch is not None:
            if not isinstance(switch, dict) or set(switch) != {"name", "with", "without"}:
                raise ConfigurationError(f"{at} ({case['name']}): switch must be {{name, with, without}} (the "
                                         f"overrides that turn it on, and off), got {switch!r}.")
            switch = {"name": str(switch["name"]), "on": _string_list(switch["with"], f"{at}: switch.with"),
                      "off": _string_list(switch["without"], f"{at}: switch.without")}
        cases.append({"name": case["name"], "model": case["model"], "measure": list(measure),
                      "overrides": _string_list(case.get("overrides"), f"{at}: overrides"), "switch": switch})
    return {"path": str(path), "overrides": _string_list(raw.get("overrides"), f"{where}: overrides"),
            "cases": cases}


# ------------------------------------------------------------------------------------------------ composing


def inherited_overrides() -> list[str]:
    """This run's command-line overrides that reach every case (not task, model, model.*, benchmark.suite, hydra)."""
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not DROPPED_OVERRIDES.match(o)]


def _compose(overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside launch.py: the app's own config search path
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides)
        finally:
            GlobalHydra.instance().clear()


def compose_case(parent: DictConfig, overrides: list[str], output_dir: Path) -> DictConfig:
    """A case's config: composed from storyexp/conf/, this run's paths (output under `output_dir`), no logger or callbacks
    (nothing is logged), checked like any run's. Raises CaseSkipped when it does not compose or is refused."""
    from storyexp.tasks.validate import validate_config

    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise CaseSkipped(f"does not compose: {_first_line(err)}") from None
    paths = OmegaConf.to_container(parent.paths, resolve=True)
    paths["output_dir"] = str(output_dir)
    with open_dict(cfg):
        cfg.paths = paths
        cfg.logger = {}
        cfg.callbacks = {}
    try:
        validate_config(cfg)
    except ConfigurationError as err:
        raise CaseSkipped(f"refused by the config checks: {_first_line(err)}") from None
    return cfg


class CaseSkipped(Exception):
    """A case that cannot run here; its message is the reason reported."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------------ memory


# ------------------------------------------------------------------------------------------------ one side


def prepare_on_device(cfg: DictConfig, device: torch.device) -> tuple[tuple, str]:
    """`storyexp.tasks.benchmark.prepare` with the model built directly on a CUDA `device` (random initialisation of a
    published-size model takes seconds there instead of a minute on the CPU), falling back to a CPU build when a
    builder cannot run under the device context; and where it was built."""
    from storyexp.tasks.benchmark import prepare

    if device.type != "cuda":
        return prepare(cfg, device), "cpu"
    try:
        with torch.device(device):
            return prepare(cfg, device), device.type
    except (ConfigurationError, MissingResourceError):
        raise
    except Exception as err:  # a builder that needs CPU tensors: build there, then move
        why = _first_line(err)[:200]
    gc.collect()
    torch.cuda.empty_cache()
    return prepare(cfg, device), f"cpu (on {device.type}: {why})"


class Side:
    """One composed config of a case, built and ready: data module, model on the device (activation checkpointing
    and compile applied when the config asks, as `build_trainer` does for a fit), optimizer, a fixed validation batch for
    sampling."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        from storyexp.tasks.benchmark import _batches, to_device
        from storyexp.tasks.strategies import block_modules, checkpoint_wrapper_of

        self.cfg, self.device = cfg, device
        (self.datamodule, self.model, self.params, self.optimizer, self.autocast), self.built_on = \
            prepare_on_device(cfg, device)
        # `prepare` checkpointed / compiled the blocks as the config asks (strategies.prepare_blocks)
        self.checkpointed = sum(checkpoint_wrapper_of(b, self.model) is not None for b in block_modules(self.model)) \
            if cfg.get("activation_checkpointing") else 0
        opts = cfg.benchmark
        self.steps, self.warmup = int(opts.steps), int(opts.warmup)
        if bool(cfg.data.get("precompute", False)):  # as a fit's on_fit_start (frozen_inputs.use_precomputed)
            from storyexp.systems.frozen_inputs import attach, ensure_precomputed

            ensure_precomputed(self.model, self.datamodule, cfg.paths.output_dir)
            attach(self.model, self.datamodule, cfg.paths.output_dir)
        self.batches = _batches(self.datamodule, device)
        self.sample_batch = to_device(next(iter(self.datamodule.val_dataloader())), device)
        self.generated: torch.Tensor | None = None
        self.train_flops_per_story: float | None = None
        self.step = 0

    def warm_up(self, measure: list[str]) -> None:
        if "train" in measure:
            for _ in range(self.warmup):
                self._train_step()
            self.train_flops_per_story = self._counted_train_step()

    def _counted_train_step(self) -> float:
        """FLOPs per story of one more (untimed) training step, counted (`benchmark.training_step_flops`)."""
        from storyexp.tasks.benchmark import training_step_flops

        batch = next(self.batches)
        flops = training_step_flops(self.model, self.optimizer, batch, self.step, self.device, self.autocast)
        self.step += 1
        return flops / int(batch["frames"].shape[0])

    def _train_step(self) -> tuple[float, int]:
        from storyexp.tasks.benchmark import _timed_step

        batch = next(self.batches)
        seconds = _timed_step(self.model, self.optimizer, batch, self.step, self.device, self.autocast)
        self.step += 1
        return seconds, int(batch["frames"].shape[0])

    def train_s_per_story(self) -> float:
        seconds, stories = zip(*(self._train_step() for _ in range(self.steps)))
        return sum(seconds) / sum(stories)

    def sample_s_per_story(self) -> float:
        from storyexp.tasks.benchmark import _sync

        self.model.eval()
        try:
            _sync(self.device)
            start = time.perf_counter()
            self.generated = self.model.generate(self.sample_batch)
            _sync(self.device)
            seconds = time.perf_counter() - start
        finally:
            self.model.train()
        return seconds / int(self.generated.shape[0])

    def resident_gb(self) -> float:
        """What this side holds on its device now: weights, buffers, gradients and optimizer states (each storage
        once)."""
        seen, total = set(), 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values()]
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total / 1024**3

    def close(self) -> None:
        if bool(self.cfg.data.get("precompute", False)):
            self.datamodule.detach_precomputed()


def _summary(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "min": min(values)}


def measure_repeated(sides: dict[str, Side], measure: list[str], repeats: int) -> dict[str, dict[str, Any]]:
    """Every side's REPEATED measures, `repeats` times, the sides alternating (rep r starts with side r % n)."""
    names = list(sides)
    values: dict[str, dict[str, list[float]]] = {n: {m: [] for m in measure if m in REPEATED} for n in names}
    peaks: dict[str, float] = {n: 0.0 for n in names}
    added: dict[str, float] = {n: 0.0 for n in names}
    own: dict[str, float] = {n: 0.0 for n in names}
    for name in names:
        sides[name].warm_up(measure)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            side = sides[name]
            others = sum(sides[n].resident_gb() for n in names if n != name)
            reset_peak_memory(side.device)
            before = current_memory_gb(side.device)
            if "train" in measure:
                values[name]["train"].append(side.train_s_per_story())
            if "sample" in measure:
                values[name]["sample"].append(side.sample_s_per_story())
            peak = peak_memory_gb(side.device)
            peaks[name] = max(peaks[name], peak)
            added[name] = max(added[name], peak - before)
            own[name] = max(own[name], peak - others)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {f"{m}_s_per_story": _summary(v) for m, v in values[name].items()}
        if "train_s_per_story" in row:
            row["train_stories_per_s"] = 1.0 / row["train_s_per_story"]["median"]
            flops = sides[name].train_flops_per_story
            if flops is not None:  # achieved TFLOP/s of the median step, and MFU where the chip's peak is known
                row["train_tflop_per_story"] = flops / 1e12
                row["train_tflops"] = flops / row["train_s_per_story"]["median"] / 1e12
                peak = peak_tflops(sides[name].device, sides[name].cfg.benchmark.get("peak_tflops"))
                if peak:
                    row["mfu"] = row["train_tflops"] / peak
        row["peak_memory_gb"] = peaks[name]
        row["peak_memory_added_gb"] = added[name]
        row["peak_memory_own_gb"] = max(own[name], 0.0)
        out[name] = row
    return out


def measure_loader(side: Side, repeats: int) -> dict[str, Any]:
    """Seconds per story of the training loader alone: one loader (its persistent workers started by an untimed
    first batch), `benchmark.loader_batches` batches per repetition, epochs restarted as needed."""
    batches = int(side.cfg.benchmark.loader_batches)
    loader = side.datamodule.train_dataloader()
    it = iter(loader)
    next(it)  # untimed: starts the workers (once per run in training)

    def following():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    values = []
    for _ in range(repeats):
        start, stories = time.perf_counter(), 0
        for _ in range(batches):
            stories += int(following()["frames"].shape[0])
        values.append((time.perf_counter() - start) / stories)
    del it
    summary = _summary(values)
    return {"loader_s_per_story": summary, "loader_stories_per_s": 1.0 / summary["median"],
            "loader_workers": int(side.datamodule.num_workers)}


def loader_headroom(row: dict[str, Any]) -> float | None:
    """loader stories/s / training stories/s of the side the loader was measured on (None unless both were)."""
    loader = (row.get("model_measures") or {}).get("loader_stories_per_s")
    side = (row.get("sides") or {}).get("on" if row.get("switch") else "base") or {}
    train = side.get("train_stories_per_s")
    if loader is None or train is None:
        return None
    return float(loader) / float(train)


_INCEPTION: dict[str, Any] = {}


def fid_inception(cfg: DictConfig, device: torch.device) -> tuple[Any, str]:
    """(pytorch-fid's FID Inception on `device`, where its weights come from); built once per process and device."""
    from storyexp.metrics.fid import FEATURE_DIM, build_inception, find_weights

    key = str(device)
    if key not in _INCEPTION:
        fid_cfg = (cfg.get("eval") or {}).get("fid") or {}
        try:
            path = find_weights(fid_cfg.get("weights"), cfg.paths.get("weights_dir"))
            _INCEPTION[key] = (build_inception(path, device=device), f"file {path}")
        except MissingResourceError:
            import torchvision
            from pytorch_fid import inception as pfid
            from pytorch_fid.inception import InceptionV3

            # the same network, its values left at torchvision's random initialisation: the published weights
            # are not here, and speed does not depend on the values
            with mock.patch.object(pfid, "load_state_dict_from_url", lambda url, *a, **k: {}), \
                    mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
                net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                  normalize_input=True, use_fid_inception=True)
            _INCEPTION[key] = (net.eval().requires_grad_(False).to(device),
                               "random values (no weights file: eval.fid.weights, $STORYEXP_FID_WEIGHTS, "
                               "<paths.weights_dir>/fid/ and the torch hub cache hold none)")
    return _INCEPTION[key]


def measure_fid(side: Side, repeats: int) -> dict[str, Any]:
    from storyexp.metrics.fid import inception_features, prepare_frames

    net, source = fid_inception(side.cfg, side.device)
    frames = side.generated if side.generated is not None else side.sample_batch["frames"]
    frames = frames.reshape(-1, *frames.shape[-3:]).cpu()
    if frames.shape[-1] != 3:  # the batch's frames are [.., 3, H, W]; generated ones uint8 [.., H, W, 3]
        frames = frames.permute(0, 2, 3, 1)
    if frames.dtype != torch.uint8:
        frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) if frames.min() < 0 else \
            (frames.float() * (255 if frames.max() <= 1 else 1)).round().clamp(0, 255).to(torch.uint8)
    want = int(side.cfg.benchmark.fid_frames)
    frames = frames.repeat((want + len(frames) - 1) // len(frames), 1, 1, 1)[:want]
    protocols = list(((side.cfg.get("eval") or {}).get("fid") or {}).get("protocols") or ["fid64"])
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        for protocol in protocols:
            inception_features(net, prepare_frames(frames, protocol))
        if side.device.type == "cuda":
            torch.cuda.synchronize(side.device)
        values.append((time.perf_counter() - start) / (want * len(protocols)))
    summary = _summary(values)
    return {"fid_s_per_frame": summary, "fid_frames_per_s": 1.0 / summary["median"], "fid_weights": source,
            "fid_protocols": protocols, "fid_frames": want}


def measure_checkpoint(side: Side) -> dict[str, Any]:
    state = side.model.state_dict()
    keys = side.model.saved_state_keys()
    nbytes = {k: v.numel() * v.element_size() for k, v in state.items() if isinstance(v, torch.Tensor)}
    lean = sum(b for k, b in nbytes.items() if keys is None or k in keys)
    return {"checkpoint_mb": lean / MIB, "checkpoint_full_mb": sum(nbytes.values()) / MIB,
            "checkpoint_lean": keys is not None,
            "params_total": sum(p.numel() for p in side.model.parameters()),
            "params_trainable": sum(p.numel() for p in side.params)}


# ------------------------------------------------------------------------------------------------ running


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_case(parent: DictConfig, suite: dict[str, Any], case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    switch = case["switch"]
    sides_overrides = {"on": switch["on"], "off": switch["off"]} if switch else {"base": []}
    out_dir = Path(parent.paths.output_dir) / "cases" / _slug(case["name"])
    row: dict[str, Any] = {"name": case["name"], "model": case["model"], "measure": case["measure"],
                           "switch": switch["name"] if switch else None, "status": "ok", "reason": None,
                           "overrides": {}}
    cfgs: dict[str, DictConfig] = {}
    start = time.perf_counter()
    try:
        for side, extra in sides_overrides.items():
            overrides = ([f"model={case['model']}"] + suite["overrides"] + inherited_overrides() + case["overrides"]
                         + extra)
            row["overrides"][side] = overrides
            cfgs[side] = compose_case(parent, overrides, out_dir / side)
    except CaseSkipped as why:
        row.update(status="skipped", reason=str(why))
        print(f"benchmark suite: case {case['name']} skipped: {why}", flush=True)
        return row
    repeats = int(cfgs[next(iter(cfgs))].benchmark.repeats)
    built: dict[str, Side] = {}
    try:
        for side, cfg in cfgs.items():
            built[side] = Side(cfg, device)
        row["repeats"] = repeats
        row["built_on"] = {side: b.built_on for side, b in built.items()}
        row["checkpointed_blocks"] = {side: b.checkpointed for side, b in built.items()}
        row["sides"] = measure_repeated(built, case["measure"], repeats)
        main = built["on" if switch else "base"]
        once: dict[str, Any] = {}
        if "loader" in case["measure"]:
            once.update(measure_loader(main, repeats))
        if "fid" in case["measure"]:
            once.update(measure_fid(main, repeats))
        if "checkpoint" in case["measure"]:
            once.update(measure_checkpoint(main))
        row["model_measures"] = once
        row["batch_size"] = int(main.cfg.data.batch_size)
        headroom = loader_headroom(row)
        if headroom is not None:
            row["loader_headroom"] = headroom
            row["loader_bound"] = headroom < 1.0
        if switch:
            timed = [k for k in row["sides"]["on"] if isinstance(row["sides"]["on"][k], dict)]
            on, off = row["sides"]["on"], row["sides"]["off"]
            row["ratio"] = {k: on[k]["median"] / off[k]["median"] for k in timed}
            row["speedup"] = {k: off[k]["median"] / on[k]["median"] for k in timed}
    finally:
        for side in built.values():
            side.close()
        del built
        gc.collect()  # the next case measures its own peak (both sides of a published-size switch are large)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = time.perf_counter() - start
    print(f"benchmark suite: case {case['name']} done in {row['seconds']:.1f} s", flush=True)
    return row


def suite_device(cfg: DictConfig, suite: dict[str, Any]) -> str:
    """The device every case runs on: the last `benchmark.device=` of the suite's overrides and this run's command line
    (the command line wins), else this run's `benchmark.device`."""
    name = str(cfg.benchmark.device)
    for override in suite["overrides"] + inherited_overrides():
        key, _, value = override.partition("=")
        if key.lstrip("+") == "benchmark.device":
            name = value
    return name


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def run(cfg: DictConfig) -> dict[str, float]:
    from storyexp.tasks.benchmark import resolve_device

    suite = load_suite(str(cfg.benchmark.suite))
    device = resolve_device(suite_device(cfg, suite))  # benchmark.device=cuda without a GPU: one error, before any case
    start = time.perf_counter()
    command = "python launch.py " + " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    out = Path(cfg.paths.output_dir)

    def write(cases: list[dict[str, Any]]) -> dict[str, Any]:
        context = {**machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "suite": str(cfg.benchmark.suite), "suite_file": suite["path"], "command": command,
                   "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
                   "cases_done": len(cases), "cases_total": len(suite["cases"]),
                   "complete": len(cases) == len(suite["cases"])}
        report = {"context": context, "cases": cases}
        atomic_write_text(out / "benchmark.json", json.dumps(report, indent=2))
        atomic_write_text(out / "benchmark.md", markdown(report))
        return report

    cases: list[dict[str, Any]] = []
    for case in suite["cases"]:
        cases.append(run_case(cfg, suite, case, device))
        report = write(cases)  # after every case: a run stopped early (a time limit) keeps what it measured
    print(markdown(report))
    print(f"benchmark.json, benchmark.md: {out}")
    return flat_metrics(cases)


def flat_metrics(cases: list[dict[str, Any]]) -> dict[str, float]:
    """The headline figures as one flat dict (`benchmark/<case>/<measure>`): medians and the switches' speed-ups."""
    metrics: dict[str, float] = {}
    for case in cases:
        if case["status"] != "ok":
            continue
        prefix = f"benchmark/{case['name']}"
        for side, row in case["sides"].items():
            for key, value in row.items():
                value = value["median"] if isinstance(value, dict) else value
                metrics[f"{prefix}/{key}" if side == "base" else f"{prefix}/{side}/{key}"] = float(value)
        for key, value in case.get("speedup", {}).items():
            metrics[f"{prefix}/speedup/{key}"] = float(value)
        if "loader_headroom" in case:
            metrics[f"{prefix}/loader_headroom"] = float(case["loader_headroom"])
    return metrics


# ------------------------------------------------------------------------------------------------ markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['median']:.{digits}g} / {value['min']:.{digits}g}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _headroom_cell(case: dict[str, Any], side: str) -> str:
    """The cases table's loader headroom: on the row of the side the loader was measured on."""
    if "loader_headroom" not in case or side != ("on" if case["switch"] else "base"):
        return "-"
    value = case["loader_headroom"]
    return f"{value:.3g}" + (" (loader-bound)" if value < 1.0 else "")


def _throughput_cell(row: dict[str, Any]) -> str:
    """Achieved training TFLOP/s, with the MFU where the chip's peak is known."""
    if "train_tflops" not in row:
        return "-"
    return f"{row['train_tflops']:.3g}" + (f" ({100 * row['mfu']:.1f} %)" if "mfu" in row else "")


def headroom_line(cases: list[dict[str, Any]]) -> str:
    """The headline's loader line: the lowest headroom and every loader-bound case (empty when none was measured)."""
    measured = [c for c in cases if c["status"] == "ok" and "loader_headroom" in c]
    if not measured:
        return ""
    low = min(measured, key=lambda c: c["loader_headroom"])
    bound = [c["name"] for c in measured if c["loader_headroom"] < 1.0]
    verdict = (f"{len(bound)} of {len(measured)} cases loader-bound: {', '.join(bound)}." if bound else
               f"the loader keeps up in all {len(measured)} cases measured.")
    return (f"Loader headroom (loader stories/s / training stories/s; < 1: loader-bound): lowest "
            f"{low['loader_headroom']:.3g} ({low['name']}); {verdict}")


def markdown(report: dict[str, Any]) -> str:
    ctx, cases = report["context"], report["cases"]
    lines = [f"# Benchmark suite `{ctx['suite']}`", "",
             f"{ctx['date']}; {ctx['device']} ({ctx['cpu']}, {ctx['cpu_count']} cores, {ctx['torch_threads']} "
             f"torch threads), torch {ctx['torch']}; {ctx['seconds']:.0f} s in all.",
             f"Command: `{ctx['command']}`" if ctx.get("command") else "", headroom_line(cases),
             "" if ctx.get("complete", True) else f"**Incomplete**: {ctx['cases_done']} of {ctx['cases_total']} "
             "cases measured so far (the run is going on, or stopped early).", ""]
    switches = [c for c in cases if c["status"] == "ok" and c["switch"]]
    if switches:
        lines += ["## Switches (on against off, same run, interleaved repetitions)", "",
                  "| case | model | switch | measure | off median / min | on median / min | on/off | speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in switches:
            for key in c["ratio"]:
                lines.append(f"| {c['name']} | {c['model']} | {c['switch']} | {key} | {_f(c['sides']['off'][key])} "
                             f"| {_f(c['sides']['on'][key])} | {c['ratio'][key]:.3f} | {c['speedup'][key]:.2f}x |")
        lines.append("")
    lines += ["## Cases (median / min of the repetitions)", "",
              "| case | model | stories/batch | reps | train stories/s | train s/story | sample s/story | peak GB "
              "(added) | peak GB own | train TFLOP/s (MFU) | loader stories/s | loader headroom | FID frames/s | "
              "ckpt MB lean / full | params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c["status"] != "ok":
            continue
        m = c["model_measures"]
        for side, row in c["sides"].items():
            label = c["name"] if side == "base" else f"{c['name']} ({side})"
            ckpt = f"{m['checkpoint_mb']:.3g} / {m['checkpoint_full_mb']:.3g}" if "checkpoint_mb" in m else "-"
            lines.append(f"| {label} | {c['model']} | {c['batch_size']} | {c['repeats']} | "
                         f"{_f(row.get('train_stories_per_s'))} | {_f(row.get('train_s_per_story'))} | "
                         f"{_f(row.get('sample_s_per_story'))} | {row['peak_memory_gb']:.2f} "
                         f"({row['peak_memory_added_gb']:.2f}) | {row.get('peak_memory_own_gb', 0.0):.2f} | "
                         f"{_throughput_cell(row)} | {_f(m.get('loader_stories_per_s'))} | {_headroom_cell(c, side)} | "
                         f"{_f(m.get('fid_frames_per_s'))} | {ckpt} | "
                         f"{_f(float(m['params_total']) / 1e6) + ' M' if 'params_total' in m else '-'} |")
    fid = sorted({c["model_measures"]["fid_weights"] for c in cases
                  if c["status"] == "ok" and "fid_weights" in c["model_measures"]})
    if fid:
        lines += ["", "FID Inception weights: " + "; ".join(fid)]
    skipped = [c for c in cases if c["status"] != "ok"]
    if skipped:
        lines += ["", "## Skipped", "", "| case | model | reason |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['model']} | {c['reason']} |" for c in skipped]
    return "\n".join(lines) + "\n"
