"""Finding and loading min-dalle's converted files (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt).

Accepted layouts, first complete one wins (the one with the most files present is reported when none is):

- flat: `<folder>/{encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt}`;
- min-dalle's `models_root`: `<folder>/dalle_bart_mega/{vocab.json, merges.txt, encoder.pt, decoder.pt}` and
  `<folder>/vqgan/detoker.pt` (or `dalle_bart_mini/...` for DALL-E Mini);
- the Mini files flat, as named on the hub: `{encoder,decoder}_mini.pt`, `{vocab,merges}_mini.*` + `detoker.pt`.

The files are flat float16 state dicts whose tensors may be non-contiguous, overlapping views (the converter saved
transposed views and slices; see the parity README); they are cast and copied into the module's own parameters,
so nothing depends on their strides. Keys are checked both ways before anything is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from storyexp.errors import MissingResourceError, StoryexpError

ROLES = ("encoder", "decoder", "detokenizer", "vocab", "merges")
LAYOUTS: dict[str, dict[str, str]] = {
    "flat": {"encoder": "encoder.pt", "decoder": "decoder.pt", "detokenizer": "detoker.pt",
             "vocab": "vocab.json", "merges": "merges.txt"},
    "min-dalle mega": {"encoder": "dalle_bart_mega/encoder.pt", "decoder": "dalle_bart_mega/decoder.pt",
                       "detokenizer": "vqgan/detoker.pt", "vocab": "dalle_bart_mega/vocab.json",
                       "merges": "dalle_bart_mega/merges.txt"},
    "min-dalle mini": {"encoder": "dalle_bart_mini/encoder.pt", "decoder": "dalle_bart_mini/decoder.pt",
                       "detokenizer": "vqgan/detoker.pt", "vocab": "dalle_bart_mini/vocab.json",
                       "merges": "dalle_bart_mini/merges.txt"},
    "flat mini": {"encoder": "encoder_mini.pt", "decoder": "decoder_mini.pt", "detokenizer": "detoker.pt",
                  "vocab": "vocab_mini.json", "merges": "merges_mini.txt"},
}  # fmt: skip
HOW_TO_GET = (
    "Download them from https://huggingface.co/kuprel/min-dalle (files dalle_bart_mega/{vocab.json, merges.txt, "
    "encoder.pt, decoder.pt} and vqgan/detoker.pt) into that folder, either flat or in that layout."
)


class MegaCheckpointError(StoryexpError, KeyError):
    """A state dict does not fit the module: every missing / unexpected key and shape mismatch is listed."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def resolve_files(folder: str | Path) -> dict[str, Path]:
    """Paths of the five files in the first complete layout, or MissingResourceError naming what is missing."""
    folder = Path(folder)
    best, best_count = "flat", -1
    for name, layout in LAYOUTS.items():
        present = sum((folder / rel).is_file() for rel in layout.values())
        if present == len(ROLES):
            return {role: folder / rel for role, rel in layout.items()}
        if present > best_count:
            best, best_count = name, present
    missing = [rel for rel in LAYOUTS[best].values() if not (folder / rel).is_file()]
    raise MissingResourceError(f"DALL-E Mega files ({best} layout) {', '.join(missing)}", folder, HOW_TO_GET)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MegaCheckpointError(f"{path}: expected a flat dict of tensors (min-dalle's converted format)")
    return dict(state)


def layer_count(state: Mapping[str, torch.Tensor], prefix: str = "layers.") -> int:
    """Number of `layers.<l>.` blocks; they must be numbered 0..n-1."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise MegaCheckpointError(f"layer indices {sorted(ids)} are not 0..{len(ids) - 1}")
    return len(ids)


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy `state` into `module` (cast to the module's dtype), after checking every key both ways.

    Missing keys for which `may_be_missing(key)` holds keep the module's initial values (StoryDALL-E's condition
    layers, absent from the released files); any other missing key, any unexpected key and any shape mismatch
    raises MegaCheckpointError listing them all.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not may_be_missing(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise MegaCheckpointError("\n".join(lines))
    with torch.no_grad():
        for key, target in own.items():
            if key in state:
                target.copy_(state[key].to(dtype=target.dtype))
