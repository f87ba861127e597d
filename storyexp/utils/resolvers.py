"""OmegaConf resolvers used by storyexp/conf/ (registered once, on import of storyexp.utils)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import ListConfig, OmegaConf


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
    (``resume: allow``), and every new run directory -- each multirun job -- gets its own run. Under a W&B agent
    the agent's run id ($WANDB_RUN_ID) is the one recorded, since W&B uses it whatever ``id`` says.
    """
    import secrets

    from storyexp.utils.io import atomic_write_text

    path = Path(run_dir) / RUN_ID_FILE
    agent_id = os.environ.get("WANDB_RUN_ID") if wandb_sweep_id() else None
    if agent_id:
        # a W&B agent names the run itself (wandb.init ignores any other id in a sweep): record the agent's id
        if not path.is_file() or path.read_text().strip() != agent_id:
            atomic_write_text(path, agent_id + "\n")
        return agent_id
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 characters from [a-z0-9]
    atomic_write_text(path, run_id + "\n")
    return run_id


# ------------------------------------------------------------------------------------ sweeps and their W&B runs

# What a sweep optimises (storyexp/conf/hparams_search/*.yaml): the published tables report FID at 64x64, so the published
# sizes (model.network.source=pretrained) minimise val/fid64, FID on a fixed validation subset logged by
# callbacks.validation_metrics. The tiny and demo sizes (source=sizes: random networks for tests and the demo,
# on machines that have no FID Inception weights) minimise val/loss. The rule reads only the composed model, so
# every trial of a study gets the same objective; `optimized_metric=...` on the command line replaces it.
FID_OBJECTIVE = "val/fid64"
LOSS_OBJECTIVE = "val/loss"


def sweep_objective(network_source: str) -> str:
    return FID_OBJECTIVE if str(network_source) == "pretrained" else LOSS_OBJECTIVE


def needs_fid(metric: str) -> bool:
    """An FID objective makes the FID required (eval.fid.required): a trial without the Inception weights stops
    at its start with the message saying where to put them, instead of training and then having no value."""
    return str(metric).startswith("val/fid") or str(metric).startswith("test/fid")


def wandb_sweep_id() -> str | None:
    """The W&B sweep this process runs for ($WANDB_SWEEP_ID, set by `wandb agent` for every run it starts)."""
    return os.environ.get("WANDB_SWEEP_ID") or None


def _is_multirun(mode) -> bool:
    return str(mode).rsplit(".", 1)[-1] == "MULTIRUN"  # RunMode.MULTIRUN or its name


# Overrides left out of a sweep job's W&B name when the swept keys are unknown: what the group and the tags
# already say, and Hydra's own.
NAME_EXCLUDED = ("experiment", "model", "data", "hparams_search", "logger", "launcher")


def _override_key(override: str) -> str:
    return str(override).split("=", 1)[0].lstrip("+~")


def _wandb_sweep_keys() -> set[str] | None:
    """The keys a W&B agent sampled for this run: the agent writes them to $WANDB_SWEEP_PARAM_PATH."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return None
    import yaml

    try:
        params = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return {str(k) for k in params if k != "wandb_version"} if isinstance(params, dict) else None


def wandb_run_name(default: str, mode, overrides, sweeper_params=None) -> str:
    """A multirun job or a W&B agent's run is named after the overrides its sweep chose for it (``key=value,...``
    sorted by key, the format of Hydra's ``hydra.job.override_dirname``), so the runs of one sweep tell
    themselves apart: the keys of ``hydra.sweeper.params`` (Optuna, or a basic sweep given in the config), or the
    keys the W&B agent sampled. A sweep given on the command line (``-m key=a,b``) has no such list: its name is
    every override except ``hydra.*`` and the keys in NAME_EXCLUDED. A single run, or a job left with nothing,
    keeps ``default``."""
    multirun = _is_multirun(mode)
    if not (multirun or wandb_sweep_id()):
        return str(default)
    swept = ({str(k) for k in sweeper_params} if multirun and sweeper_params else
             None if multirun else _wandb_sweep_keys())
    overrides = [str(o) for o in (overrides or [])]
    if swept is not None:
        kept = [o for o in overrides if _override_key(o) in swept]
    else:
        kept = [o for o in overrides if not _override_key(o).startswith("hydra")
                and _override_key(o).split("/")[0] not in NAME_EXCLUDED]
    return ",".join(sorted(kept, key=_override_key)) or str(default)


def wandb_run_group(mode, sweep_dir: str, search: str | None) -> str | None:
    """The W&B group of a sweep's runs: a Hydra multirun's jobs share ``<hparams_search or multirun>-<sweep dir>``
    (the sweep directory's timestamp tells sweeps apart); a W&B agent's runs share ``sweep-<sweep id>`` (W&B also
    shows them under the sweep); a single run has none (``logger.wandb.group=<name>`` sets one)."""
    if _is_multirun(mode):
        return f"{search or 'multirun'}-{Path(str(sweep_dir)).name}"
    sweep = wandb_sweep_id()
    return f"sweep-{sweep}" if sweep else None


def wandb_run_tags(tags, *choices) -> ListConfig:
    """``tags`` plus the run's model and data choices (no repeats, order kept), so W&B can filter on both. (A
    ListConfig, not a list: OmegaConf.resolve can put a node, not a plain list, in place of the interpolation.)"""
    out: list[str] = []
    for tag in [*(tags or []), *choices]:
        if tag is not None and str(tag) not in out:
            out.append(str(tag))
    return ListConfig(out)


RESOLVERS = {
    "wandb_offline": wandb_offline,
    "wandb_run_id": wandb_run_id,
    "sweep_objective": sweep_objective,
    "needs_fid": needs_fid,
    "wandb_run_name": wandb_run_name,
    "wandb_run_group": wandb_run_group,
    "wandb_run_tags": wandb_run_tags,
}


def register_resolvers() -> None:
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


register_resolvers()
