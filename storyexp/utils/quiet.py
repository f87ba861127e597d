"""Known, harmless terminal noise, silenced by exact message or logger (each with where it comes from).

Called by the `storyexp` command (storyexp/cli.py, inside the Hydra job, after Hydra configured logging) and by
`storyexp.tasks.common.build_callbacks` (so runs composed in-process, as the tests do, are as quiet). Idempotent.
Warnings that a user can act on are kept; only notices that say nothing about the run are dropped.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_known_noise"]

# Lightning's advertisements, through rank_zero_info on this logger: "💡 Tip: For seamless cloud logging and experiment
# tracking, try installing [litlogger]..." on every Trainer() (lightning/pytorch/trainer/connectors/logger_connector/
# logger_connector.py) and "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]..." when
# Lightning adds its default ModelCheckpoint (callback_connector.py, e.g. callbacks=none)
_LITLOGGER_LOGGER = "lightning.pytorch.utilities.rank_zero"
_LITLOGGER_TIP = "Tip: For seamless cloud "


class _DropMessage(logging.Filter):
    """Drops records whose message contains `text` (a logging.Filter on the logger that emits them)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    rank_zero = logging.getLogger(_LITLOGGER_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.text == _LITLOGGER_TIP for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessage(_LITLOGGER_TIP))
    # bitsandbytes (imported by peft) warns on CPU machines that an optional 4-bit kernel package (`kernels`) is
    # missing; storyexp uses only its 8-bit optimizer (storyexp/systems/schedules.py quiet_bitsandbytes_import)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # lightning/__init__.py gives the `lightning` logger its own "INFO: <message>" console handler and lets records
    # propagate too, so under Hydra's logging (console + the run's <task>.log) every Lightning line printed twice.
    # Hydra's handlers keep them (and write them to the log file); only Lightning's extra console copy goes.
    root = logging.getLogger()
    if root.handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler and lightning.propagate:
                lightning.removeHandler(handler)
