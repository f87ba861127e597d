"""Strict state-dict checking shared by the AR-LDM loaders (the original loaded with strict=False)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model; the message lists every problem."""


def check_state_dict(
    target: Mapping[str, torch.Tensor], mapped: Mapping[str, torch.Tensor], what: str, ignore_unexpected=False
) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch (strict loading)."""
    missing = sorted(set(target) - set(mapped))
    unexpected = [] if ignore_unexpected else sorted(set(mapped) - set(target))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(target) & set(mapped)
        if tuple(mapped[k].shape) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"{what}: the checkpoint does not fit the model."]
        sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, items in sections:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointMismatchError("\n".join(lines))
