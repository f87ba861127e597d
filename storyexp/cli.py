"""The `storyexp` command (also `python -m storyexp` and the checkout's `python launch.py`).

    storyexp                                   # the built-in demo (train, test, sample)
    storyexp model=arldm data=ssid             # one experiment
    storyexp task=eval ckpt_path=...           # evaluate a checkpoint
    storyexp -m hparams_search=arldm_optuna    # a sweep
    storyexp --help                            # tasks, config groups, examples

Composition only: everything is built from the config tree (storyexp/conf/) by storyexp.tasks. `data/`,
`weights/` and `logs/` are resolved against $STORYEXP_ROOT: the working directory for the installed command,
the checkout for launch.py (storyexp/conf/paths/default.yaml).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from storyexp import CONFIG_DIR

# An absolute path: Hydra would read a relative one as a package (`storyexp.conf`, which has no __init__.py)
# when the command runs as `python -m storyexp`


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from storyexp.tasks import UserError, run_task

    try:
        return run_task(cfg)
    except UserError as err:  # the user's to fix: one clear message, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"storyexp: error: {err}", file=sys.stderr)
        sys.exit(1)  # SystemExit passes through Hydra's error reporting untouched


def main() -> None:
    """Console entry point: `storyexp [hydra options] [group=option ...] [key=value ...]`."""
    os.environ.setdefault("STORYEXP_ROOT", os.getcwd())
    _hydra_main()


if __name__ == "__main__":
    main()
