"""Builders and checkpoint loaders for :class:`ARLDM`.

* :func:`build_arldm_from_pretrained` — real runs: Stable Diffusion (diffusers layout: ``unet``, ``vae``,
  ``text_encoder``, ``tokenizer``), BLIP ``model_large.pth`` and the bert-base-uncased tokenizer, with AR-LDM's
  resizes (character tokens in both vocabularies, CLIP positions extended to S).
* :func:`build_arldm_from_sizes` — random initialisation from small sizes, tokenizers written from a word list
  (tiny test configurations and the CPU demo; nothing is downloaded).
* :func:`load_original_arldm_checkpoint` — the original AR-LDM Lightning ``.ckpt`` into a built model, strictly.

Sizes (D, S, vocabularies, frame count) always come from the arguments, configs or checkpoints. The config-driven
builder (`model.network`, `source: pretrained | sizes`, the typed `ARLDMSizes`) is `storyexp.models.arldm.build`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from storyexp.errors import MissingResourceError
from storyexp.utils.loading import UnreadableFileError, check_state_dict, load_file

from .autoencoder import PixelAutoencoder
from .blip import (
    BLIP_LARGE_URL,
    BlipMultimodalConfig,
    BlipMultimodalEncoder,
    load_blip_checkpoint,
    load_salesforce_blip_state_dict,
    map_salesforce_blip_state_dict,
)
from .clip import (
    build_clip_text_encoder,
    clip_state_dict_from_original,
    extend_position_embeddings,
    load_clip_text_encoder,
    resize_token_embeddings,
)
from .model import ARLDM, SD_NOISE_SCHEDULER
from .tokenizers import (
    add_character_tokens,
    load_blip_tokenizer,
    load_clip_tokenizer,
    tokenize,
    write_bert_tokenizer,
    write_clip_tokenizer,
)

SD_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # formerly runwayml/stable-diffusion-v1-5
BERT_HUB_ID = "bert-base-uncased"


@dataclasses.dataclass
class ARLDMComponents:
    """A built model together with the two tokenizers whose lengths sized its embedding tables."""

    model: ARLDM
    clip_tokenizer: object
    blip_tokenizer: object


# --------------------------------------------------------------------------------------------------------------
# File resolution
# --------------------------------------------------------------------------------------------------------------

# Each entry: (what, alternatives: any one of these relative paths is enough).
_SD_FILES = [
    ("CLIP tokenizer vocabulary", ["tokenizer/vocab.json"]),
    ("CLIP tokenizer merges", ["tokenizer/merges.txt"]),
    ("CLIP text encoder config", ["text_encoder/config.json"]),
    ("CLIP text encoder weights", ["text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"]),
    ("VAE config", ["vae/config.json"]),
    ("VAE weights", ["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"]),
    ("UNet config", ["unet/config.json"]),
    ("UNet weights", ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"]),
]
_BERT_FILES = [("BERT tokenizer vocabulary", ["vocab.txt"])]
# fetched too when present, never required
_OPTIONAL_PATTERNS = ["tokenizer/*.json", "tokenizer_config.json", "special_tokens_map.json"]


def _hub_offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _snapshot(repo_id: str, files: list[tuple[str, list[str]]], local_files_only: bool | None) -> Path | None:
    """Local snapshot of ``repo_id`` from the Hugging Face cache (downloading only when online is allowed)."""
    from huggingface_hub import snapshot_download

    # safetensors first; the .bin alternatives only if a repository has no safetensors
    first = [alts[0] for _, alts in files] + _OPTIONAL_PATTERNS
    every = [p for _, alts in files for p in alts] + _OPTIONAL_PATTERNS
    attempts = [True] if _hub_offline(local_files_only) else [True, False]
    for local_only in attempts:
        for patterns in (first, every):
            try:
                path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            except Exception:  # not cached / offline / unknown repo: reported by the caller's single error
                continue
            if not _missing(path, files):
                return path
    return None


def _missing(root: Path, files: list[tuple[str, list[str]]]) -> list[str]:
    return [
        f"{what}: {' or '.join(str(root / a) for a in alts)}"
        for what, alts in files
        if not any((root / a).is_file() for a in alts)
    ]


def _resolve(
    name: str | os.PathLike, files, source_hint: str, local_files_only: bool | None, problems: list[str]
) -> Path | None:
    """A local folder as given, or a hub id resolved through the HF cache; problems are appended, not raised."""
    path = Path(name)
    if path.is_dir():
        missing = _missing(path, files)
        if missing:
            problems.extend(missing)
            problems.append(f"  (folder {path} is incomplete; get the files from {source_hint})")
            return None
        return path
    # hub ids look like "owner/name"; anything else that is not a folder is a missing local path
    if path.is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:
        problems.append(f"folder {path} does not exist (expected the files of {source_hint})")
        return None
    snap = _snapshot(str(name), files, local_files_only)
    if snap is None:
        if _hub_offline(local_files_only):
            mode = "offline: only the local Hugging Face cache was searched"
        else:
            mode = "not cached and the download failed"
        problems.append(
            f"{name!r} is neither a local folder nor a usable Hugging Face repository ({mode}); needed: "
            + "; ".join(f"{w} ({alts[0]})" for w, alts in files)
        )
        problems.append(
            f"  (get it with `huggingface-cli download {name}` on a machine with internet, or pass a local "
            f"folder; {source_hint})"
        )
    return snap


def _raise_if_problems(problems: list[str]) -> None:
    """One MissingResourceError listing every file a build needs but cannot find."""
    if problems:
        raise MissingResourceError("cannot build AR-LDM, files are missing:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Shared assembly
# --------------------------------------------------------------------------------------------------------------


def _null_tokens(clip_tokenizer, blip_tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    clip_ids, _ = tokenize(clip_tokenizer, [""], max_length)
    blip_ids, _ = tokenize(blip_tokenizer, [""], max_length)
    return clip_ids, blip_ids


def _noise_scheduler(config: Mapping | None) -> DDPMScheduler:
    # keys not given keep Stable Diffusion's schedule (not DDPMScheduler's own linear default)
    return DDPMScheduler.from_config({**SD_NOISE_SCHEDULER, **dict(config or {})})


def _assemble(unet, vae, text_encoder, mm_encoder, clip_tokenizer, blip_tokenizer, max_length: int, n_frames: int,
              noise_scheduler_config: Mapping | None, latent_scale_factor: float | None) -> ARLDMComponents:
    """The networks + AR-LDM's null-caption buffers and training schedule, as one model with its tokenizers."""
    clip_null, blip_null = _null_tokens(clip_tokenizer, blip_tokenizer, max_length)
    model = ARLDM(
        unet,
        vae,
        text_encoder,
        mm_encoder,
        clip_null,
        blip_null,
        n_frames=n_frames,
        noise_scheduler=_noise_scheduler(noise_scheduler_config),
        latent_scale_factor=latent_scale_factor,
    )
    return ARLDMComponents(model, clip_tokenizer, blip_tokenizer)


