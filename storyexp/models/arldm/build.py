"""Config -> AR-LDM networks + tokenizers (`model.network` in storyexp/conf/model/arldm*.yaml).

    source: pretrained   Stable Diffusion folder/hub id + BLIP model_large.pth + BERT tokenizer (real runs), through
                         `build_arldm_from_pretrained`; the other keys are its options (n_frames, blip_config, ...)
    source: sizes        random initialisation from the typed sizes `ARLDMSizes` (width, clip, blip, unet, vae, ...),
                         tokenizers written from a word list, through `build_arldm_from_sizes` (the CPU demo and the
                         tiny test configuration; nothing is downloaded)

Either may start from an original AR-LDM Lightning checkpoint (`init_from_original`), loaded strictly.

    built = build_arldm(network, characters, max_length=24)
    built = ARLDMBuilder(characters, max_length=24).build(network)   # the same
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.sizes import (
    check_arguments,
    missing_key_error,
    parameter_names,
    parse_sizes,
    plain,
    unknown_key_error,
)
from storyexp.models.sources import NetworkBuilder, network_seed, original_name_tokens

from .autoencoder import PixelAutoencoder
from .blip import BlipMultimodalConfig
from .loading import (
    _TINY_BLIP,
    _TINY_CLIP,
    _TINY_UNET,
    ARLDMComponents,
    build_arldm_from_pretrained,
    build_arldm_from_sizes,
    load_original_arldm_checkpoint,
)

PRETRAINED_KEYS = ("stable_diffusion", "blip_checkpoint", "bert_tokenizer")
# keys of `model.network` that are not sizes: read by the builder (the pretrained ones are inherited from the
# published config and unused when building from sizes), or by the system (channels_last: the memory format it puts
# the built UNet and VAE in)
NETWORK_KEYS = ("source", "words", "seed", "init_from_original", "original_name_tokens", "tokenizer_dir",
                "channels_last", *PRETRAINED_KEYS)
_FROM_TOKENIZERS = "it is set from the tokenizers"


@dataclass(frozen=True)
class ClipSizes:
    """`model.network.clip`: the CLIP text encoder (width = `model.network.width`, positions = the caption length)."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = _TINY_CLIP["hidden_act"]
    layer_norm_eps: float = _TINY_CLIP["layer_norm_eps"]

    @classmethod
    def from_block(cls, block: Any, where: str = "model.network.clip") -> "ClipSizes":
        return parse_sizes(cls, block, where, reasons={
            "hidden_size": "it is model.network.width", "max_positions": "it is the caption length (data.max_length)",
            "vocab_size": _FROM_TOKENIZERS, "bos_token_id": _FROM_TOKENIZERS, "eos_token_id": _FROM_TOKENIZERS,
            "pad_token_id": _FROM_TOKENIZERS})


@dataclass(frozen=True)
class BlipSizes:
    """`model.network.blip`: the BLIP multimodal encoder (`BlipMultimodalConfig` fields; the text width is
    `model.network.width`, the vocabulary and special ids come from the tokenizer)."""

    image_size: int
    patch_size: int
    vision_depth: int
    vision_heads: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    vision_width: int | None = None  # None: model.network.width
    vision_mlp_ratio: float = _TINY_BLIP["vision_mlp_ratio"]
    vision_layer_norm_eps: float = BlipMultimodalConfig.vision_layer_norm_eps
    vision_drop_path_rate: float = _TINY_BLIP["vision_drop_path_rate"]
    text_max_positions: int | None = None  # None: the caption length (at least that many in any case)
    text_layer_norm_eps: float = BlipMultimodalConfig.text_layer_norm_eps
    text_hidden_act: str = BlipMultimodalConfig.text_hidden_act
    text_dropout: float = _TINY_BLIP["text_dropout"]
    text_attention_dropout: float = _TINY_BLIP["text_attention_dropout"]

    @classmethod
    def from_block(cls, block: Any, where: str = "model.network.blip") -> "BlipSizes":
        return parse_sizes(cls, block, where, reasons={
            "text_hidden_size": "it is model.network.width", "vocab_size": _FROM_TOKENIZERS,
            "pad_token_id": _FROM_TOKENIZERS, "enc_token_id": _FROM_TOKENIZERS})

    def to_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_UNET_DERIVED = {
    "in_channels": "it is the autoencoder's latent channel count", "out_channels": "it is the autoencoder's latent "
    "channel count", "cross_attention_dim": "it is model.network.width",
}


