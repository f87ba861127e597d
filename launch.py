"""The checkout's entry point: `python launch.py [overrides]` does what the installed `storyexp` command does
(storyexp/cli.py), with data/, weights/ and logs/ resolved against this folder instead of the working directory."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("STORYEXP_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))  # this checkout's storyexp (and hydra_plugins), even without an install

from storyexp.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
