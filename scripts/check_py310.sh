#!/usr/bin/env bash
# Python 3.10 check (pyproject: requires-python >= 3.10) of what runs before any model code: the full test suite
# cannot run on 3.10 here (torch 2.14 is only on this disk for 3.11; a 3.10 install would download a ~5 GB CUDA
# build), so this checks instead, on 3.10, in a throw-away virtual environment:
#   1. every source file byte-compiles (syntax newer than 3.10 fails here),
#   2. the project installs (a wheel, --no-deps) next to the config layer's own dependencies (hydra-core,
#      omegaconf, hydra-colorlog, PyYAML, and the slurm extra's hydra-submitit-launcher + submitit, so that
#      launcher=slurm|submitit_local compose too; pinned as in requirements.txt), and nothing else: `storyexp --help`
#      and config composition import no torch (tests/test_cli.py checks that on 3.11 as well),
#   3. `storyexp --help` runs from an empty directory, and
#   4. every experiment and every option of every config group composes (Hydra's compose API, one process), plus
#      `storyexp --cfg job experiment=<first>` through the command itself.
# hparams_search=* is left out of 4: it needs the Optuna sweeper (optuna, scipy, SQLAlchemy), not part of the
# config layer. Groups outside config.yaml's defaults list (sampler, benchmark_suite, ...) compose as +group=option.
#
#   bash scripts/check_py310.sh                 # PY310=/path/to/python3.10 to pick the interpreter
# Takes about half a minute (package installs from the local index / wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# this machine's 3.10 (pyenv), else a python3.10 on PATH that runs (a pyenv shim may not)
if [ -z "${PY310:-}" ]; then
  PY310=/root/.pyenv/versions/3.10.13/bin/python3.10
  [ -x "$PY310" ] || PY310=$(command -v python3.10 || true)
fi
if [ -z "$PY310" ] || ! "$PY310" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  echo "check_py310: no Python 3.10 interpreter (set PY310=/path/to/python3.10)" >&2
  exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/storyexp-py310.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VENV=$WORK/venv
export PYTHONPYCACHEPREFIX=$WORK/pycache   # byte-code of this check stays out of the checkout
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "check_py310: $("$PY310" --version) -> $VENV"
"$PY310" -m venv "$VENV"
PY=$VENV/bin/python

# 1. syntax
"$PY" -m compileall -q storyexp hydra_plugins

# 2. the config layer's dependencies at requirements.txt's pins, then the project itself (a pure-Python wheel,
# built with this checkout's .venv from a copy of the sources: a build in place would leave build/ here)
DEPS="hydra-core omegaconf hydra-colorlog PyYAML hydra-submitit-launcher submitit"
grep -E "^($(echo "$DEPS" | tr ' ' '|'))==" requirements.txt > "$WORK/constraints.txt"
"$PY" -m pip install -q -c "$WORK/constraints.txt" $DEPS 2> >(grep -v -e "^WARNING: Location 'file:" -e "DEPRECATION: " >&2)
mkdir "$WORK/src" "$WORK/dist"
cp -r pyproject.toml README.md LICENSE storyexp hydra_plugins "$WORK/src/"
rm -f "$WORK/src/storyexp/conf/local/"*.yaml
BUILD_PY=${BUILD_PY:-$REPO/.venv/bin/python}
"$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/dist" "$WORK/src"
"$PY" -m pip install -q --no-deps --no-index "$WORK"/dist/storyexp-*.whl

# 3. the command, from an empty directory (the installed copy, not this checkout)
mkdir "$WORK/empty"
cd "$WORK/empty"
unset STORYEXP_ROOT
"$VENV/bin/storyexp" --help > "$WORK/help.txt" 2> "$WORK/help.err"
if [ -s "$WORK/help.err" ]; then
  echo "check_py310: storyexp --help printed to stderr:" >&2; cat "$WORK/help.err" >&2; exit 1
fi
grep -q "== Tasks (task=...) ==" "$WORK/help.txt"
grep -q "^experiment: " "$WORK/help.txt"

# 4. composition: every experiment and every option of every group; no torch imported along the way
FIRST=$("$PY" - <<'PY'
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import storyexp
from storyexp import CONFIG_DIR

assert Path(storyexp.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), storyexp.__file__
SKIP_GROUPS = {"hparams_search"}  # the Optuna sweeper
overrides = []
for folder in sorted(p for p in CONFIG_DIR.rglob("*") if p.is_dir()):
    group = folder.relative_to(CONFIG_DIR).as_posix()
    if group.startswith("hydra") or group in SKIP_GROUPS or group == "local":
        continue
    for option in sorted(f.stem for f in folder.glob("*.yaml")):
        overrides.append(f"{group}={option}")
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    for override in overrides:
        try:
            cfg = compose(config_name="config", overrides=[override])
        except ConfigCompositionException as err:
            if "No match in the defaults list" not in str(err):
                raise
            cfg = compose(config_name="config", overrides=["+" + override])  # a group outside the defaults list
        OmegaConf.to_yaml(cfg)  # the whole tree, unresolved (as `storyexp --cfg job` prints it)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning", "diffusers", "transformers"})
assert not heavy, f"composition imported {heavy}"
experiments = [o for o in overrides if o.startswith("experiment=")]
assert experiments, "no experiment composed"
print(f"check_py310: composed {len(overrides)} group options ({len(experiments)} experiments)", file=sys.stderr)
print(experiments[0])
PY
)
"$VENV/bin/storyexp" --cfg job "$FIRST" > "$WORK/job.yaml"
grep -q "^task: train" "$WORK/job.yaml"
echo "check_py310: ok (Python 3.10: compileall, install, storyexp --help, composition)"
