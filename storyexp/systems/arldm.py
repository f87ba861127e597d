"""AR-LDM as a LightningModule: batch preparation, training/validation loss, story sampling, optimizers.

The networks (UNet, VAE, CLIP, BLIP, context and mask assembly, the autoregressive sampler) live in
`storyexp.models.arldm` and know nothing of Lightning; this file turns the data module's model-agnostic
batches (uint8 frames + caption strings) into their tensors and owns the training recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storyexp.errors import ConfigurationError
from storyexp.models.arldm.blip import BLIP_FITS, blip_preprocess
from storyexp.models.arldm.build import build_arldm
from storyexp.systems.base import StorySystem, has_frozen, per_row
from storyexp.systems.frozen_inputs import module_sha256, use_precomputed
from storyexp.systems.samplers import make_scheduler
from storyexp.utils.images import minus_one_one, resize_uint8

log = logging.getLogger(__name__)

TOKENIZER_PROBE = ("A quick brown fox, 3 dogs & 12 cats: they're \"here\" -- isn't it? Café naïve ÉTÉ 🙂 "
                   "[CLS] <|endoftext|> a-b_c/d")  # `tokenizer_sha256`'s fixed text (with the character names added)


def caption_digest(caption: str) -> np.ndarray:
    """sha256 of a caption's utf-8 text as uint8 [32] (stored beside its cached CLIP / BLIP states)."""
    return np.frombuffer(hashlib.sha256(caption.encode("utf-8")).digest(), dtype=np.uint8).copy()


def tokenizer_sha256(tokenizer, max_length: int, characters: list[str]) -> str:
    """sha256 of what a tokenizer does to captions: its class, its whole serialised state when it has a
    ``tokenizers`` backend (vocabulary, merges, normaliser, pre-tokeniser, post-processor and every added token with
    its matching flags: lstrip, rstrip, single_word, normalized, special; not the padding / truncation settings of
    the last call), else its vocabulary; its added tokens
    with their flags; and the ids and mask it gives a fixed probe text padded / truncated to `max_length` as the
    system calls it, the probe holding each character name as written, capitalised, upper-cased and inside a word
    (so a change of the matching rule in the Python layer shows too)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its padding / truncation sections are call state (transformers sets them per call)
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = {int(i): [str(t), *(bool(getattr(t, k, False)) for k in ("lstrip", "rstrip", "single_word",
                                                                      "normalized", "special"))]
             for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    h.update(json.dumps(added, sort_keys=True).encode())
    names = [str(c) for c in characters]
    probes = [TOKENIZER_PROBE, " ".join(names), " ".join(n.capitalize() for n in names),
              " ".join(n.upper() for n in names), " ".join(f"x{n}y {n}'s {n}." for n in names),
              " ".join([TOKENIZER_PROBE] * 8)]
    enc = tokenizer(probes, padding="max_length", max_length=int(max_length), truncation=True)
    h.update(json.dumps([enc["input_ids"], enc["attention_mask"]]).encode())
    return h.hexdigest()


def _plain(config: Any) -> dict[str, Any]:
    """The plain (bool / int / float / str) settings of an encoder's config, private and version fields left out."""
    items = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {k: v for k, v in sorted(items.items()) if isinstance(v, (bool, int, float, str)) and not k.startswith("_")
            and k not in ("transformers_version", "name_or_path")}


