"""Optional dependencies (pyproject's extras): one check, one message naming the extra to install.

    gradio = require("gradio", extra="app", feature="task=app")

`require` imports the module, or raises ConfigurationError (printed as one line by the storyexp command):
"task=app needs the gradio package: pip install 'storyexp[app]' (or pip install -r requirements.txt in a checkout)".
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from storyexp.errors import ConfigurationError

__all__ = ["extra_missing_message", "is_installed", "require"]


def is_installed(module: str) -> bool:
    """Whether `module` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def extra_missing_message(module: str, extra: str, feature: str) -> str:
    return (f"{feature} needs the {module.split('.')[0]} package: pip install 'storyexp[{extra}]' "
            "(or pip install -r requirements.txt in a checkout).")


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, imported; ConfigurationError naming `extra` when it is not installed."""
    if not is_installed(module):
        raise ConfigurationError(extra_missing_message(module, extra, feature))
    return importlib.import_module(module)
