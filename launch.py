"""storyexp entry point: `python launch.py [group=option ...] [key=value ...]`.

    python launch.py                                  # the built-in demo (train, test, sample)
    python launch.py model=arldm data=ssid            # one experiment
    python launch.py task=eval ckpt_path=...          # evaluate a checkpoint
    python launch.py -m hparams_search=arldm_optuna   # a sweep

Composition only: everything is built from conf/ by storyexp.tasks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# conf/paths/default.yaml resolves data/, weights/ and logs/ against this folder
os.environ.setdefault("STORYEXP_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from storyexp.tasks import UserError, run_task  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return run_task(cfg)
    except UserError as err:  # the user's to fix: one clear message, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"storyexp: error: {err}", file=sys.stderr)
        sys.exit(1)  # SystemExit passes through Hydra's error reporting untouched


if __name__ == "__main__":
    main()
