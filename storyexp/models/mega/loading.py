"""Finding and loading min-dalle's converted files (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt).

Accepted layouts, first complete one wins (the one with the most files present is reported when none is):

- flat: `<folder>/{encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt}`;
- min-dalle's `models_root`: `<folder>/dalle_bart_mega/{vocab.json, merges.txt, encoder.pt, decoder.pt}` and
  `<folder>/vqgan/detoker.pt` (or `dalle_bart_mini/...` for DALL-E Mini);
- the Mini files flat, as named on the hub: `{encoder,decoder}_mini.pt`, `{vocab,merges}_mini.*` + `detoker.pt`.

The files are flat float16 state dicts whose tensors may be non-contiguous, overlapping views (the converter saved
transposed views and slices; see the parity README); they are cast and copied into the module's own parameters,
so nothing depends on their strides. Keys are checked both ways before anything is copied
(`storyexp.utils.loading.check_state_dict`); the files are read with `storyexp.utils.loading.load_file`.

The encoder / decoder files were converted from dalle-mini's flax parameters, and dalle-mini builds several
LayerNorms without a scale (`force_ln_scale=False`; in min-dalle's flax port `nn.LayerNorm(use_scale=False)` for
`pre_self_attn_layer_norm`, `pre_encoder_attn_layer_norm`, `glu.ln0`, `glu.ln1` and `final_ln`), so those `.weight`
keys can be absent. min-dalle builds every one as a torch `nn.LayerNorm` (scale initialised to 1) and loads with
`strict=False`; here an absent LayerNorm scale is set to ones, the same numbers, and every other missing key is
still an error (one line naming them), which `strict=False` would hide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from storyexp.errors import MissingResourceError
from storyexp.utils.loading import CheckpointMismatchError, UnreadableFileError, check_state_dict, load_file

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


def read_state_dict(path: Path, what: str = "min-dalle file") -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` file (min-dalle's converted format), read with `load_file`."""
    state = load_file(path, what, how_to_get=HOW_TO_GET)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableFileError(
            f"{what} {path} is not a flat dict of tensors (min-dalle's converted format); use the files from "
            "https://huggingface.co/kuprel/min-dalle unchanged."
        )
    return dict(state)


def layer_count(state: Mapping[str, torch.Tensor], prefix: str = "layers.", source: str | Path = "state dict") -> int:
    """Number of `layers.<l>.` blocks; they must be numbered 0..n-1 (else CheckpointMismatchError naming `source`)."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise CheckpointMismatchError(
            f"{source}: layer indices {sorted(ids)} are not 0..{len(ids) - 1}; the file is incomplete or not "
            "min-dalle's converted format."
        )
    return len(ids)


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> None:
    """Copy `state` into `module` (cast to the module's dtype), after checking every key both ways.

    An absent LayerNorm scale (`<layer norm>.weight`, left out by the flax conversion) is set to ones, as min-dalle
    loads it (module docstring). Missing keys for which `may_be_missing(key)` holds keep the module's initial values
    (StoryDALL-E's condition layers, absent from the released files); any other missing key, any unexpected key and
    any shape mismatch raises one CheckpointMismatchError counting them (`check_state_dict`).
    """
    own = module.state_dict()
    scales = layer_norm_scales(module)
    excused = check_state_dict(own, state, f"min-dalle file {source} ({type(module).__name__})",
                               ignore_missing=lambda key: key in scales or may_be_missing(key),
                               hint="use min-dalle's converted files, unchanged, or build the model with the options "
                                    "the file was written with (condition_layers)")
    with torch.no_grad():
        for key, target in own.items():
            if key in state:
                target.copy_(state[key].to(dtype=target.dtype))
        for key in excused:
            if key in scales and not may_be_missing(key):  # condition layers keep their own initial values
                own[key].fill_(1.0)


def layer_norm_scales(module: nn.Module) -> set[str]:
    """State-dict keys of the scales (`weight`) of `module`'s affine `nn.LayerNorm`s."""
    return {f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
            if isinstance(sub, nn.LayerNorm) and sub.weight is not None}
