"""OmegaConf resolvers used by conf/ (registered once, on import of storyexp.utils)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """True unless W&B can really upload: an API key in the environment or in ~/.netrc.

    WANDB_MODE=online forces online, WANDB_MODE=offline/dryrun forces offline. (WANDB_MODE=disabled is
    honoured by wandb itself.) Checking the key up front keeps a run from failing or prompting at start.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "online":
        return False
    if mode in {"offline", "dryrun", "disabled"}:
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


RUN_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of a run directory: read from ``<run_dir>/wandb_run_id.txt``, or made and written there.

    A resumed run (``hydra.run.dir`` = the interrupted run's directory) therefore logs into the same W&B run
    (``resume: allow``), and every new run directory -- each multirun job -- gets its own run.
    """
    import secrets

    from storyexp.utils.io import atomic_write_text

    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters from [a-z0-9]
    atomic_write_text(path, run_id + "\n")
    return run_id


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("wandb_run_id"):
        OmegaConf.register_new_resolver("wandb_run_id", wandb_run_id)


register_resolvers()
