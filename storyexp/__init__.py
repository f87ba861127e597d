"""storyexp: a Hydra-driven experiment framework for story visualization and story continuation."""

from pathlib import Path

__version__ = "0.1.0"

# The config tree ships inside the package, so an installed copy composes experiments from any directory
# (`storyexp ...`, storyexp/cli.py); user configs join it through Hydra's search path (`--config-dir`,
# `hydra.searchpath`).
CONFIG_DIR = Path(__file__).resolve().parent / "conf"
