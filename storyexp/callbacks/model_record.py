"""Every checkpoint records the model it was trained with, so `task=eval` / `task=sample` rebuild that model.

The task adds this callback to every trainer (it is not a config option): it writes `checkpoint["storyexp"]` =
`{"format": 1, "model": <the model= choice>, "config": <the model config, interpolations unresolved>}`.
`storyexp.tasks.common.use_checkpoint_model` reads it back.
"""

from __future__ import annotations

from typing import Any

import lightning as L

RECORD_KEY = "storyexp"
RECORD_FORMAT = 1


class ModelRecord(L.Callback):
    def __init__(self, model: str | None, config: dict[str, Any]):
        self.record = {"format": RECORD_FORMAT, "model": model, "config": config}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = self.record
