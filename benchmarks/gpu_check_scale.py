"""GPU check of the full-finetune strategies, prepared to run on one lent GPU (an H200, 139 GiB) in under 8 minutes.

    python benchmarks/gpu_check_scale.py                        # everything, within --budget seconds
    python benchmarks/gpu_check_scale.py --models mega --strategies fsdp deepspeed_zero3
    OUT=/tmp/out python benchmarks/gpu_check_scale.py           # also writes $OUT/gpu_check_scale.json

1. Sharded save + resume, through the real task code: a tiny model (mega_tiny) trains 2 steps under trainer=fsdp
   and trainer=deepspeed (ZeRO-3), saves a sharded checkpoint folder, and a new run resumes from it
   (`check_resume_model`, `build_all`, `trainer.fit(ckpt_path=folder)`) to step 4.
2. Memory and speed at the published sizes (`model=<name>_scale`, random initialisation): one process per model
   runs a real Lightning fit of `--steps` optimizer steps (one story of 5 frames per step, the recipes' batch) for
   each strategy (plain = one GPU, fsdp, deepspeed_zero2, deepspeed_zero3; the DeepSpeed ones only when deepspeed
   is installed) x activation checkpointing off / on, bf16-mixed, and reports the peak allocated memory and the
   median step time after the first step. Attention: minDALL-E and AR-LDM's UNet use torch's SDPA (fused kernels
   on CUDA); Mega's attention is min-dalle's explicit einsum softmax (not fused), CLIP/BLIP use transformers' sdpa.
   On one GPU FSDP and ZeRO shard nothing (FSDP switches to NO_SHARD): the figures check the code paths and the
   one-GPU footprint; per-GPU figures for N GPUs are computed by benchmarks/memory_table.py.

Prints a markdown table; never imported by the tests (they only run `--help`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mindalle", "mega", "arldm")
STRATEGIES = ("plain", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
TRAINER = {"plain": ["trainer=gpu", "trainer.precision=bf16-mixed"], "fsdp": ["trainer=fsdp"],
           "deepspeed_zero2": ["trainer=deepspeed"], "deepspeed_zero3": ["trainer=deepspeed", "trainer.strategy.stage=3"]}


# ------------------------------------------------------------------------------------------ in a worker


def compose(overrides: list[str], out: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "storyexp" / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.data_dir = str(out.parent / "data")
    GlobalHydra.instance().clear()
    return cfg


COMMON = ["data=demo", "data.demo.n_train=8", "data.demo.n_val=2", "data.demo.n_test=2", "data.num_workers=0",
          "logger=none", "callbacks=none", "test_after_fit=false", "print_config=false", "trainer.devices=1",
          "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.limit_val_batches=0",
          "trainer.num_sanity_val_steps=0", "trainer.max_epochs=-1"]


def step_timer():
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """Wall time of each optimizer step (CUDA synchronised) and the peak allocated memory."""

        def __init__(self):
            self.times: list[float] = []

        def on_train_start(self, trainer, pl_module):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def fit_once(model_name: str, strategy: str, ac: bool, steps: int, out: Path) -> dict:
    import gc
    import statistics

    import torch

    import lightning as L

    from storyexp.tasks.common import build_callbacks, build_datamodule, build_model, build_trainer

    cfg = compose([f"model={model_name}_scale", *COMMON, *TRAINER[strategy], f"trainer.max_steps={steps}",
                   "data.batch_size=1", f"activation_checkpointing={str(ac).lower()}"], out)
    row = {"model": model_name, "strategy": strategy, "activation_checkpointing": ac}
    datamodule = model = trainer = None
    try:
        L.seed_everything(cfg.seed)
        datamodule = build_datamodule(cfg)
        try:
            with torch.device("cuda"):  # random initialisation on the GPU: seconds instead of a minute on the CPU
                model = build_model(cfg)
        except Exception:  # a builder that needs CPU tensors: build there (slower), Lightning moves it
            model = build_model(cfg)
        timer = step_timer()
        trainer = build_trainer(cfg, build_callbacks(cfg) + [timer], [], model)
        trainer.fit(model, datamodule=datamodule)
        row.update(ok=True, params_b=sum(p.numel() for p in model.parameters()) / 1e9,
                   peak_gib=torch.cuda.max_memory_allocated() / 1024**3,
                   step_s=statistics.median(timer.times[1:] or timer.times),
                   loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))
    except Exception as err:  # reported in the table; the other configurations still run
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    finally:
        del datamodule, model, trainer  # the next fit measures its own peak
        gc.collect()
        torch.cuda.empty_cache()
    return row


def resume_check(strategy: str, out: Path) -> dict:
    """2 steps, a sharded save, then a new run resuming from the folder to step 4 (the task's own resume path)."""
    from storyexp.tasks import sharded
    from storyexp.tasks.common import build_all, build_callbacks, build_data_and_model, build_trainer
    from storyexp.tasks.common import check_resume_model, read_checkpoint, require_file

    row = {"check": f"sharded save + resume ({strategy}, mega_tiny)"}
    try:
        base = ["model=mega_tiny", *COMMON, *TRAINER[strategy]]
        cfg = compose([*base, "trainer.max_steps=2"], out / "first")
        datamodule, model = build_data_and_model(cfg)
        trainer = build_trainer(cfg, build_callbacks(cfg), [], model)
        trainer.fit(model, datamodule=datamodule)
        folder = out / "first" / "two_steps.ckpt"
        trainer.save_checkpoint(folder)
        kind = sharded.sharded_kind(folder)
        cfg = compose([*base, "trainer.max_steps=4", f"ckpt_path={folder}"], out / "second")
        require_file(cfg.ckpt_path, "Checkpoint to resume from (ckpt_path)")
        check_resume_model(cfg, cfg.ckpt_path)
        record = read_checkpoint(cfg.ckpt_path).get("storyexp", {})
        datamodule, model, trainer = build_all(cfg)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        ok = kind == strategy.split("_")[0] and trainer.global_step == 4 and record.get("model") == "mega_tiny"
        row.update(ok=ok, kind=kind, resumed_to_step=trainer.global_step, record_model=record.get("model"))
    except Exception as err:
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    return row


def worker(args) -> None:
    os.environ.setdefault("STORYEXP_ROOT", str(REPO))
    out = Path(args.scratch)
    deadline = time.time() + args.budget
    rows = []
    if args.resume_check:
        rows = [resume_check(strategy, out / f"resume_{strategy}") for strategy in args.strategies]
    for model in [] if args.resume_check else args.models:
        for strategy in args.strategies:
            for ac in (False, True):
                if time.time() > deadline:
                    rows.append({"model": model, "strategy": strategy, "activation_checkpointing": ac, "ok": False,
                                 "error": "not run: time budget spent"})
                    continue
                rows.append(fit_once(model, strategy, ac, args.steps, out / f"{model}_{strategy}_{ac}"))
    for row in rows:
        print("ROW " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------ orchestrator


def run_worker(argv: list[str], budget: float) -> list[dict]:
    """One fresh process (clean CUDA and process-group state); its rows, or one error row if it died."""
    cmd = [sys.executable, __file__, "--worker", *argv, "--budget", str(max(budget - 30, 1))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=REPO)
        text, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as err:
        text, code = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
    rows = [json.loads(line[4:]) for line in text.splitlines() if line.startswith("ROW ")]
    if code != 0 and not rows:
        rows = [{"worker": " ".join(argv), "ok": False, "error": f"worker exit {code}"}]
    return rows


def table(rows: list[dict]) -> str:
    checks = [r for r in rows if "check" in r]
    fits = [r for r in rows if "model" in r]
    lines = ["| check | result |", "|---|---|"]
    lines += [f"| {r['check']} | {'ok' if r['ok'] else r.get('error') or r} |" for r in checks]
    lines += ["", "Measured on one GPU (bf16-mixed, 1 story x 5 frames per step, random init; GiB = peak allocated)",
              "", "| model | strategy | activation checkpointing | params | peak GiB | step s | note |",
              "|---|---|---|---:|---:|---:|---|"]
    for r in fits:
        if r.get("ok"):
            lines.append(f"| {r['model']} | {r['strategy']} | {'on' if r['activation_checkpointing'] else 'off'} | "
                         f"{r['params_b']:.2f}B | {r['peak_gib']:.1f} | {r['step_s']:.2f} | loss {r['loss']:.3f} |")
        else:
            lines.append(f"| {r['model']} | {r['strategy']} | {'on' if r['activation_checkpointing'] else 'off'} | "
                         f"- | - | - | {r.get('error')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Memory and step time of the full-finetune strategies on one GPU.")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per fit (the first is not timed)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything (default 450)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import importlib.util
    import tempfile

    strategies = [s for s in args.strategies
                  if not s.startswith("deepspeed") or importlib.util.find_spec("deepspeed") is not None]
    deadline = time.time() + args.budget
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_scale_") as scratch:
        sharded = [s for s in ("fsdp", "deepspeed_zero3") if s in strategies]
        jobs = [["--resume-check", "--strategies", *sharded]] if sharded else []
        jobs += [["--models", m, "--strategies", *strategies, "--steps", str(args.steps)] for m in args.models]
        for i, job in enumerate(jobs):
            share = (deadline - time.time()) / (len(jobs) - i)  # what is left, split over the jobs still to run
            rows += run_worker([*job, "--scratch", f"{scratch}/{i}"], max(share, 30))
    print(table(rows))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check_scale.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
