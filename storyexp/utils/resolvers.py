"""OmegaConf resolvers used by conf/ (registered once, on import of storyexp.utils)."""

from __future__ import annotations

import netrc
import os

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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


register_resolvers()
