"""Every checkpoint records the model it was trained with, so `task=eval` / `task=sample` rebuild that model.

The task adds this callback to every trainer (it is not a config option): it writes `checkpoint["storyexp"]` =
`{"format": 1, "model": <the model= choice>, "config": <the model config, interpolations unresolved>,
"data": <the data facts the model was built from>}`. `storyexp.tasks.common.use_checkpoint_model` reads the model
config back.

`"data"` (`data_record`, read from the trainer's data module when the checkpoint is written) holds, resolved, what
the model config interpolates from `data.*` (`task`, `characters`, `character_tokens`, `max_length`, `vocabulary`)
and how the data module shapes frames (`frame_size`, `frame_fit`), plus the dataset's `name`: with it, sampling the
user's own captions (`task=sample sample.captions=...`, `task=app`) needs the checkpoint alone, not the dataset or
its data config (`apply_data_record`). Image normalisation is the system's own (part of the model config). A
checkpoint from before this record falls back to the composed data config.

The same dict carries `"frozen"`, the record of where a lean checkpoint's frozen weights come from: the system writes
it itself (`StorySystem.on_save_checkpoint`, which runs after this callback), because Lightning calls no callback for
a weights-only save and a lean state dict must never travel without it. Both writers merge into the dict.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from storyexp.utils.fingerprints import RECORD_KEY

RECORD_FORMAT = 1
DATA_RECORD = "data"  # checkpoint[RECORD_KEY][DATA_RECORD]
# data-module attributes recorded (all plain values); the first five are what model configs interpolate
DATA_KEYS = ("task", "characters", "character_tokens", "max_length", "vocabulary", "frame_size", "frame_fit", "name")
__all__ = ["DATA_KEYS", "DATA_RECORD", "RECORD_FORMAT", "RECORD_KEY", "ModelRecord", "apply_data_record",
           "data_record"]

log = logging.getLogger("storyexp")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, ListConfig)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def data_record(datamodule: Any) -> dict[str, Any] | None:
    """`DATA_KEYS` of a story data module (None without one, e.g. a model trained on a loader of its own)."""
    if datamodule is None or not hasattr(datamodule, "task"):
        return None
    return {key: _plain(getattr(datamodule, key)) for key in DATA_KEYS if hasattr(datamodule, key)}


def apply_data_record(cfg: DictConfig, record: dict[str, Any] | None, command_line: list[str] = ()) -> list[str]:
    """Put the recorded data facts into `cfg.data`, so the checkpoint's model config (`${data.task}`,
    `${data.character_tokens}`, ...) resolves to what the model was trained with whatever data config was composed.
    A `data.<key>=` given on the command line is kept. Returns the keys set; without a record (an older checkpoint)
    nothing changes and the composed data config is used."""
    if not record:
        return []
    given = {o.split("=", 1)[0].lstrip("+~") for o in command_line}
    applied = []
    with open_dict(cfg):
        if cfg.get("data") is None:
            cfg.data = OmegaConf.create({})
        for key in DATA_KEYS:
            if key == "name" or key not in record or f"data.{key}" in given:
                continue  # the name stays the composed config's: it selects that config's reader and paths
            cfg.data[key] = record[key]
            applied.append(key)
    shown = ", ".join(f"{k}={record[k]!r}" for k in applied if k not in ("vocabulary", "character_tokens"))
    log.info("Data facts from the checkpoint: %s", shown)
    return applied


class ModelRecord(L.Callback):
    def __init__(self, model: str | None, config: dict[str, Any]):
        self.record = {"format": RECORD_FORMAT, "model": model, "config": config}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        record = dict(self.record)
        data = data_record(getattr(trainer, "datamodule", None))
        if data is not None:
            record[DATA_RECORD] = data
        checkpoint[RECORD_KEY] = {**(checkpoint.get(RECORD_KEY) or {}), **record}
