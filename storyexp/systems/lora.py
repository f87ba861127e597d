"""`model.train.mode=lora`: low-rank adapters (peft) on a frozen backbone, shared by the three story systems.

One mechanism for every model: `peft.inject_adapter_in_model` replaces each targeted `nn.Linear` of the given
backbone by peft's `lora.Linear` (the base weight kept as `<name>.base_layer.weight`, the adapter as
`<name>.lora_A.default.weight` / `<name>.lora_B.default.weight`). diffusers' `unet.add_adapter` wraps this same
call, so the UNet goes through it directly like the two GPT-style backbones.

What trains besides the adapters is each system's decision (parts without pretrained weights: story block,
cross-attention / condition layers, new character-token rows, frame-time embeddings); the system re-enables them
after `inject_lora` froze everything else. The checkpoint keeps only what trains, as in every train.mode
(`StorySystem.saved_state_keys`): the base is rebuilt from the config (`network`) when the checkpoint is loaded and
checked against the checkpoint's record of it (`StorySystem.frozen_digest`, taken before any merge).

Merging (`set_merged`): while a model is not being fitted (eval, sample, a direct `generate`), sampling folds the
adapters into the base weights once (`W += scale * B A`) and they stay merged, so sampling costs what the base model
costs. During fitting (validation grids) sampling runs on the unmerged adapters, which compute the same function:
merging and unmerging at every grid would round the base weights a little each time (much in fp16 / bf16). Training
steps and checkpoint loads unmerge first (a merged layer skips its adapter, so it would get no gradient, and loaded
adapters must not be added on top of the previous ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from storyexp.errors import ConfigurationError

OPTIONS = ("r", "alpha", "dropout", "target_modules")


def check_lora_config(lora: dict[str, Any] | None) -> None:
    """One ConfigurationError line for a bad `model.train.lora` (before anything is built)."""
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(OPTIONS))
    if unknown:
        raise ConfigurationError(f"model.train.lora has unknown option(s) {unknown}: the options are {list(OPTIONS)}.")
    r = lora.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigurationError(f"model.train.lora.r={r!r} is not valid: it must be an integer >= 1.")
    dropout = float(lora.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ConfigurationError(f"model.train.lora.dropout={dropout!r} is not valid: it must be in [0, 1).")
    targets = lora.get("target_modules")
    if targets is not None and (isinstance(targets, str) or not list(targets)):
        raise ConfigurationError(f"model.train.lora.target_modules={targets!r} is not valid: it must be a non-empty "
                                 "list of module-name suffixes (e.g. [to_q, to_k, to_v, to_out.0]).")


def inject_lora(module: nn.Module, lora: dict[str, Any] | None, default_targets: list[str], where: str,
                exclude: str | None = None) -> nn.Module:
    """Add LoRA adapters to the `target_modules` linears of `module` (in place), everything in `module` frozen
    but the adapters. `exclude`: a regex of module names left without adapters (parts that train fully)."""
    from storyexp.systems.schedules import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()  # peft imports bitsandbytes when it is installed
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigurationError("model.train.mode=lora needs the peft package: pip install peft (pinned in "
                                 "requirements.txt).") from None

    check_lora_config(lora)
    lora = dict(lora or {})
    targets = list(lora.get("target_modules") or default_targets)
    r = int(lora.get("r", 8))
    config = LoraConfig(r=r, lora_alpha=float(lora.get("alpha", r)), lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=targets, exclude_modules=exclude, bias="none")
    try:
        inject_adapter_in_model(config, module)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise ConfigurationError(f"model.train.lora.target_modules={targets} matches no linear layer of {where} "
                                 f"({str(err).splitlines()[0][:160]}).") from None
    return module


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def set_merged(module: nn.Module, merged: bool) -> None:
    """Fold the adapters into their base weights (`merged=True`) or take them out again; a no-op when they
    already are in that state."""
    for layer in lora_layers(module):
        if merged and not layer.merged:
            layer.merge()
        elif not merged and layer.merged:
            layer.unmerge()