@dataclass(frozen=True)
class UNetSizes:
    """`model.network.unet`: the UNet's sizes; any other `UNet2DConditionModel` argument goes to `extra`."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int | tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    norm_num_groups: int
    sample_size: int = _TINY_UNET["sample_size"]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_block(cls, block: Any, where: str = "model.network.unet") -> "UNetSizes":
        block = plain(block)
        if not isinstance(block, Mapping):
            return parse_sizes(cls, block, where)  # missing / not a mapping: its one-line message
        typed = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        extra = {k: v for k, v in block.items() if k not in typed}
        others = [n for n in parameter_names(UNet2DConditionModel) if n not in typed and n not in _UNET_DERIVED]
        unknown = [k for k in extra if k not in others]
        if unknown:
            raise unknown_key_error(where, unknown, typed + ["another UNet2DConditionModel argument"],
                                    reasons=_UNET_DERIVED)
        sizes = parse_sizes(cls, {k: v for k, v in block.items() if k in typed}, where)
        return dataclasses.replace(sizes, extra=dict(extra))

    def to_kwargs(self) -> dict[str, Any]:
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**kwargs, **self.extra}


VAE_KINDS = {"pixel": PixelAutoencoder, "kl": AutoencoderKL}


@dataclass(frozen=True)
class VAESizes:
    """`model.network.vae`: ``{kind: pixel, factor, scaling_factor}`` (the lossless pixel autoencoder; the default,
    f = 2) or ``{kind: kl, **AutoencoderKL arguments}``."""

    kind: str = "pixel"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_block(cls, block: Any, where: str = "model.network.vae") -> "VAESizes":
        block = plain(block)
        if not block:  # absent or empty: the default autoencoder
            return cls()
        if not isinstance(block, Mapping):
            raise ConfigurationError(f"{where} must be a mapping of sizes, got {type(block).__name__} {block!r}.")
        params = dict(block)
        kind = params.pop("kind", "pixel")
        if kind not in VAE_KINDS:
            raise ConfigurationError(f"{where}.kind={kind!r} is not valid: it must be one of {', '.join(VAE_KINDS)}.")
        return cls(kind=kind, params=check_arguments(VAE_KINDS[kind], params, where, what="size"))

    def to_kwargs(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True)
class ARLDMSizes:
    """Everything a `source: sizes` AR-LDM is built from, read from `model.network` (see `build_arldm_from_sizes`)."""

    width: int  # D: CLIP, BERT and UNet cross-attention width
    clip: ClipSizes
    blip: BlipSizes
    unet: UNetSizes
    vae: VAESizes = field(default_factory=VAESizes)
    n_frames: int = 5
    noise_scheduler_config: dict[str, Any] | None = None  # over Stable Diffusion's schedule
    latent_scale_factor: float | None = None  # None: the autoencoder's own

    @classmethod
    def from_network(cls, network: Mapping[str, Any], where: str = "model.network") -> "ARLDMSizes":
        return parse_sizes(cls, network, where, also=NETWORK_KEYS)

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `build_arldm_from_sizes`."""
        return dict(width=self.width, n_frames=self.n_frames, clip=dataclasses.asdict(self.clip),
                    blip=self.blip.to_kwargs(), unet=self.unet.to_kwargs(), vae=self.vae.to_kwargs(),
                    noise_scheduler_config=self.noise_scheduler_config, latent_scale_factor=self.latent_scale_factor)


# `build_arldm_from_pretrained` options a `source: pretrained` network may set besides the three folders
PRETRAINED_OPTIONS = ("blip_config", "blip_med_config", "blip_vision", "n_frames", "noise_scheduler_config",
                      "latent_scale_factor", "new_rows_init", "local_files_only")


@dataclass
class ARLDMBuilder(NetworkBuilder[ARLDMComponents, ARLDMComponents]):
    """`build(network)` -> `ARLDMComponents`: the model and its two tokenizers, both holding the dataset's
    `characters` as single tokens, captions `max_length` tokens long."""

    characters: Sequence[str]
    max_length: int

    def from_pretrained(self, network: dict[str, Any]) -> ARLDMComponents:
        chosen = ("source", "init_from_original", "original_name_tokens", "channels_last", *PRETRAINED_KEYS)
        options = {k: v for k, v in network.items() if k not in chosen}
        unknown = [k for k in options if k not in PRETRAINED_OPTIONS]
        if unknown:
            raise unknown_key_error("model.network", unknown, [*PRETRAINED_KEYS, "init_from_original",
                                                               "original_name_tokens", *PRETRAINED_OPTIONS],
                                    what="option",
                                    context="source: pretrained")
        absent = [k for k in PRETRAINED_KEYS if k not in network]
        if absent:
            raise missing_key_error("model.network", absent)
        try:
            return build_arldm_from_pretrained(
                network["stable_diffusion"],
                network["blip_checkpoint"],
                network["bert_tokenizer"],
                max_length=self.max_length,
                new_tokens=list(self.characters),
                clip_names_match_case=original_name_tokens(network, "init_from_original"),
                **options,
            )
        except MissingResourceError as err:  # the loader's list of every missing file, with the config's fix added
            raise MissingResourceError(
                f"Pretrained weights for the AR-LDM model are missing.\n{err}\n"
                "Put them under the weights directory (README.md, 'Weights') or point model.network.* at them."
            ) from err

    def from_sizes(self, network: dict[str, Any]) -> ARLDMComponents:
        sizes = ARLDMSizes.from_network(network)
        characters = list(self.characters)
        words = list(network.get("words") or [])
        return build_arldm_from_sizes(words + characters, network.get("tokenizer_dir"), max_length=self.max_length,
                                      new_tokens=characters, seed=network_seed(network),
                                      clip_names_match_case=original_name_tokens(network, "init_from_original"),
                                      **sizes.to_kwargs())

    def finish(self, parts: ARLDMComponents, network: dict[str, Any]) -> ARLDMComponents:
        init_from = network.get("init_from_original")
        if init_from:
            if not Path(init_from).is_file():
                raise MissingResourceError("Original AR-LDM checkpoint (model.network.init_from_original)", init_from)
            load_original_arldm_checkpoint(parts.model, init_from)
        return parts


def build_arldm(network: Mapping[str, Any], characters: Sequence[str], max_length: int) -> ARLDMComponents:
    return ARLDMBuilder(list(characters), int(max_length)).build(network)
