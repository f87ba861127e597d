"""BLIP in multimodal mode: the history encoder of AR-LDM.

AR-LDM feeds every history frame to BLIP as (image, caption) and keeps the *text-token* hidden states of BLIP's
text encoder after it has cross-attended to all ViT tokens (BLIP's ``BLIP_Base`` "multimodal" mode). Those
S x D states become one segment of the UNet's cross-attention context.

Built on transformers' ``BlipVisionModel`` (BLIP's ViT) and ``BlipTextModel`` (BLIP's MED BERT with a
cross-attention block in every layer). Only the Salesforce key mapping, the pre-processing and stochastic depth
are written here; see ``/work/shared/parity/arldm/README.md`` section 5a for the settings that make transformers'
modules reproduce the original numerically.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from storyexp.data.frames import center_crop_box
from storyexp.utils.loading import UnreadableFileError, check_state_dict, load_file

# BLIP normalises its input with the CLIP statistics (not ImageNet's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Where the real pre-training checkpoint lives (used in error messages only).
BLIP_LARGE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"


@dataclasses.dataclass
class BlipMultimodalConfig:
    """Sizes of the BLIP multimodal encoder. Defaults = published BLIP ViT-L/16 at 224 px + BERT-base (MED).

    ``text_hidden_size`` is the width D of the history tokens, so it must equal the UNet's cross-attention width.
    ``vocab_size`` must be ``len(blip_tokenizer)`` (bert-base-uncased + [DEC] + [ENC] + character tokens).
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    vision_layer_norm_eps: float = 1e-6  # timm/BLIP ViT uses 1e-6; transformers' default (1e-5) changes outputs
    vision_drop_path_rate: float = 0.1  # BLIP builds ViT-L with stochastic depth 0.1 (only active in train mode)
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_positions: int = 512
    text_layer_norm_eps: float = 1e-12
    text_hidden_act: str = "gelu"
    text_dropout: float = 0.1
    text_attention_dropout: float = 0.1
    vocab_size: int = 30524
    pad_token_id: int = 0
    enc_token_id: int = 30523

    @classmethod
    def from_med_config(
        cls, med_config: Mapping | str | Path, vision: Mapping | None = None, **overrides
    ) -> "BlipMultimodalConfig":
        """Build from BLIP's ``med_config.json`` (a BERT config) plus ViT sizes.

        ``vision`` uses BLIP's ``create_vit`` vocabulary (``img_size``, ``patch_size``, ``embed_dim``, ``depth``,
        ``num_heads``, ``mlp_ratio``, ``layer_norm_eps``, ``drop_path_rate``); missing entries keep ViT-L values.
        ``encoder_width`` of the MED config is ignored: BLIP overwrites it with the ViT width, and so do we.
        """
        import json

        if not isinstance(med_config, Mapping):
            med_config = json.loads(Path(med_config).read_text())
        vision = dict(vision or {})
        fields = dict(
            image_size=vision.get("img_size", cls.image_size),
            patch_size=vision.get("patch_size", cls.patch_size),
            vision_width=vision.get("embed_dim", cls.vision_width),
            vision_depth=vision.get("depth", cls.vision_depth),
            vision_heads=vision.get("num_heads", cls.vision_heads),
            vision_mlp_ratio=vision.get("mlp_ratio", cls.vision_mlp_ratio),
            vision_layer_norm_eps=vision.get("layer_norm_eps", cls.vision_layer_norm_eps),
            vision_drop_path_rate=vision.get("drop_path_rate", cls.vision_drop_path_rate),
            text_hidden_size=med_config["hidden_size"],
            text_layers=med_config["num_hidden_layers"],
            text_heads=med_config["num_attention_heads"],
            text_intermediate_size=med_config["intermediate_size"],
            text_max_positions=med_config["max_position_embeddings"],
            text_layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
            text_hidden_act=med_config.get("hidden_act", "gelu"),
            text_dropout=med_config.get("hidden_dropout_prob", 0.1),
            text_attention_dropout=med_config.get("attention_probs_dropout_prob", 0.1),
            vocab_size=med_config["vocab_size"],
            pad_token_id=med_config.get("pad_token_id", 0),
        )
        fields.update(overrides)
        return cls(**fields)


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (BLIP's ViT trains with it; transformers' BLIP has none).

    torchvision.ops.StochasticDepth(mode="row") computes the same thing; it is hand-written here (3 lines) so that
    this module does not pull torchvision's compiled operators in.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _add_drop_path(vision: BlipVisionModel, rate: float) -> None:
    """Attach timm-style stochastic depth (linearly increasing over depth) to every ViT block.

    Implemented with forward hooks on the two residual branches (``self_attn`` and ``mlp``) so that transformers'
    layer code runs unchanged and the state dict gets no new keys.
    """
    layers = vision.encoder.layers
    for i, layer in enumerate(layers):
        p = rate * i / max(len(layers) - 1, 1)
        layer.drop_path = DropPath(p)
        layer.self_attn.register_forward_hook(
            lambda m, args, out, dp=layer.drop_path: (dp(out[0]),) + tuple(out[1:])
        )
        layer.mlp.register_forward_hook(lambda m, args, out, dp=layer.drop_path: dp(out))