class ARLDMSystem(StorySystem):
    """AR-LDM (Pan et al., WACV 2024) for story continuation and visualization.

    Args (all plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation (frame 0 given, frames 1.. generated) or visualization (all generated).
        characters: names added to both tokenizers (the dataset's recurring characters).
        max_length: caption length S in tokens for CLIP and BLIP (CLIP positions are extended to S).
        image_size: training/sampling resolution (square).
        network: how to build the networks (`source: pretrained` folders, or `source: sizes`); `channels_last`
            (not a builder option): the UNet and VAE in NHWC memory format (a GPU speed-up; same weights).
        train: cfg_dropout (per-frame classifier-free dropout), the freeze switches (freeze_embeddings: the frozen
            encoders' token tables too, so their outputs can be precomputed), `mode` finetune | lora (peft
            adapters on the UNet's attention, options under `lora`: r, alpha, dropout, target_modules).
        optimizer: AdamW settings. lr_schedule: warm-up (steps or epochs), then cosine to 0.
        sampler: scheduler name, steps, guidance scale, eta, skip_unread_feedback (skip the last target's BLIP
            feedback, which no frame reads: the same frames, one BLIP forward fewer); used by validation grids,
            test and sample.
        recipe: run length and clipping read by the trainer config (kept here for the record).
        blip_fit: how dataset frames reach BLIP's square input: squash (Pororo/Flintstones) or center_crop
            (the SSID/VIST readers' Resize + CenterCrop).
    """

    optimizer_defaults = {"lr": 1e-5, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
    frozen_hint = "check model.train.freeze_*"
    modes = ("finetune", "lora")
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' attention projections (self and cross)

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        super().check_config(model)
        train = model.get("train") or {}
        if train.get("mode") == "lora" and train.get("freeze_resnet"):
            raise ConfigurationError("model.train.freeze_resnet=true does not combine with model.train.mode=lora "
                                     "(lora already freezes the UNet but its adapters): drop one of them.")
        embeddings = train.get("freeze_embeddings", False)
        if not isinstance(embeddings, bool):
            raise ConfigurationError(f"model.train.freeze_embeddings={embeddings!r} is not valid: it must be true or "
                                     "false.")
        if embeddings and train.get("mode") == "lora":
            raise ConfigurationError("model.train.freeze_embeddings=true does not combine with model.train.mode=lora "
                                     "(lora trains the token tables by design): drop one of them.")
        if embeddings and not (train.get("freeze_clip") or train.get("freeze_blip")):
            raise ConfigurationError("model.train.freeze_embeddings=true freezes the token tables of the frozen "
                                     "encoders, but neither model.train.freeze_clip nor model.train.freeze_blip is "
                                     "true: turn one of them on, or drop freeze_embeddings.")
        sampler = model.get("sampler") or {}
        try:  # a misspelt scheduler would otherwise surface at the first validation grid
            make_scheduler(str(sampler.get("scheduler")), {})
        except ConfigurationError as err:
            raise ConfigurationError(f"model.sampler.scheduler={sampler.get('scheduler')!r}: {err}") from None
        for key, value in (("model.sampler.skip_unread_feedback", sampler.get("skip_unread_feedback", True)),
                           ("model.network.channels_last", (model.get("network") or {}).get("channels_last", False))):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{key}={value!r} is not valid: it must be true or false.")
        fit = model.get("blip_fit", "squash")
        if fit not in BLIP_FITS:
            raise ConfigurationError(f"model.blip_fit={fit!r} is not valid: it must be one of {BLIP_FITS}.")

    def __init__(
        self,
        task: str,
        characters: list[str],
        max_length: int,
        image_size: int,
        network: dict[str, Any],
        train: dict[str, Any],
        optimizer: dict[str, Any],
        lr_schedule: dict[str, Any],
        sampler: dict[str, Any],
        recipe: dict[str, Any] | None = None,
        seed: int = 0,
        blip_fit: str = "squash",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the composed config is logged once, by tasks/common.py
        self.check_config(dict(self.hparams))
        self.init_layout(task, image_size)
        self.max_length = int(max_length)
        self.blip_fit = blip_fit  # how dataset frames reach BLIP's square input (models/arldm/blip.py BLIP_FITS)
        built = build_arldm(network, characters=list(characters), max_length=self.max_length)
        self.net = built.model
        self.clip_tokenizer = built.clip_tokenizer
        self.blip_tokenizer = built.blip_tokenizer
        if self.net.time_embeddings.num_embeddings != self.num_frames:  # frames per story (src_V)
            raise ConfigurationError(f"the AR-LDM network has {self.net.time_embeddings.num_embeddings} frame-time "
                                     f"embeddings; stories have {self.num_frames} frames.")
        self.apply_freeze(**{k: bool(train.get(k, False))
                             for k in ("freeze_clip", "freeze_blip", "freeze_resnet", "freeze_embeddings")})
        self._null_cache: dict[str, torch.Tensor] | None = None  # `constant_nulls`: set during a fit only
        if train.get("mode") == "lora":
            self.apply_lora()
        if (network or {}).get("channels_last", False):  # after building / loading: the values stay as built
            self.net.use_channels_last(True)

    # ------------------------------------------------------------------------------------------- freezing

    def apply_freeze(self, freeze_clip: bool, freeze_blip: bool, freeze_resnet: bool,
                     freeze_embeddings: bool = False) -> None:
        """AR-LDM's freeze switches (arldm.md §9.1 item 11); the autoencoder is always frozen.

        ``freeze_embeddings`` (not in the original): a frozen encoder's token table is frozen too, so the encoder is
        wholly constant (its outputs can be precomputed, `frozen_inputs`); the character-token rows then stay at
        their initialisation."""
        net = self.net
        net.vae.requires_grad_(False)
        if freeze_clip:  # only the token embeddings keep learning (the new character names live there)
            net.text_encoder.requires_grad_(False)
            net.text_encoder.get_input_embeddings().requires_grad_(not freeze_embeddings)
        if freeze_blip:
            net.mm_encoder.requires_grad_(False)
            net.mm_encoder.text.embeddings.word_embeddings.requires_grad_(not freeze_embeddings)
        if freeze_resnet:  # only the UNet's transformer blocks ("attentions") train
            for name, param in net.unet.named_parameters():
                param.requires_grad_("attentions" in name)
        self._frozen_eval = {"text_encoder": freeze_clip, "mm_encoder": freeze_blip}

    def apply_lora(self) -> None:
        """train.mode=lora: adapters on the UNet's attention projections, the rest of the UNet, CLIP, BLIP and the
        VAE frozen (the encoders in eval mode). What has no pretrained weights trains fully: the modal-type and
        frame-time embeddings, CLIP's token and position tables (the new character rows; the positions past 77)
        and BLIP's word embeddings (the new character rows)."""
        net = self.net
        net.requires_grad_(False)
        self.add_lora(net.unet, self.lora_targets, "the AR-LDM UNet")
        for part in (net.modal_type_embeddings, net.time_embeddings, net.text_encoder.embeddings,
                     net.mm_encoder.text.embeddings.word_embeddings):
            part.requires_grad_(True)
        self._frozen_eval = {"text_encoder": True, "mm_encoder": True}

    def frozen_sources(self) -> dict[str, list[str]]:
        """Where the frozen parts come from (lean checkpoints): the Stable Diffusion subfolders whose network keeps
        frozen parameters (vae/ always; text_encoder/ and unet/ with freeze_* or lora), BLIP's model_large.pth when
        BLIP is frozen, and an original AR-LDM checkpoint that overwrites them (`network.init_from_original`)."""
        network, net, sources = self.hparams.network, self.net, {}
        if network.get("source", "pretrained") == "pretrained":
            folder = Path(str(network.get("stable_diffusion")))
            parts = {"vae": net.vae, "text_encoder": net.text_encoder, "unet": net.unet}
            sources["network.stable_diffusion"] = [str(folder / name) for name, part in parts.items()
                                                   if has_frozen(part)]
            if has_frozen(net.mm_encoder):
                sources["network.blip_checkpoint"] = [str(network.get("blip_checkpoint"))]
        if network.get("init_from_original"):
            sources["network.init_from_original"] = [str(network["init_from_original"])]
        return {key: paths for key, paths in sources.items() if paths}

    def on_train_epoch_start(self) -> None:
        # frozen encoders run in eval mode (no dropout), as AR-LDM does in every forward
        for name, frozen in self._frozen_eval.items():
            if frozen:
                getattr(self.net, name).eval()
        self.net.vae.eval()

    def on_fit_start(self) -> None:
        self._null_cache = {}  # the constant null embeddings of wholly frozen encoders, computed once per fit
        use_precomputed(self)  # data.precompute=true: cached VAE moments (and frozen CLIP / BLIP outputs)

    def on_fit_end(self) -> None:
        self._null_cache = None

    def wholly_frozen(self) -> dict[str, bool]:
        """``{"clip": ..., "blip": ...}``: whether CLIP / BLIP is constant while training (no parameter trains and
        it runs in eval mode): freeze_clip / freeze_blip with freeze_embeddings."""
        net = self.net
        return {name: bool(self._frozen_eval[attr]) and not any(p.requires_grad for p in module.parameters())
                for name, attr, module in (("clip", "text_encoder", net.text_encoder),
                                           ("blip", "mm_encoder", net.mm_encoder))}

    def constant_nulls(self) -> dict[str, torch.Tensor]:
        """``null_caption`` / ``null_source`` of `ARLDM.training_loss` for the wholly frozen encoders: CLIP of "" and
        BLIP of a black image + "" are constant then, so during a fit they are computed at the first step (in its
        device, precision and autocast, i.e. as that step would) and reused. Empty outside a fit, and for an
        encoder that is not in eval mode (its dropout would make them vary)."""
        if self._null_cache is None:
            return {}
        net, frozen = self.net, self.wholly_frozen()
        with torch.no_grad():
            if frozen["clip"] and not net.text_encoder.training and "null_caption" not in self._null_cache:
                self._null_cache["null_caption"] = net.encode_captions(net.clip_text_null_token, None)
            if frozen["blip"] and not net.mm_encoder.training and "null_source" not in self._null_cache:
                self._null_cache["null_source"] = net.encode_history(net.blip_image_null_token,
                                                                     net.blip_text_null_token, None)
        return dict(self._null_cache)

    # ------------------------------------------------------------------------------- precomputed VAE moments

    def frozen_inputs_need_captions(self) -> bool:
        """Whether `frozen_inputs` needs each frame's caption (CLIP or BLIP wholly frozen: their outputs are cached)."""
        return any(self.wholly_frozen().values())

    def frozen_inputs(self, frames: torch.Tensor, captions: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
        """uint8 [B, F, H, W, 3] -> the frozen VAE's posterior ``vae_mean`` / ``vae_std`` [B, F, C, h, w] (fp32), on
        the frames as `prepare_batch` feeds them (resized to image_size, [-1, 1]). The moments, not a sample: the
        story's generator still draws the eps, so a step on them equals a live one.

        With `captions` ([B][F], frame (b, f)'s caption) and a wholly frozen encoder (`wholly_frozen`), also (fp32):
        ``clip_hidden`` [B, F, S, D], CLIP's states of the caption (padded to S, masked: `ARLDM.encode_captions`,
        before the modal embedding is added; used for target frames), ``blip_hidden`` [B, F, S, D], BLIP's
        multimodal states of (frame, caption) as `prepare_batch` feeds them (`blip_preprocess` with blip_fit,
        BLIP's image size and CLIP normalisation; before the modal / time embeddings), and ``caption_sha256``
        [B, F, 32] uint8 (the caption the states were computed from: training checks it against the batch's)."""
        B, F = frames.shape[:2]
        images = resize_uint8(frames.reshape(-1, *frames.shape[2:]), self.image_size).to(self.device)
        images = minus_one_one(images, self.dtype_for_inputs)
        posterior = self.net.vae.encode(images.to(self.net.vae_dtype)).latent_dist
        out = {"vae_mean": posterior.mean.float().reshape(B, F, *posterior.mean.shape[1:]),
               "vae_std": posterior.std.float().reshape(B, F, *posterior.std.shape[1:])}
        frozen = self.wholly_frozen()
        if captions is None or not any(frozen.values()):
            return out
        flat = [str(c) for story in captions for c in story]
        if len(flat) != B * F:
            raise ValueError(f"frozen_inputs: {len(flat)} captions for {B} x {F} frames")
        out["caption_sha256"] = torch.from_numpy(np.stack([caption_digest(c) for c in flat])).reshape(B, F, 32)
        if frozen["clip"]:
            unique = list(dict.fromkeys(flat))  # candidate frames of one position share their caption
            ids, mask = self._tokenize_with(self.clip_tokenizer, unique)
            states = self.net.encode_captions(ids, mask).float()
            index = torch.tensor([unique.index(c) for c in flat], device=states.device)
            out["clip_hidden"] = states[index].reshape(B, F, *states.shape[1:])
        if frozen["blip"]:
            pixels = blip_preprocess(frames.reshape(-1, *frames.shape[2:]), self.net.mm_encoder.image_size,
                                     device=self.device, dtype=self.dtype_for_inputs, fit=self.blip_fit)
            ids, mask = self._tokenize_with(self.blip_tokenizer, flat)
            states = self.net.encode_history(pixels, ids, mask).float()
            out["blip_hidden"] = states.reshape(B, F, *states.shape[1:])
        return out

    def frozen_key(self) -> dict[str, Any]:
        """What the cached arrays depend on besides the frames and captions (the record of a precomputed file).

        The VAE part is the same with or without cached encoders. A wholly frozen CLIP adds its tensors' sha256,
        its config, S (max_length) and its tokenizer's `tokenizer_sha256`; a wholly frozen BLIP the same plus its
        input (blip_fit, image size, input dtype). The encoders run in eval mode (`wholly_frozen`)."""
        key = {"system": type(self).__name__, "arrays": ["vae_mean", "vae_std"], "image_size": int(self.image_size),
               "input_range": "[-1, 1]", "input_dtype": str(self.dtype_for_inputs),
               "vae_dtype": str(self.net.vae_dtype), "vae_sha256": module_sha256(self.net.vae)}
        frozen, net = self.wholly_frozen(), self.net
        if not any(frozen.values()):
            return key
        key["arrays"] += ["caption_sha256"]
        key.update(max_length=self.max_length, encoder_mode="eval", states_dtype="float32")
        if frozen["clip"]:
            key["arrays"] += ["clip_hidden"]
            key.update(clip_sha256=module_sha256(net.text_encoder), clip_config=_plain(net.text_encoder.config),
                       clip_dtype=str(net.text_encoder.dtype),
                       clip_tokenizer=tokenizer_sha256(self.clip_tokenizer, self.max_length, self.hparams.characters))
        if frozen["blip"]:
            key["arrays"] += ["blip_hidden"]
            key.update(blip_sha256=module_sha256(net.mm_encoder), blip_config=_plain(net.mm_encoder.config),
                       blip_fit=self.blip_fit, blip_image_size=int(net.mm_encoder.image_size),
                       blip_input="pil bilinear, /255, CLIP mean/std",
                       blip_tokenizer=tokenizer_sha256(self.blip_tokenizer, self.max_length, self.hparams.characters))
        return key

    def precomputed_posterior(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"posterior_moments": (mean, std)}`` of the target frames [B*V, C, h, w] when the batch carries them."""
        cached = batch.get("precomputed") or {}
        if "vae_mean" not in cached:
            return {}
        first = self.num_frames - self.num_targets
        return {"posterior_moments": tuple(cached[k][:, first:].flatten(0, 1).to(self.device)
                                           for k in ("vae_mean", "vae_std"))}

    def precomputed_encoders(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``caption_embeds`` [B*V, S, D] (target frames) / ``source_embeds`` [B*F, S, D] (all frames) of
        `ARLDM.training_loss` when the batch carries cached CLIP / BLIP states; their captions must be the batch's
        (a file made from other captions is refused, one line)."""
        cached = batch.get("precomputed") or {}
        if "clip_hidden" not in cached and "blip_hidden" not in cached:
            return {}
        digests = cached["caption_sha256"].cpu().numpy()
        for b, story in enumerate(batch["captions"]):
            for f, caption in enumerate(story):
                if not np.array_equal(digests[b, f], caption_digest(str(caption))):
                    raise ConfigurationError(
                        f"precomputed CLIP/BLIP states of story {batch['ids'][b]!r} frame {f} were computed from "
                        f"another caption than {caption!r}: recompute them (task=precompute) or set "
                        "data.precompute=false")
        out, first = {}, self.num_frames - self.num_targets
        if "clip_hidden" in cached:
            out["caption_embeds"] = cached["clip_hidden"][:, first:].flatten(0, 1).to(self.device)
        if "blip_hidden" in cached:
            out["source_embeds"] = cached["blip_hidden"].flatten(0, 1).to(self.device)
        return out

    def block_modules(self) -> list[torch.nn.Module]:
        """The UNet's down, mid and up blocks and the CLIP text, BLIP ViT and BLIP text layers (the frozen VAE
        stays in the root unit)."""
        from transformers.models.blip.modeling_blip import BlipEncoderLayer
        from transformers.models.blip.modeling_blip_text import BlipTextLayer
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        unet, layers = self.net.unet, (CLIPEncoderLayer, BlipEncoderLayer, BlipTextLayer)
        encoders = [m for part in (self.net.text_encoder, self.net.mm_encoder) for m in part.modules()
                    if isinstance(m, layers)]
        mid = [unet.mid_block] if unet.mid_block is not None else []
        return [*unet.down_blocks, *mid, *unet.up_blocks, *encoders]

    # ------------------------------------------------------------------------------------ batch preparation

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP and BLIP ids and masks [n, S] of the captions (the two text encoders' inputs)."""
        clip_ids, clip_mask = self._tokenize_with(self.clip_tokenizer, captions)
        blip_ids, blip_mask = self._tokenize_with(self.blip_tokenizer, captions)
        return {"clip_ids": clip_ids, "clip_mask": clip_mask, "blip_ids": blip_ids, "blip_mask": blip_mask}

    def _tokenize_with(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to S; captions longer than S are truncated with a warning (the original crashed)."""
        enc = tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt")
        # only captions that fill all S positions can have been cut: measure just those again
        full_rows = [t for t, m in zip(texts, enc["attention_mask"]) if int(m.sum()) == self.max_length]
        lengths = [len(ids) for ids in tokenizer(full_rows, truncation=False)["input_ids"]] if full_rows else []
        self.warn_truncated([t for t, n in zip(full_rows, lengths) if n > self.max_length],
                            f"max_length={self.max_length} tokens (raise data.max_length to keep them whole)")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def prepare_batch(self, batch: dict[str, Any], captions: list[list[str]] | None = None,
                      blip_images: bool = True) -> dict[str, torch.Tensor]:
        """Data-module batch -> AR-LDM tensors (see ARLDM's docstring for the contract).

        `captions` overrides the batch's captions (used by the caption-shuffling baseline). `blip_images=False`
        leaves ``source_images`` None (their BLIP states are precomputed).
        """
        frames: torch.Tensor = batch["frames"]  # [B, F, H, W, 3] uint8
        captions = captions if captions is not None else batch["captions"]
        if frames.dim() != 5 or frames.shape[1] != self.num_frames or frames.dtype != torch.uint8:
            raise ValueError(
                f"expected frames uint8 [B, {self.num_frames}, H, W, 3], got {tuple(frames.shape)} {frames.dtype}"
            )
        B, n = frames.shape[:2]
        first_target = n - self.num_targets
        targets = frames[:, first_target:]
        images = resize_uint8(targets.reshape(-1, *targets.shape[2:]), self.image_size)
        images = minus_one_one(images, self.dtype_for_inputs)
        images = images.reshape(B, self.num_targets, 3, self.image_size, self.image_size)

        source_images = blip_preprocess(frames, self.net.mm_encoder.image_size, device=self.device,
                                        dtype=self.dtype_for_inputs, fit=self.blip_fit) if blip_images else None
        flat = [c for story in captions for c in story]
        target_caps = [c for story in captions for c in story[first_target:]]
        clip_ids, clip_mask = self._tokenize_with(self.clip_tokenizer, target_caps)
        blip_ids, blip_mask = self._tokenize_with(self.blip_tokenizer, flat)
        return {
            "images": images,
            "captions": clip_ids.view(B, self.num_targets, -1),
            "attention_mask": clip_mask.view(B, self.num_targets, -1),
            "source_images": source_images,
            "source_caption": blip_ids.view(B, n, -1),
            "source_attention_mask": blip_mask.view(B, n, -1),
        }

    @property
    def dtype_for_inputs(self) -> torch.dtype:
        return next(self.net.unet.parameters()).dtype

    # --------------------------------------------------------------------------------------------- steps

    def losses(self, batch: dict[str, Any], generators: list[torch.Generator] | None) -> dict[str, torch.Tensor]:
        """Noise, timesteps, the VAE posterior sample and (training only) the classifier-free dropout rows, drawn
        from each story's generator: validation/test losses compare across epochs and runs, and a training step is
        the same on any number of processes (the original drew all of it from the global RNG)."""
        cached = self.precomputed_encoders(batch)  # wholly frozen CLIP / BLIP: their states may be cached
        inputs = self.prepare_batch(batch, blip_images="source_embeds" not in cached)
        inputs.update(self.precomputed_posterior(batch))  # the VAE is frozen: its moments may be cached
        inputs.update(cached)
        inputs.update(self.constant_nulls())
        cfg_prob = float(self.hparams.train.get("cfg_dropout", 0.1)) if self.training else 0.0
        rows = per_row(generators, self.num_targets) if generators is not None else None
        out = self.net.training_loss(**inputs, cfg_prob=cfg_prob, generator=rows)
        return {"loss": out.loss}

    # ------------------------------------------------------------------------------------------ sampling

    def sample_stories(self, batch, captions, num_candidates: int, settings: dict[str, Any],
                       generators: list[torch.Generator]) -> torch.Tensor:
        """Autoregressive sampling (`ARLDM.sample`), K candidates per story as K rows drawn from the story's
        generator: uint8 [B, K, V, H, W, 3]."""
        inputs = self.prepare_batch(batch, captions=captions)
        inputs.pop("images")
        B, K = batch["frames"].shape[0], num_candidates
        inputs = {k: v.repeat_interleave(K, dim=0) for k, v in inputs.items()}
        images = self.net.sample(
            **inputs,
            scheduler=make_scheduler(settings["scheduler"], self.net.noise_scheduler.config),
            num_inference_steps=int(settings["num_inference_steps"]),
            guidance_scale=float(settings["guidance_scale"]),
            eta=float(settings.get("eta", 0.0)),
            height=self.image_size,
            width=self.image_size,
            generator=per_row(generators, K),
            skip_unread_feedback=bool(settings.get("skip_unread_feedback", True)),
            on_frames=self._frame_reporter(B, K),
        )
        return images.view(B, K, *images.shape[1:])

    def _frame_reporter(self, B: int, K: int):
        """`ARLDM.sample`'s `on_frames` while `stream_story` listens, else None (sampling untouched): each target
        frame, uint8 [B*K, H, W, 3] exactly as the sampler returns it (no second decode), is reported as that frame
        of every story and candidate (`report_frames`)."""
        if not self.reporting:
            return None

        def on_frames(i: int, frames: torch.Tensor) -> None:
            self.report_frames(i, frames.view(B, K, 1, *frames.shape[1:]))

        return on_frames

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """As every system's, and with `network.channels_last` the saved tensors in the default (contiguous)
        format: the checkpoint is the one the switch off writes."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if self.net.channels_last and isinstance(state, dict) and not self._sharded():
            checkpoint["state_dict"] = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                                        for k, v in state.items()}
