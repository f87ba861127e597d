"""The originals' checkpoints given as `ckpt_path`: recognised, and imported through the model's own loader.

Two files written by the original code can be handed to `task=eval` / `task=sample` as they are:

- an original AR-LDM `last.ckpt`: the Lightning (< 1.7) checkpoint of `xichenpan/ARLDM` (arldm.md §5): a
  `state_dict` in the original module names (`unet.*`, `vae.*`, `text_encoder.text_model.*`,
  `mm_encoder.visual_encoder.*`, `modal_type_embeddings.weight`, `time_embeddings.weight`, ...) beside
  `optimizer_states`, `lr_schedulers`, `loops`, `callbacks`, `epoch`, `global_step` and
  `pytorch-lightning_version`, and no storyexp model record;
- a released StoryDALL-E `{epoch}.pth` (storydalle.md §3.2): `model_state_dict` (`stage1.*`, `stage2.*`,
  `story_linear.*`, `story_block.*`) beside `optimizer_state_dict`, `epoch`, `iteration`, `scheduler`, `loss`.

One mechanism, the one that already builds a model from such a file: the task sets the composed model's
`model.network.init_from_original` / `init_from_storydalle` to the file, so the network is built and the weights are
loaded strictly by the existing loaders (`load_original_arldm_checkpoint`, `load_storydalle_checkpoint`), and
Lightning is given no `ckpt_path` (it would look for the storyexp layout). Everything else in the file (optimizer,
loops, callbacks) is ignored: eval and sample need only the weights.

What is still needed besides the file, and why (neither original stores it in its checkpoint):

- AR-LDM: the file holds every weight, the frozen VAE included, but not the two tokenizers (CLIP's BPE files, the
  BERT vocabulary, each with the dataset's character tokens added) nor the network configurations. The composed
  model builds them: at the published size (`model=arldm`, `source: pretrained`) from the Stable Diffusion folder
  (tokenizer/ and the unet/ vae/ text_encoder/ configs), BLIP `model_large.pth` and bert-base-uncased, exactly as
  `init_from_original` does today; the pretrained weights read there are then all replaced by the file's. A
  `source: sizes` model (tiny / demo) needs no file at all. Building the published size from configurations and
  tokenizers only (without the UNet / VAE / CLIP / BLIP weight files) is not done yet.
- StoryDALL-E: the file holds every weight, the VQGAN (`stage1.*`) included, but not the tokenizer or the sizes:
  at the published size the minDALL-E folder (`1.3B/`: config.yaml, tokenizer/; its stage-2 weights are read and
  then replaced) is still read, exactly as `init_from_storydalle` does today.

The composed `model=` must be of the file's family (its sizes, characters and caption length must be the ones the
file was trained with; the strict loaders say which keys or shapes differ). Training never resumes from such a file
(it has no storyexp state): `task=train` refuses it with the `init_from_*` option that finetunes from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, open_dict

from storyexp.callbacks.model_record import RECORD_KEY
from storyexp.errors import ConfigurationError


@dataclass(frozen=True)
class Family:
    name: str  # the `model=` option of this family's published size
    system: str  # `_target_` of the composed model config
    init_key: str  # the `model.network` key whose loader reads the file
    what: str  # the file's description in messages


ARLDM = Family("arldm", "storyexp.systems.arldm.ARLDMSystem", "init_from_original",
               "an original AR-LDM Lightning checkpoint (last.ckpt)")
STORYDALLE = Family("mindalle", "storyexp.systems.storydalle.StoryDalleSystem", "init_from_storydalle",
                    "a released StoryDALL-E checkpoint ({epoch}.pth)")
FAMILIES = (ARLDM, STORYDALLE)

# key layout of each original state dict: names no storyexp system uses (storyexp's live under `net.` and the
# checkpoint carries the model record, which the originals never do)
_ARLDM_KEYS = ("modal_type_embeddings.weight", "time_embeddings.weight")
_ARLDM_PREFIXES = ("unet.", "vae.", "text_encoder.", "mm_encoder.")
_STORYDALLE_PREFIXES = ("stage1.", "stage2.", "story_linear.")


@dataclass(frozen=True)
class OriginalCheckpoint:
    path: str
    family: Family

    def option(self) -> str:
        return f"model.network.{self.family.init_key}={self.path}"


def classify(checkpoint: Any) -> Family | None:
    """The original family whose checkpoint layout `checkpoint` (a loaded file) has; None for anything else
    (a storyexp checkpoint, which carries the model record, among it)."""
    if not isinstance(checkpoint, Mapping) or RECORD_KEY in checkpoint:
        return None
    released = checkpoint.get("model_state_dict")
    if isinstance(released, Mapping) and _has_prefixes(released, _STORYDALLE_PREFIXES):
        return STORYDALLE
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return None
    if all(k in state for k in _ARLDM_KEYS) and _has_prefixes(state, _ARLDM_PREFIXES):
        return ARLDM
    if _has_prefixes(state, _STORYDALLE_PREFIXES):  # StoryDALL-E's loader also accepts a `state_dict` wrapper
        return STORYDALLE
    return None


def _has_prefixes(state: Mapping, prefixes: tuple[str, ...]) -> bool:
    found = {p for key in state for p in prefixes if str(key).startswith(p)}
    return len(found) == len(prefixes)


def family_of(cfg: DictConfig) -> Family | None:
    target = str((cfg.get("model") or {}).get("_target_", ""))
    return next((f for f in FAMILIES if f.system == target), None)


def composed_name(cfg: DictConfig) -> str:
    from storyexp.tasks.common import model_choice  # common imports this module

    return model_choice(cfg) or str((cfg.get("model") or {}).get("_target_", "?"))


def use_original(cfg: DictConfig, original: OriginalCheckpoint) -> None:
    """Build the composed model from the original file: `model.network.<init_from_*>` = the file, after checking
    that the composed model is of the file's family (one line naming both otherwise)."""
    family, now = original.family, family_of(cfg)
    if now is not family:
        raise ConfigurationError(
            f"ckpt_path {original.path} is {family.what}, a model={family.name} checkpoint, but this run composes "
            f"model={composed_name(cfg)}: pass model={family.name} (or its size variant the file was trained with).")
    network = cfg.model.network
    given = network.get(family.init_key)
    if given and str(given) != original.path:
        raise ConfigurationError(
            f"ckpt_path {original.path} and model.network.{family.init_key}={given} name two original checkpoints: "
            "pass one of them.")
    with open_dict(network):
        network[family.init_key] = original.path


def resume_refusal(original: OriginalCheckpoint) -> str:
    return (f"ckpt_path {original.path} is {original.family.what}, which holds no storyexp training state to resume: "
            f"to finetune from its weights pass {original.option()} (with model={original.family.name}) and no "
            "ckpt_path.")
