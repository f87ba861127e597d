#!/usr/bin/env bash
# The GPU benchmark suite (storyexp/conf/benchmark_suite/gpu.yaml): the published architectures at random initialisation on
# one CUDA GPU, every optimisation switch against its baseline, under a 540 s limit.
#
#     benchmarks/gpu_check.sh OUT_DIR        # or: OUT=OUT_DIR benchmarks/gpu_check.sh
#
# Run it on the GPU machine, from the repository (it changes to the repository root itself), with the project's
# virtual environment at .venv or a `python` on PATH that has the requirements. Prints nvidia-smi, runs
# `launch.py task=benchmark benchmark.suite=gpu` with its run directory, data and logs in a scratch folder, and
# copies benchmark.json, benchmark.md and the run's log into OUT_DIR. The suite rewrites both files after every
# case, so a run stopped by the limit still leaves what it measured (context.complete = false).
# Extra arguments after OUT_DIR are passed to launch.py (e.g. benchmark.repeats=3).
set -uo pipefail

out_dir="${1:-${OUT:-}}"
if [ -z "$out_dir" ]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR [launch.py overrides...]   (or set OUT)" >&2
    exit 2
fi
[ "$#" -gt 0 ] && shift
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
if [ -x .venv/bin/python ]; then
    python_bin=.venv/bin/python
else
    python_bin="$(command -v python || command -v python3)"
fi
if [ -z "$python_bin" ]; then
    echo "gpu_check.sh: no .venv/bin/python and no python on PATH" >&2
    exit 2
fi

echo "== nvidia-smi"
nvidia-smi || echo "gpu_check.sh: nvidia-smi failed (no driver or no GPU?)"

scratch="${STORYEXP_GPU_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/storyexp_gpu_check.XXXXXX")}"
run_dir="$scratch/run"
mkdir -p "$run_dir"
echo "== benchmark suite gpu: run directory $run_dir, results to $out_dir"
start=$(date +%s)
timeout 540 "$python_bin" launch.py task=benchmark benchmark.suite=gpu print_config=false \
    "hydra.run.dir=$run_dir" "paths.log_dir=$scratch/logs" "paths.data_dir=$scratch/data" "$@" \
    2>&1 | tee "$out_dir/gpu_check.log"
status=${PIPESTATUS[0]}
echo "== exit status $status after $(( $(date +%s) - start )) s (124: stopped by the 540 s limit)"

copied=0
for name in benchmark.json benchmark.md; do
    if [ -f "$run_dir/$name" ]; then
        cp "$run_dir/$name" "$out_dir/$name" && copied=$((copied + 1))
    fi
done
if [ "$copied" -eq 0 ]; then
    echo "gpu_check.sh: the suite wrote no benchmark.json / benchmark.md (see $out_dir/gpu_check.log)" >&2
    [ "$status" -eq 0 ] && status=1
fi
exit "$status"