def _blip_config(blip_config, med_config, vision) -> BlipMultimodalConfig:
    if isinstance(blip_config, BlipMultimodalConfig):
        return dataclasses.replace(blip_config)
    if blip_config is not None:
        return BlipMultimodalConfig(**dict(blip_config))
    if med_config is not None:
        return BlipMultimodalConfig.from_med_config(med_config, vision)
    if vision is not None:
        return BlipMultimodalConfig.from_med_config(_BERT_BASE_MED, vision)
    return BlipMultimodalConfig()


# BLIP's med_config.json (BERT-base with cross-attention), used when no med config is given.
_BERT_BASE_MED = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, vocab_size=30524, pad_token_id=0,
)


# --------------------------------------------------------------------------------------------------------------
# (a) from pretrained weights
# --------------------------------------------------------------------------------------------------------------


def build_arldm_from_pretrained(
    sd_dir_or_hub_id: str | os.PathLike,
    blip_checkpoint: str | os.PathLike,
    bert_tokenizer: str | os.PathLike = BERT_HUB_ID,
    max_length: int = 77,
    new_tokens: Sequence[str] = (),
    *,
    blip_config: BlipMultimodalConfig | Mapping | None = None,
    blip_med_config: str | os.PathLike | Mapping | None = None,
    blip_vision: Mapping | None = None,
    n_frames: int = 5,
    noise_scheduler_config: Mapping | None = None,
    latent_scale_factor: float | None = None,
    new_rows_init: str = "original",
    generator: torch.Generator | None = None,
    local_files_only: bool | None = None,
    clip_names_match_case: bool = False,
) -> ARLDMComponents:
    """AR-LDM from Stable Diffusion + BLIP weights, as the original constructor builds it.

    Args:
        sd_dir_or_hub_id: local diffusers-layout folder, or a hub id looked up in the HF cache (downloaded only
            when online and ``local_files_only`` is not True).
        blip_checkpoint: path of BLIP's ``model_large.pth`` (or a file in its format).
        bert_tokenizer: bert-base-uncased folder or hub id.
        max_length: S, the caption length of both tokenizers (CLIP positions are extended to it).
        new_tokens: character names added to both tokenizers (only the missing ones).
        blip_config / blip_med_config + blip_vision: BLIP sizes (default: published ViT-L + BERT-base).
        new_rows_init: "original" (N(0,1) CLIP rows, N(0,0.02) BERT rows) or "mean" (CLIP rows = mean row).
        clip_names_match_case: CLIP matches a character token only where the caption writes the name in lower case,
            as the original's transformers 4.24 slow tokenizer did (`add_character_tokens`); False: any case.

    Raises :class:`storyexp.errors.MissingResourceError` once, listing every missing file with where it was
    expected.
    """
    problems: list[str] = []
    sd_hint, bert_hint = f"the Hugging Face repository {SD_HUB_ID}", f"the Hugging Face repository {BERT_HUB_ID}"
    sd_dir = _resolve(sd_dir_or_hub_id, _SD_FILES, sd_hint, local_files_only, problems)
    bert_dir = _resolve(bert_tokenizer, _BERT_FILES, bert_hint, local_files_only, problems)
    blip_path = Path(blip_checkpoint)
    if not blip_path.is_file():
        problems.append(f"BLIP checkpoint: {blip_path} (download {BLIP_LARGE_URL})")
    if isinstance(blip_med_config, (str, os.PathLike)) and not Path(blip_med_config).is_file():
        problems.append(f"BLIP med_config.json: {blip_med_config}")
    _raise_if_problems(problems)

    clip_tokenizer = load_clip_tokenizer(sd_dir / "tokenizer")
    blip_tokenizer = load_blip_tokenizer(bert_dir)
    add_character_tokens(clip_tokenizer, new_tokens, match_case=clip_names_match_case)
    blip_grew = bool(add_character_tokens(blip_tokenizer, new_tokens))

    text_encoder = load_clip_text_encoder(sd_dir / "text_encoder")
    resize_token_embeddings(text_encoder, len(clip_tokenizer), init=new_rows_init, generator=generator)
    extend_position_embeddings(text_encoder, max_length, init=new_rows_init, generator=generator)

    config = _blip_config(blip_config, blip_med_config, blip_vision)
    config.vocab_size = len(blip_tokenizer)
    config.enc_token_id = blip_tokenizer.enc_token_id
    mm_encoder = BlipMultimodalEncoder(config)
    load_salesforce_blip_state_dict(mm_encoder, load_blip_checkpoint(blip_path), generator=generator,
                                    what=f"BLIP checkpoint {blip_path}")
    if blip_grew:  # the original's resize left the grown table without a padding row
        mm_encoder.release_padding_row()

    vae = AutoencoderKL.from_pretrained(str(sd_dir / "vae"))
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    return _assemble(unet, vae, text_encoder, mm_encoder, clip_tokenizer, blip_tokenizer, max_length, n_frames,
                     noise_scheduler_config, latent_scale_factor)


