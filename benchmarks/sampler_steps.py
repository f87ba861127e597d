"""Metric-vs-steps curve of the AR-LDM samplers: one trained checkpoint evaluated by `task=eval` at several
(scheduler, steps) points, the same stories and the same seed at every point.

    python benchmarks/sampler_steps.py --ckpt <run>/checkpoints/last.ckpt --out /tmp/curve \\
        --points ddim:250 ddim:20 dpm:10 dpm:15 dpm:20 dpm:25 dpm:50 unipc:10 unipc:15 unipc:20 unipc:25 unipc:50 \\
        -- data.limit_test=32 paths.data_dir=/tmp/arldm_demo_data

Each point is one `launch.py task=eval ckpt_path=<ckpt> model.sampler.scheduler=<s>
model.sampler.num_inference_steps=<n> seed=<seed>` run (the project's evaluation task, every test metric the
config reports) in `<out>/runs/<scheduler>_<steps>_seed<seed>/`, plus the overrides given after `--` (the subset of
the test split, the data folder, ...). The run's own `metrics.json` is read back, and the time spent sampling
stories (`StorySystem.generate_candidates`, timed in the run's process; the model, data and classifier set-up are
left out) is written beside it as `sampling_time.json`. By default the caption-shuffling baseline is off
(`eval.baseline=null`: it would sample every story a second time) and the logger is CSV only.

Written to `<out>` after every point (atomic writes, so an interrupted curve keeps the points it has; a rerun skips
the points whose run already holds both files): `sampler_steps.json` (the points, their metrics and times, the
command and the machine) and `sampler_steps.md` (the same as a Markdown table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_POINTS = ["ddim:250", "ddim:20", *(f"{s}:{n}" for s in ("dpm", "unipc") for n in (10, 15, 20, 25, 50))]
METRICS_FILE = "metrics.json"
TIME_FILE = "sampling_time.json"
# the keys shown first in the table, when a run reports them (every other test/* key follows, sorted)
PREFERRED = ("test/fid64", "test/fid_demo", "test/char_f1_demo", "test/frame_acc_demo", "test/char_f1",
             "test/frame_acc", "test/clip_score", "test/loss")
LOWER_IS_BETTER = ("fid", "loss")


# ----------------------------------------------------------------------------------------------- parsing


def parse_point(text: str) -> tuple[str, int]:
    """``"dpm:25"`` -> ``("dpm", 25)``; one clear error for anything else."""
    name, sep, steps = str(text).partition(":")
    if not sep or not name or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"point {text!r} is not <scheduler>:<steps> with steps >= 1 (e.g. dpm:25)")
    return name, int(steps)


def parse_points(texts: list[str]) -> list[tuple[str, int]]:
    """Points in the order given, each once."""
    points = [parse_point(t) for t in texts]
    return list(dict.fromkeys(points))


def run_name(scheduler: str, steps: int, seed: int) -> str:
    return f"{scheduler}_{steps}_seed{seed}"


def eval_overrides(ckpt: str, scheduler: str, steps: int, seed: int, run_dir: Path, extra: list[str],
                   baseline: bool) -> list[str]:
    """The `launch.py` overrides of one point (extra ones last, so they win)."""
    overrides = ["task=eval", f"ckpt_path={ckpt}", f"model.sampler.scheduler={scheduler}",
                 f"model.sampler.num_inference_steps={steps}", f"seed={seed}", f"hydra.run.dir={run_dir}",
                 "logger=csv", "print_config=false"]
    if not baseline:
        overrides.append("eval.baseline=null")
    return overrides + list(extra)


def read_point(run_dir: Path) -> dict[str, Any] | None:
    """``{"metrics": {...}, "sampling_s": ..., "stories": ...}`` of a finished run, None when it has not finished."""
    metrics_path, time_path = run_dir / METRICS_FILE, run_dir / TIME_FILE
    if not (metrics_path.is_file() and time_path.is_file()):
        return None
    metrics = json.loads(metrics_path.read_text())
    timing = json.loads(time_path.read_text())
    return {"metrics": {k: v for k, v in metrics.items() if k.startswith("test/")}, **timing}


# ----------------------------------------------------------------------------------------------- writing


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for row in rows for k in (row.get("metrics") or {})}
    return [k for k in PREFERRED if k in keys] + sorted(keys - set(PREFERRED))


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per point: scheduler, steps, seed, every test metric, sampling seconds per story and in all."""
    columns = metric_columns(rows)
    head = ["scheduler", "steps", "seed", *(c.removeprefix("test/") for c in columns), "sampling s/story",
            "sampling s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        stories = row.get("stories") or 0
        per_story = row["sampling_s"] / stories if stories and row.get("sampling_s") is not None else None
        cells = [row["scheduler"], row["steps"], row["seed"], *((row.get("metrics") or {}).get(c) for c in columns),
                 per_story, row.get("sampling_s")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lower = ", ".join(k for k in LOWER_IS_BETTER)
    return (f"# Sampler steps: metrics against steps\n\n"
            f"Checkpoint `{meta['ckpt']}`, measured {meta['date']} on {meta['machine']}.\n\n"
            f"```bash\n{meta['command']}\n```\n\n"
            f"{markdown_table(result['points'])}\n"
            f"Lower is better for the {lower} keys, higher for the others. Sampling time: the seconds spent in "
            f"story sampling in the evaluation run (set-up left out), over {meta.get('stories', '?')} stories.\n")


def write_results(out: Path, result: dict[str, Any]) -> None:
    """`sampler_steps.json` and `sampler_steps.md` in `out`, each written atomically."""
    from storyexp.utils.io import atomic_write_text

    atomic_write_text(out / "sampler_steps.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "sampler_steps.md", markdown_report(result))


def machine() -> str:
    try:
        import torch

        threads = torch.get_num_threads()
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:  # pragma: no cover - torch is a dependency
        threads, device = "?", "?"
    return (f"{os.cpu_count()} CPU cores ({threads} torch threads), {device}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}")


# ----------------------------------------------------------------------------------------------- one run


def worker(overrides: list[str]) -> None:
    """Inside the point's process: `launch.py` with these overrides, timing every story-sampling call."""
    import runpy

    from storyexp.systems.base import StorySystem

    timing = {"sampling_s": 0.0, "stories": 0, "calls": 0}
    original = StorySystem.generate_candidates

    def timed(self, batch, *args, **kwargs):
        start = time.perf_counter()
        out = original(self, batch, *args, **kwargs)
        timing["sampling_s"] += time.perf_counter() - start
        timing["stories"] += len(batch["ids"])
        timing["calls"] += 1
        return out

    StorySystem.generate_candidates = timed
    run_dir = next(Path(o.split("=", 1)[1]) for o in overrides if o.startswith("hydra.run.dir="))
    sys.argv = [str(REPO / "launch.py"), *overrides]
    try:  # as `python launch.py ...` (Hydra finds storyexp/conf/ beside the file it runs)
        runpy.run_path(str(REPO / "launch.py"), run_name="__main__")
    finally:
        StorySystem.generate_candidates = original
    from storyexp.utils.io import atomic_write_text

    if (run_dir / METRICS_FILE).is_file():
        atomic_write_text(run_dir / TIME_FILE, json.dumps(timing, indent=2) + "\n")


def run_point(args, scheduler: str, steps: int, seed: int) -> dict[str, Any]:
    run_dir = Path(args.out) / "runs" / run_name(scheduler, steps, seed)
    done = read_point(run_dir)
    if done is None:
        overrides = eval_overrides(args.ckpt, scheduler, steps, seed, run_dir, args.overrides, args.baseline)
        print(f"[sampler_steps] {scheduler} {steps} steps, seed {seed}: {run_dir}", flush=True)
        log = run_dir.parent / f"{run_name(scheduler, steps, seed)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as handle:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--", *overrides],
                                  cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
        done = read_point(run_dir)
        if proc.returncode != 0 or done is None:
            raise SystemExit(f"[sampler_steps] the eval run of {scheduler}:{steps} failed (exit {proc.returncode}); "
                             f"see {log}")
        done["wall_s"] = wall
    return {"scheduler": scheduler, "steps": steps, "seed": seed, **done}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker([a for a in argv[1:] if a != "--"])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the AR-LDM checkpoint to evaluate (task=eval ckpt_path)")
    parser.add_argument("--out", required=True, help="folder for the runs, sampler_steps.json and sampler_steps.md")
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="<scheduler>:<steps> pairs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="seed of every point (the first one)")
    parser.add_argument("--repeat-seeds", nargs="*", default=["ddim:250"],
                        help="points also run with the other --seeds (the spread between seeds is the noise)")
    parser.add_argument("--baseline", action="store_true", help="keep the caption-shuffling baseline (2x sampling)")
    parser.add_argument("overrides", nargs="*", help="launch.py overrides for every point, after --")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt {args.ckpt} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = parse_points(args.points)
    repeated = set(parse_points(args.repeat_seeds)) if args.repeat_seeds else set()
    plan = [(s, n, args.seeds[0]) for s, n in points]
    plan += [(s, n, seed) for seed in args.seeds[1:] for s, n in points if (s, n) in repeated]
    command = " ".join(["python", "benchmarks/sampler_steps.py", *argv])
    result = {"meta": {"ckpt": str(args.ckpt), "command": command, "machine": machine(),
                       "date": datetime.date.today().isoformat(), "overrides": args.overrides,
                       "baseline": bool(args.baseline)}, "points": []}
    for scheduler, steps, seed in plan:
        row = run_point(args, scheduler, steps, seed)
        result["points"].append(row)
        result["meta"]["stories"] = row.get("stories")
        write_results(out, result)
    print(markdown_table(result["points"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
