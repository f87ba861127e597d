"""AR-LDM as a LightningModule: batch preparation, training/validation loss, story sampling, optimizers.

The networks (UNet, VAE, CLIP, BLIP, context and mask assembly, the autoregressive sampler) live in
`storyexp.models.arldm` and know nothing of Lightning; this file turns the data module's model-agnostic
batches (uint8 frames + caption strings) into their tensors and owns the training recipe.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from storyexp.errors import ConfigurationError
from storyexp.models.arldm.blip import BLIP_FITS, blip_preprocess
from storyexp.models.arldm.build import build_arldm
from storyexp.systems.base import StorySystem, per_row
from storyexp.systems.samplers import make_scheduler
from storyexp.utils.images import minus_one_one, resize_uint8

log = logging.getLogger(__name__)


class ARLDMSystem(StorySystem):
    """AR-LDM (Pan et al., WACV 2024) for story continuation and visualization.

    Args (all plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation (frame 0 given, frames 1.. generated) or visualization (all generated).
        characters: names added to both tokenizers (the dataset's recurring characters).
        max_length: caption length S in tokens for CLIP and BLIP (CLIP positions are extended to S).
        image_size: training/sampling resolution (square).
        network: how to build the networks (`source: pretrained` folders, or `source: sizes`).
        train: cfg_dropout (per-frame classifier-free dropout), the freeze switches, `mode` finetune | lora (peft
            adapters on the UNet's attention, options under `lora`: r, alpha, dropout, target_modules).
        optimizer: AdamW settings. lr_schedule: warm-up (steps or epochs), then cosine to 0.
        sampler: scheduler name, steps, guidance scale, eta; used by validation grids, test and sample.
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
        sampler = model.get("sampler") or {}
        try:  # a misspelt scheduler would otherwise surface at the first validation grid
            make_scheduler(str(sampler.get("scheduler")), {})
        except ConfigurationError as err:
            raise ConfigurationError(f"model.sampler.scheduler={sampler.get('scheduler')!r}: {err}") from None
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
        self.save_hyperparameters()
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
        self.apply_freeze(**{k: bool(train.get(k, False)) for k in ("freeze_clip", "freeze_blip", "freeze_resnet")})
        if train.get("mode") == "lora":
            self.apply_lora()

    # ------------------------------------------------------------------------------------------- freezing

    def apply_freeze(self, freeze_clip: bool, freeze_blip: bool, freeze_resnet: bool) -> None:
        """AR-LDM's freeze switches (arldm.md §9.1 item 11); the autoencoder is always frozen."""
        net = self.net
        net.vae.requires_grad_(False)
        if freeze_clip:  # only the token embeddings keep learning (the new character names live there)
            net.text_encoder.requires_grad_(False)
            net.text_encoder.get_input_embeddings().requires_grad_(True)
        if freeze_blip:
            net.mm_encoder.requires_grad_(False)
            net.mm_encoder.text.embeddings.word_embeddings.requires_grad_(True)
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

    def on_train_epoch_start(self) -> None:
        # frozen encoders run in eval mode (no dropout), as AR-LDM does in every forward
        for name, frozen in self._frozen_eval.items():
            if frozen:
                getattr(self.net, name).eval()
        self.net.vae.eval()

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

    def prepare_batch(self, batch: dict[str, Any], captions: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
        """Data-module batch -> AR-LDM tensors (see ARLDM's docstring for the contract).

        `captions` overrides the batch's captions (used by the caption-shuffling baseline).
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
                                        dtype=self.dtype_for_inputs, fit=self.blip_fit)
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
        inputs = self.prepare_batch(batch)
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
        )
        return images.view(B, K, *images.shape[1:])