class BlipMultimodalEncoder(nn.Module):
    """BLIP ViT + MED BERT in multimodal mode. ``forward`` returns the text-token states ``[N, S, D]``.

    Inputs: ``pixel_values`` [N, 3, image_size, image_size] (CLIP-normalised, see :func:`blip_preprocess`),
    ``input_ids`` [N, S] BERT ids with [CLS] first, ``attention_mask`` [N, S] (1 = real token) or None (all
    visible, which is how AR-LDM encodes its null caption).
    """

    def __init__(self, config: BlipMultimodalConfig):
        super().__init__()
        self.config = config
        vision_config = BlipVisionConfig(
            hidden_size=config.vision_width,
            intermediate_size=int(config.vision_width * config.vision_mlp_ratio),
            num_hidden_layers=config.vision_depth,
            num_attention_heads=config.vision_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_act="gelu",  # exact GELU, as timm's ViT
            layer_norm_eps=config.vision_layer_norm_eps,
            # transformers' BLIP default (1e-10) leaves a randomly initialised ViT almost constant; BLIP's timm
            # ViT initialises with std 0.02. Only matters for models built from sizes (weights get loaded otherwise).
            initializer_range=0.02,
        )
        text_config = BlipTextConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.text_hidden_size,
            encoder_hidden_size=config.vision_width,
            intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.text_max_positions,
            hidden_act=config.text_hidden_act,
            layer_norm_eps=config.text_layer_norm_eps,
            hidden_dropout_prob=config.text_dropout,
            attention_probs_dropout_prob=config.text_attention_dropout,
            pad_token_id=config.pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
            # is_decoder=True only makes transformers *create* the cross-attention blocks; forward() runs with
            # is_decoder=False, i.e. bidirectional self-attention, as BLIP's multimodal mode does.
            is_decoder=True,
            use_cache=False,
        )
        self.vision = BlipVisionModel(vision_config)
        # BLIP's text encoder has no pooling layer.
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        if config.vision_drop_path_rate > 0:
            _add_drop_path(self.vision, config.vision_drop_path_rate)

    @property
    def hidden_size(self) -> int:
        return self.config.text_hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def resize_token_embeddings(self, new_num_tokens: int, generator: torch.Generator | None = None) -> None:
        """Resize the word table keeping the first min(old, new) rows; new rows ~ N(0, 0.02) like BERT's init.
        The new table has no padding row, as the original's resize gave (see `release_padding_row`)."""
        old = self.text.embeddings.word_embeddings
        if old.num_embeddings == new_num_tokens:
            return
        weight = _resized_rows(old.weight.data, new_num_tokens, std=0.02, generator=generator)
        new = nn.Embedding(new_num_tokens, weight.shape[1]).to(weight)
        new.weight.data.copy_(weight)
        self.text.embeddings.word_embeddings = new
        self.text.config.vocab_size = new_num_tokens
        self.config.vocab_size = new_num_tokens

    def release_padding_row(self) -> None:
        """Let the word table's [PAD] row train, as it did in the original whenever character tokens were added.

        AR-LDM grew BLIP's table with transformers 4.24's `resize_token_embeddings`, which builds the new table as a
        plain `nn.Embedding` without `padding_idx`: the [PAD] row then gets gradients like any other row (PororoSV,
        FlintstonesSV; SSID adds no token, so its table kept `padding_idx` and a frozen [PAD] row). That row matters:
        the unconditional history is BLIP over "" padded to S with no attention mask, so it reads S-2 [PAD] rows.
        The module is built at the grown size directly, so this is called after the grown weights are in place."""
        self.text.embeddings.word_embeddings.padding_idx = None

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # BLIP marks the multimodal mode by writing [ENC] over [CLS]. The original did it in place on the caller's
        # ids (and on a model buffer); we build a new tensor instead.
        enc = torch.full_like(input_ids[:, :1], self.config.enc_token_id)
        ids = torch.cat([enc, input_ids[:, 1:]], dim=1)
        out = self.text(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,  # every image token is visible (BLIP passes all ones)
            is_decoder=False,
        )
        return out.last_hidden_state


