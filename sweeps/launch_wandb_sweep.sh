#!/bin/bash
# Register a W&B sweep and submit a SLURM array of agents for it, from the project's environment:
#   bash sweeps/launch_wandb_sweep.sh sweeps/wandb/<experiment>_bayes.yaml [RUNS=16] [sbatch options...]
#   bash sweeps/launch_wandb_sweep.sh sweeps/wandb/arldm_pororo_bayes.yaml 16 --gres=gpu:4 --partition=a100
# RUNS array tasks of one agent run each, at most 4 at once; sbatch options after RUNS override the script's
# (e.g. --array=0-31%8). Agent logs: logs/slurm/agent-<job>_<task>.out.
# W&B project / entity: $WANDB_PROJECT (default storyexp) / $WANDB_ENTITY (default: your W&B default).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash sweeps/launch_wandb_sweep.sh <sweep yaml> [runs] [sbatch options...]" >&2
  exit 2
fi
sweep_file="$1"; shift
if [ ! -f "$sweep_file" ]; then
  echo "storyexp: error: sweep file $sweep_file not found (the sweeps are sweeps/wandb/*.yaml)." >&2; exit 2
fi
runs="16"
if [ $# -gt 0 ]; then runs="$1"; shift; fi
case "$runs" in
  ''|*[!0-9]*|0) echo "storyexp: error: runs='$runs' must be a whole number >= 1 (the array size)." >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
  echo "storyexp: error: $python not found: create the environment with 'bash scripts/setup.sh' (conda: ln -s" \
       "\"\$CONDA_PREFIX\" $root/.venv)." >&2
  exit 1
fi
sweep_file="$(cd "$(dirname "$sweep_file")" && pwd)/$(basename "$sweep_file")"
cd "$root"

entity=()
[ -n "${WANDB_ENTITY:-}" ] && entity=(--entity "$WANDB_ENTITY")
# `wandb sweep` prints "Run sweep agent with: wandb agent <entity/project/id>" (on stderr)
output="$("$python" -m wandb sweep --project "${WANDB_PROJECT:-storyexp}" ${entity[@]+"${entity[@]}"} \
  "$sweep_file" 2>&1)" || {
  echo "$output" >&2; exit 1; }
echo "$output"
sweep_id="$(printf '%s\n' "$output" | sed -n 's/.*wandb agent \([^ ]*\).*/\1/p' | tail -n 1)"
if [ -z "$sweep_id" ]; then
  echo "storyexp: error: no sweep id in the output of 'wandb sweep' (above): is W&B logged in (wandb login)?" >&2
  exit 1
fi
mkdir -p logs/slurm
sbatch --array="0-$((runs - 1))%4" --output="logs/slurm/agent-%A_%a.out" "$@" sweeps/slurm/agent.sbatch "$sweep_id"
