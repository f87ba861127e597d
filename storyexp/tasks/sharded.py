"""Sharded checkpoints: the folders FSDP (`state_dict_type: sharded`) and DeepSpeed write instead of one `.ckpt` file.

Each rank writes its own shards, so a checkpoint of a model that does not fit one GPU never has to be gathered on
one. The folder keeps the `.ckpt` name ModelCheckpoint gives it (`checkpoints/last.ckpt/`, `step_0000500.ckpt/`):

    FSDP       <name>.ckpt/  .metadata + __0_0.distcp ... (torch.distributed.checkpoint) + meta.pt (everything else:
               loop state, callbacks, the storyexp model record)
    DeepSpeed  <name>.ckpt/  latest + checkpoint/*model_states.pt (rank 0's holds everything else) + *optim_states.pt

Resume with the strategy that wrote it (`trainer=fsdp ckpt_path=...`, `trainer=deepspeed ckpt_path=...`); for one
file that any trainer, eval or sample reads, consolidate it (`CONSOLIDATE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storyexp.errors import ConfigurationError

FSDP_METADATA = "meta.pt"  # Lightning's name (lightning.fabric.utilities.load._METADATA_FILENAME)
DEEPSPEED_LATEST = "latest"  # DeepSpeed's pointer to the tag folder (Lightning saves tag "checkpoint")

CONSOLIDATE = {
    "fsdp": "python -m lightning.pytorch.utilities.consolidate_checkpoint {path}  (writes {path}.consolidated)",
    "deepspeed": "python -c \"from lightning.pytorch.utilities.deepspeed import "
                 "convert_zero_checkpoint_to_fp32_state_dict as c; c('{path}', '{path}.fp32.ckpt')\"",
}


def sharded_kind(path: str | Path | None) -> str | None:
    """'fsdp' or 'deepspeed' when `path` is a sharded checkpoint folder of that strategy, else None."""
    if not path:
        return None
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / FSDP_METADATA).is_file():
        return "fsdp"
    if (path / DEEPSPEED_LATEST).is_file():
        return "deepspeed"
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Everything of a sharded checkpoint but the weights and optimizer states (the model record among it), read
    through the one safe loader: FSDP's `meta.pt`; DeepSpeed's rank-0 model-states file (its client state)."""
    from storyexp.utils.loading import load_file

    path = Path(path)
    kind = sharded_kind(path)
    if kind == "fsdp":
        return load_file(path / FSDP_METADATA, "Sharded checkpoint metadata (ckpt_path)", mmap=True)
    if kind == "deepspeed":
        tag = (path / DEEPSPEED_LATEST).read_text().strip()
        files = sorted((path / tag).glob("*model_states.pt"))  # mp_rank_00_... (ZeRO-2) / zero_pp_rank_0_... (ZeRO-3)
        if not files:
            raise ConfigurationError(f"ckpt_path {path} is a DeepSpeed checkpoint without {tag}/*model_states.pt: "
                                     "it was not written completely; resume from an earlier checkpoint.")
        return load_file(files[0], "DeepSpeed checkpoint states (ckpt_path)", mmap=True)
    raise ConfigurationError(f"ckpt_path {path} is not a sharded checkpoint folder (no {FSDP_METADATA} or "
                             f"{DEEPSPEED_LATEST} in it).")


def check_readable_by(path: str | Path | None, strategy_kind: str | None) -> None:
    """A sharded checkpoint is read by the strategy that wrote it: anything else is one line naming the fix."""
    kind = sharded_kind(path)
    if kind is None or kind == strategy_kind:
        return
    raise ConfigurationError(
        f"ckpt_path {path} is a sharded {kind} checkpoint, which trainer.strategy="
        f"{strategy_kind or 'auto/ddp'} cannot read: run with trainer={kind}, or consolidate it into one file: "
        + CONSOLIDATE[kind].format(path=path)
    )