def _resized_rows(weight: torch.Tensor, n: int, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """First min(old, n) rows of ``weight``; any new row drawn from N(0, std^2)."""
    old = weight.shape[0]
    out = torch.empty((n, weight.shape[1]), dtype=weight.dtype)
    keep = min(old, n)
    out[:keep] = weight[:keep].detach().cpu()
    if n > old:
        out[old:] = torch.randn((n - old, weight.shape[1]), generator=generator, dtype=weight.dtype) * std
    return out.to(weight.device)


# --------------------------------------------------------------------------------------------------------------
# Salesforce checkpoint (model_large.pth) -> BlipMultimodalEncoder
# --------------------------------------------------------------------------------------------------------------

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def salesforce_to_module_key(key: str) -> str | None:
    """Map one Salesforce BLIP key (``visual_encoder.*`` / ``text_encoder.*``) to ours; None = not ours."""
    if key.startswith("visual_encoder."):
        rest = key[len("visual_encoder.") :]
        for pattern, repl in _VISION_RENAMES:
            new, n = re.subn(pattern, repl, rest)
            if n:
                return "vision." + new
        return "vision." + rest  # unknown name: left as is so that the strict check reports it
    if key.startswith("text_encoder."):
        rest = key[len("text_encoder.") :]
        if rest == "embeddings.position_ids":  # a constant arange; transformers keeps it non-persistent
            return None
        return "text." + rest
    return None  # vision_proj, text_proj, itm_head, temp, queues, momentum encoders, text_decoder, ...


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a ViT position table [1, extra + g*g, W] to another square patch grid, keeping the cls row.

    Same recipe as BLIP's checkpoint loader: bicubic interpolation over the 2-D patch grid (align_corners=False).
    """
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    old_size = int(round(grid.shape[1] ** 0.5))
    new_size = int(round(num_patches**0.5))
    if old_size * old_size != grid.shape[1] or new_size * new_size != num_patches:
        raise ValueError(f"position table is not a square patch grid: {grid.shape[1]} -> {num_patches} patches")
    if old_size == new_size:
        return pos_embed
    width = grid.shape[-1]
    grid = grid.reshape(1, old_size, old_size, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size * new_size, width).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def map_salesforce_blip_state_dict(
    module: BlipMultimodalEncoder,
    state_dict: Mapping[str, torch.Tensor],
    allow_resize: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Translate a Salesforce BLIP state dict to ``module``'s names, resizing where BLIP's own loader does.

    Known resizes (only with ``allow_resize``): the word table to the module's vocabulary (tokenizer length; new
    rows N(0, 0.02)) and ``pos_embed`` to the module's patch grid. Anything else that does not fit raises.
    """
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = salesforce_to_module_key(key)
        if new is not None:
            mapped[new] = value
    if allow_resize:
        pos_key = "vision.embeddings.position_embedding"
        if pos_key in mapped and pos_key in target and mapped[pos_key].shape != target[pos_key].shape:
            mapped[pos_key] = interpolate_pos_embed(mapped[pos_key], target[pos_key].shape[1] - 1)
        word_key = "text.embeddings.word_embeddings.weight"
        if word_key in mapped and word_key in target and mapped[word_key].shape != target[word_key].shape:
            src = mapped[word_key]
            if src.shape[1] == target[word_key].shape[1]:
                mapped[word_key] = _resized_rows(src, target[word_key].shape[0], std=0.02, generator=generator)
    return mapped


def load_salesforce_blip_state_dict(
    module: BlipMultimodalEncoder,
    state_dict: Mapping[str, torch.Tensor],
    allow_resize: bool = True,
    generator: torch.Generator | None = None,
    what: str = "BLIP checkpoint",
) -> None:
    """Fill ``module`` from a Salesforce BLIP state dict (``visual_encoder.*``, ``text_encoder.*``).

    Extra entries of the real ``model_large.pth`` (projections, ITM head, queues, momentum encoders, decoder...)
    are ignored; every parameter of ``module`` must be present (BLIP's loader is non-strict; we are not).
    """
    mapped = map_salesforce_blip_state_dict(module, state_dict, allow_resize=allow_resize, generator=generator)
    check_state_dict(module.state_dict(), mapped, what,
                     hint="use BLIP's model_large.pth (ViT-L) or set model.network.blip_* to the checkpoint's sizes")
    module.load_state_dict(mapped, strict=True)


def load_blip_checkpoint(
    path: str | Path, what: str = "BLIP checkpoint (model.network.blip_checkpoint)"
) -> dict[str, torch.Tensor]:
    """Read a Salesforce BLIP checkpoint (``model_large.pth``: a dict whose ``'model'`` is the state dict)."""
    ckpt = load_file(path, what, how_to_get=f"AR-LDM uses BLIP ViT-L pre-training weights; download {BLIP_LARGE_URL} "
                                            "and pass its path.")
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        return dict(ckpt["model"])
    if isinstance(ckpt, Mapping) and any(str(k).startswith("visual_encoder.") for k in ckpt):
        return dict(ckpt)
    raise UnreadableFileError(
        f"{what} {path} is not a BLIP checkpoint (expected a dict with a 'model' state dict); download "
        f"{BLIP_LARGE_URL}."
    )


# --------------------------------------------------------------------------------------------------------------
# Pre-processing of images for BLIP
# --------------------------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# How a frame reaches BLIP's square input (config `model.blip_fit`): `squash` is the original's Resize([224, 224])
# for PororoSV / FlintstonesSV; `center_crop` its VIST/SSID reader's Resize(224) + CenterCrop(224), shorter side
# to 224 then the central square (arldm.md §3.3). Square frames (every generated frame) are the same under both.
BLIP_FITS = ("squash", "center_crop")


def _check_fit(fit: str) -> None:
    if fit not in BLIP_FITS:
        raise ValueError(f"unknown BLIP fit {fit!r}: expected one of {BLIP_FITS}")


def blip_resize(images_uint8: torch.Tensor, image_size: int, backend: str = "pil", fit: str = "squash") -> torch.Tensor:
    """Resize uint8 images [N, H, W, 3] to [N, image_size, image_size, 3] uint8 with bilinear filtering.

    ``backend="pil"`` (default) is the original's operation, Pillow's ``resize(..., BILINEAR)`` on each uint8
    image, so feedback frames match the original bit for bit. ``backend="torch"`` is the batched tensor path
    (antialiased bilinear on the uint8 tensor, on CPU): it equals Pillow for some scale factors (e.g. 512 -> 224
    and the parity set's 32 -> 224) but is off by up to 2 levels for others (e.g. 128 -> 224), because the two
    libraries quantise the filter weights differently. ``fit``: see ``BLIP_FITS``.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    _check_fit(fit)
    h, w = (int(d) for d in images_uint8.shape[-3:-1])
    if (h, w) == (image_size, image_size):
        return images_uint8.detach().cpu()
    if backend not in ("pil", "torch"):
        raise ValueError(f"unknown resize backend {backend!r}: expected 'pil' or 'torch'")
    size, box = (image_size, image_size), None
    if fit == "center_crop":
        new_h, new_w, top, left = center_crop_box(h, w, image_size)
        size, box = (new_h, new_w), (top, left)
    if backend == "pil":
        arrays = images_uint8.detach().cpu().numpy()
        out = torch.from_numpy(np.stack([_pil_resize(a, size) for a in arrays]))
    else:
        x = images_uint8.detach().to("cpu").permute(0, 3, 1, 2).contiguous()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out = x.permute(0, 2, 3, 1).contiguous()
    if box is not None:
        top, left = box
        out = out[:, top : top + image_size, left : left + image_size].contiguous()
    return out


def blip_preprocess(
    images_uint8: torch.Tensor, image_size: int, device=None, dtype=torch.float32, backend: str = "pil",
    fit: str = "squash",
) -> torch.Tensor:
    """uint8 images [..., H, W, 3] -> BLIP input [..., 3, image_size, image_size] on ``device``.

    Bilinear resize of the uint8 image (:func:`blip_resize`, ``fit``: squash or centre crop), /255, CLIP
    mean/std — the original's pre-processing of generated frames (and of dataset frames, whose resize is the same
    Pillow call).
    """
    lead = images_uint8.shape[:-3]
    x = blip_resize(images_uint8.reshape(-1, *images_uint8.shape[-3:]), image_size, backend=backend, fit=fit)
    x = x.permute(0, 3, 1, 2).to(device=device or images_uint8.device, dtype=torch.float32).div(255.0)
    x = _normalize(x).to(dtype)
    return x.reshape(*lead, 3, image_size, image_size)


def _pil_resize(image_uint8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(image_uint8).resize((size[1], size[0]), Image.BILINEAR))


def blip_resize_pil(image_uint8: np.ndarray, image_size: int) -> np.ndarray:
    """Pillow bilinear resize of one uint8 HWC image (what the original does)."""
    return _pil_resize(image_uint8, (image_size, image_size))


def blip_preprocess_pil(images_uint8: np.ndarray, image_size: int, fit: str = "squash") -> torch.Tensor:
    """NumPy convenience twin of :func:`blip_preprocess` for [N, H, W, 3] uint8 arrays (Pillow resize)."""
    return blip_preprocess(torch.from_numpy(np.ascontiguousarray(images_uint8)), image_size, backend="pil", fit=fit)


def blip_null_image(image_size: int, dtype=torch.float32) -> torch.Tensor:
    """AR-LDM's null image for BLIP: a black image after pre-processing, [1, 3, image_size, image_size].

    Computed on the CPU whatever the default device (Pillow needs real data), so a model built under
    ``torch.device("meta")`` (parameter counts, sharded initialisation) still gets its real null image."""
    black = torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8, device="cpu")
    return blip_preprocess(black, image_size, device="cpu", dtype=dtype)
