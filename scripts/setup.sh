#!/usr/bin/env bash
# Idempotent set-up: creates .venv (Python 3.10+) next to this repo's root and installs the pinned
# requirements plus the project in editable mode. Re-running it is cheap: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.storyexp-requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip || echo "setup.sh: pip could not upgrade itself; going on with $(.venv/bin/python -m pip --version)"
  # DS_BUILD_OPS=0: deepspeed installs as pure Python (no CUDA toolkit or compiler needed; storyexp uses none of
  # its compiled ops: torch's AdamW steps even offloaded states)
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# Debian's Chromium for the browser test of task=app (tests/test_app.py); installs only when /usr/bin/chromium is
# missing, and needs root + apt (elsewhere it says how to get it, and the rest of the set-up stands)
bash scripts/setup_browser.sh || echo "setup.sh: Chromium is not installed: tests/test_app.py needs /usr/bin/chromium (run scripts/setup_browser.sh as root)" >&2
