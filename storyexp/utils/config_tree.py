"""The composed config as a tree at start-up (rank 0), also saved as ``<run>/config_tree.log``.

What lightning-hydra-template's ``print_config_tree`` does, with rich: the run's groups first (task, data, model,
trainer, ...), each resolved, so what is printed is what runs. ``.hydra/config.yaml`` keeps the unresolved
composition; this is the readable, resolved view.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from storyexp.utils.io import atomic_write_text

__all__ = ["ORDER", "config_tree_text", "print_config_tree"]

# shown first, in this order; every other key follows
ORDER = ("task", "data", "model", "trainer", "eval", "callbacks", "logger", "paths", "seed", "ckpt_path")


def _section(value) -> str:
    if OmegaConf.is_config(value):
        return OmegaConf.to_yaml(value, resolve=True)
    return str(value)


def config_tree_text(cfg: DictConfig, order: Sequence[str] = ORDER) -> str:
    """The rendered tree (plain text, no colours)."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    keys = [k for k in order if k in cfg] + sorted(k for k in cfg if k not in order and k != "hydra")
    tree = Tree("config", guide_style="dim")
    for key in keys:
        branch = tree.add(str(key))
        branch.add(Syntax(_section(cfg[key]), "yaml", theme="ansi_dark", background_color="default"))
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(tree)
    return console.export_text()


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: str | Path | None = None) -> None:
    """Print the tree (global rank 0 only) and, with ``save_to``, write it there."""
    text = config_tree_text(cfg)
    print(text, end="")  # plain print: rich markup would eat "[...]" in values
    if save_to is not None:
        atomic_write_text(Path(save_to), text)
