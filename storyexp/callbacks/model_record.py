"""Every checkpoint records the model it was trained with, so `task=eval` / `task=sample` rebuild that model.

The task adds this callback to every trainer (it is not a config option): it writes `checkpoint["storyexp"]` =
`{"format": 1, "model": <the model= choice>, "config": <the model config, interpolations unresolved>}`.
`storyexp.tasks.common.use_checkpoint_model` reads it back.

The same dict carries `"frozen"`, the record of where a lean checkpoint's frozen weights come from: the system writes
it itself (`StorySystem.on_save_checkpoint`, which runs after this callback), because Lightning calls no callback for
a weights-only save and a lean state dict must never travel without it. Both writers merge into the dict.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from storyexp.utils.fingerprints import RECORD_KEY

RECORD_FORMAT = 1
__all__ = ["RECORD_FORMAT", "RECORD_KEY", "ModelRecord"]


class ModelRecord(L.Callback):
    def __init__(self, model: str | None, config: dict[str, Any]):
        self.record = {"format": RECORD_FORMAT, "model": model, "config": config}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = {**(checkpoint.get(RECORD_KEY) or {}), **self.record}