# --------------------------------------------------------------------------------------------------------------
# (b) from sizes (random initialisation, no download)
# --------------------------------------------------------------------------------------------------------------

_TINY_CLIP = dict(num_layers=2, num_heads=4, intermediate_size=64, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TINY_BLIP = dict(
    image_size=32, patch_size=8, vision_depth=2, vision_heads=2, vision_mlp_ratio=2.0, vision_drop_path_rate=0.0,
    text_layers=2, text_heads=4, text_intermediate_size=64, text_dropout=0.0, text_attention_dropout=0.0,
)
_TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    sample_size=16,
)
_TINY_VAE = dict(kind="pixel", factor=2)


def _build_vae(spec: Mapping) -> torch.nn.Module:
    spec = dict(spec)
    kind = spec.pop("kind", "pixel")
    if kind == "pixel":
        return PixelAutoencoder(**spec)
    if kind == "kl":
        n = len(spec.get("block_out_channels", (64,)))
        spec.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
        spec.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
        return AutoencoderKL(**spec)
    raise ValueError(f"unknown vae kind {kind!r}: expected 'pixel' or 'kl'")


def build_arldm_from_sizes(
    words: Iterable[str],
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    max_length: int = 24,
    new_tokens: Sequence[str] = (),
    width: int = 32,
    n_frames: int = 5,
    clip: Mapping | None = None,
    blip: Mapping | None = None,
    unet: Mapping | None = None,
    vae: Mapping | None = None,
    noise_scheduler_config: Mapping | None = None,
    latent_scale_factor: float | None = None,
    seed: int = 0,
    clip_names_match_case: bool = False,
) -> ARLDMComponents:
    """A randomly initialised AR-LDM of small sizes, with tokenizers written from ``words``.

    Args:
        words: vocabulary for both tokenizers (captions of the demo / fixture data).
        tokenizer_dir: where the ``clip/`` and ``bert/`` tokenizer folders are written (a scratch dir, removed after loading, if None).
        width: D (CLIP, BERT and UNet cross-attention width).
        clip / blip / unet: size overrides merged over tiny defaults. ``clip``: num_layers, num_heads,
            intermediate_size, hidden_act, layer_norm_eps. ``blip``: fields of :class:`BlipMultimodalConfig`.
            ``unet``: ``UNet2DConditionModel`` kwargs.
        vae: the whole autoencoder spec: ``{"kind": "pixel", "factor": f, "scaling_factor": s}`` (default: the
            lossless pixel autoencoder with f = 2) or ``{"kind": "kl", **AutoencoderKL kwargs}``.
        seed: initialisation seed (the global RNG state is left untouched).
        clip_names_match_case: as for `build_arldm_from_pretrained`.
    """
    words = list(words)
    with tempfile.TemporaryDirectory(prefix="arldm_tokenizers_") as scratch:
        # the tokenizers hold their vocabularies in memory once loaded, so a scratch folder is enough
        folder = Path(tokenizer_dir or scratch)
        clip_tokenizer = load_clip_tokenizer(write_clip_tokenizer(words, folder / "clip", max_length))
        blip_tokenizer = load_blip_tokenizer(write_bert_tokenizer(words, folder / "bert"))
    add_character_tokens(clip_tokenizer, new_tokens, match_case=clip_names_match_case)
    blip_grew = bool(add_character_tokens(blip_tokenizer, new_tokens))

    clip_sizes = {**_TINY_CLIP, **dict(clip or {})}
    blip_sizes = {**_TINY_BLIP, "vision_width": width, **dict(blip or {})}
    unet_sizes = {**_TINY_UNET, **dict(unet or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae_module = _build_vae(dict(vae) if vae else _TINY_VAE)
        latent_channels = vae_module.config.latent_channels
        text_encoder = build_clip_text_encoder(
            vocab_size=len(clip_tokenizer),
            hidden_size=width,
            max_positions=max_length,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
            **clip_sizes,
        )
        blip_config = BlipMultimodalConfig(
            **{
                **blip_sizes,
                "text_hidden_size": width,
                "text_max_positions": max(blip_sizes.get("text_max_positions", 0), max_length),
                "vocab_size": len(blip_tokenizer),
                "enc_token_id": blip_tokenizer.enc_token_id,
                "pad_token_id": blip_tokenizer.pad_token_id,
            }
        )
        mm_encoder = BlipMultimodalEncoder(blip_config)
        if blip_grew:  # as the original's resize (see `build_arldm_from_pretrained`)
            mm_encoder.release_padding_row()
        unet_module = UNet2DConditionModel(
            in_channels=latent_channels, out_channels=latent_channels, cross_attention_dim=width, **unet_sizes
        )
        components = _assemble(unet_module, vae_module, text_encoder, mm_encoder, clip_tokenizer, blip_tokenizer,
                               max_length, n_frames, noise_scheduler_config, latent_scale_factor)
    return components


# --------------------------------------------------------------------------------------------------------------
# (c) the original AR-LDM Lightning checkpoint
# --------------------------------------------------------------------------------------------------------------

_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_key(key: str) -> str:
    """diffusers <= 0.13 VAE attention names -> current ones (query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0)."""
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_VAE_ATTENTION:
        parts[-2] = _OLD_VAE_ATTENTION[parts[-2]]
    return ".".join(parts)


def map_original_arldm_state_dict(model: ARLDM, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate an original AR-LDM state dict to ``model``'s names (no resizes: the checkpoint must fit)."""
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    blip_part: dict[str, torch.Tensor] = {}
    clip_part: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vae."):
            new = "vae." + _vae_key(key[len("vae.") :])
            if new in target and value.dim() == 4 and target[new].dim() == 2:
                value = value[:, :, 0, 0]  # 1x1-conv attention weights of some old versions
            mapped[new] = value
        elif key.startswith("text_encoder."):
            clip_part[key[len("text_encoder.") :]] = value
        elif key.startswith("mm_encoder."):
            blip_part[key[len("mm_encoder.") :]] = value
        else:  # unet.*, modal/time embeddings, null-token buffers and anything unexpected
            mapped[key] = value
    mapped.update({"text_encoder." + k: v for k, v in clip_state_dict_from_original(clip_part).items()})
    blip_unknown = [k for k in blip_part if not k.startswith(("visual_encoder.", "text_encoder."))]
    mapped.update({"mm_encoder." + k: v for k, v in blip_part.items() if k in blip_unknown})
    blip_mapped = map_salesforce_blip_state_dict(model.mm_encoder, blip_part, allow_resize=False)
    mapped.update({"mm_encoder." + k: v for k, v in blip_mapped.items()})
    return mapped


def load_original_arldm_checkpoint(model: ARLDM, path: str | os.PathLike) -> dict:
    """Load the original AR-LDM Lightning checkpoint (``state_dict`` in its naming) into ``model``, strictly.

    Any missing or unexpected key, or shape mismatch, raises one ``CheckpointMismatchError`` (one line) counting them
    and naming the first ones. Returns the other top-level entries of the checkpoint (epoch, global_step, ...).
    """
    path = Path(path)
    what = "AR-LDM checkpoint (model.network.init_from_original)"
    ckpt = load_file(path, what, how_to_get="Pass a Lightning .ckpt written by the original AR-LDM code.")
    state_dict = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise UnreadableFileError(f"{what} {path} is not an AR-LDM checkpoint (expected a dict with 'state_dict').")
    mapped = map_original_arldm_state_dict(model, state_dict)
    check_state_dict(model.state_dict(), mapped, f"{what} {path}",
                     hint="build the model with the sizes, characters and caption length the checkpoint was trained "
                          "with")
    model.load_state_dict(mapped, strict=True)
    return {k: v for k, v in ckpt.items() if k != "state_dict"} if "state_dict" in ckpt else {}
