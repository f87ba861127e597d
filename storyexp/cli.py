"""The `storyexp` command (also `python -m storyexp` and the checkout's `python launch.py`).

    storyexp                                   # the built-in demo (train, test, sample)
    storyexp model=arldm data=ssid             # one experiment
    storyexp task=eval ckpt_path=...           # evaluate a checkpoint
    storyexp -m hparams_search=arldm_optuna    # a sweep
    storyexp --help                            # tasks, config groups, examples
    storyexp --config-dir DIR experiment=mine  # DIR/experiment/mine.yaml (or hydra.searchpath=[file://DIR])

Composition only: everything is built from the config tree (storyexp/conf/) by storyexp.tasks. `data/`,
`weights/` and `logs/` are resolved against $STORYEXP_ROOT: the working directory for the installed command,
the checkout for launch.py (storyexp/conf/paths/default.yaml).

Nothing here imports torch or Lightning before the task runs: `storyexp --help` and `storyexp --cfg job ...` only
compose configs (scripts/check_py310.sh runs both on Python 3.10 with hydra-core alone).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from storyexp import CONFIG_DIR
from storyexp.utils import extras

# launcher=<option> -> the Hydra launcher plugin it selects (storyexp/conf/launcher/), which Hydra itself needs at
# composition time: without it Hydra fails with a long "Could not find 'hydra/launcher/submitit_slurm'" error
SUBMITIT_LAUNCHERS = ("slurm", "submitit_local")
SUBMITIT_PLUGIN = "hydra_plugins.hydra_submitit_launcher"


def launcher_extra_error(argv: Sequence[str]) -> str | None:
    """One line when the command line picks launcher=slurm|submitit_local (also in a sweep list such as
    launcher=local,slurm) but hydra-submitit-launcher is not installed; None otherwise."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") != "launcher":
            continue
        picked = [v for v in value.split(",") if v.strip() in SUBMITIT_LAUNCHERS]
        if picked and not (extras.is_installed(SUBMITIT_PLUGIN) and extras.is_installed("submitit")):
            return (f"launcher={picked[0].strip()} needs the hydra-submitit-launcher package: "
                    "pip install 'storyexp[slurm]' (or pip install -r requirements.txt in a checkout).")
    return None


# An absolute path: Hydra would read a relative one as a package (`storyexp.conf`, which has no __init__.py)
# when the command runs as `python -m storyexp`


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from storyexp.tasks import UserError, run_task
    from storyexp.utils.quiet import quiet_known_noise

    quiet_known_noise()  # after Hydra configured logging and Lightning was imported (storyexp/utils/quiet.py)
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
    error = launcher_extra_error(sys.argv[1:])
    if error:  # before Hydra composes (it would fail on the missing launcher plugin with a traceback)
        print(f"storyexp: error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    except BrokenPipeError:  # `storyexp --help | head`: the reader left; no traceback (the Python docs' idiom)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
