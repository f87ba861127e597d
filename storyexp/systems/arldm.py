"""AR-LDM as a LightningModule: batch preparation, training/validation loss, story sampling, optimizers.

The networks (UNet, VAE, CLIP, BLIP, context and mask assembly, the autoregressive sampler) live in
`storyexp.models.arldm` and know nothing of Lightning; this file turns the data module's model-agnostic
batches (uint8 frames + caption strings) into their tensors and owns the training recipe.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from storyexp.errors import ConfigurationError
from storyexp.models.arldm.blip import blip_preprocess
from storyexp.systems.arldm_builder import build_arldm
from storyexp.systems.samplers import make_scheduler
from storyexp.systems.schedules import configure_adamw

log = logging.getLogger(__name__)

TASKS = ("continuation", "visualization")


class ARLDMSystem(L.LightningModule):
    """AR-LDM (Pan et al., WACV 2024) for story continuation and visualization.

    Args (all plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation (frame 0 given, frames 1.. generated) or visualization (all generated).
        characters: names added to both tokenizers (the dataset's recurring characters).
        max_length: caption length S in tokens for CLIP and BLIP (CLIP positions are extended to S).
        image_size: training/sampling resolution (square).
        network: how to build the networks (`source: pretrained` folders, or `source: sizes`).
        train: cfg_dropout (per-frame classifier-free dropout) and the freeze switches.
        optimizer: AdamW settings. lr_schedule: warm-up (steps or epochs), then cosine to 0.
        sampler: scheduler name, steps, guidance scale, eta; used by validation grids, test and sample.
        recipe: run length and clipping read by the trainer config (kept here for the record).
    """

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
    ):
        super().__init__()
        if task not in TASKS:
            raise ConfigurationError(f"Unknown task '{task}' for model=arldm; expected one of {TASKS}.")
        self.save_hyperparameters()
        self.task = task
        self.max_length = int(max_length)
        self.image_size = int(image_size)
        built = build_arldm(network, characters=list(characters), max_length=self.max_length)
        self.net = built.model
        self.clip_tokenizer = built.clip_tokenizer
        self.blip_tokenizer = built.blip_tokenizer
        self.num_frames = self.net.time_embeddings.num_embeddings  # frames per story (src_V)
        self.apply_freeze(**{k: bool(train.get(k, False)) for k in ("freeze_clip", "freeze_blip", "freeze_resnet")})
        self._warned_long = 0

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

    def on_train_epoch_start(self) -> None:
        # frozen encoders run in eval mode (no dropout), as AR-LDM does in every forward
        for name, frozen in self._frozen_eval.items():
            if frozen:
                getattr(self.net, name).eval()
        self.net.vae.eval()

    # ------------------------------------------------------------------------------------ batch preparation

    @property
    def num_targets(self) -> int:
        return self.num_frames - 1 if self.task == "continuation" else self.num_frames

    def tokenize(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to S; captions longer than S are truncated with a warning (the original crashed)."""
        enc = tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt")
        # only captions that fill all S positions can have been cut: measure just those again
        full_rows = [t for t, m in zip(texts, enc["attention_mask"]) if int(m.sum()) == self.max_length]
        lengths = [len(ids) for ids in tokenizer(full_rows, truncation=False)["input_ids"]] if full_rows else []
        too_long = [(t, n) for t, n in zip(full_rows, lengths) if n > self.max_length]
        if too_long and self._warned_long < 5:
            self._warned_long += 1
            text, n = too_long[0]
            warnings.warn(
                f"{len(too_long)} caption(s) longer than max_length={self.max_length} tokens were truncated, "
                f"e.g. {text[:80]!r} ({n} tokens). Raise data.max_length to keep them whole.",
                stacklevel=2,
            )
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
        images = images.to(self.dtype_for_inputs).div(127.5).sub(1.0)
        images = images.reshape(B, self.num_targets, 3, self.image_size, self.image_size)

        source_images = blip_preprocess(frames, self.net.mm_encoder.image_size, device=self.device,
                                        dtype=self.dtype_for_inputs)
        flat = [c for story in captions for c in story]
        target_caps = [c for story in captions for c in story[first_target:]]
        clip_ids, clip_mask = self.tokenize(self.clip_tokenizer, target_caps)
        blip_ids, blip_mask = self.tokenize(self.blip_tokenizer, flat)
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

    def training_step(self, batch, batch_idx):
        inputs = self.prepare_batch(batch)
        out = self.net.training_loss(**inputs, cfg_prob=float(self.hparams.train.get("cfg_dropout", 0.1)))
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["ids"]))
        return out.loss

    def _fixed_noise_loss(self, batch, batch_idx: int) -> torch.Tensor:
        """Loss with noise, timesteps and CFG rows drawn from a generator seeded by the batch's stories,
        so validation and test losses compare across epochs and runs (the original used fresh noise)."""
        inputs = self.prepare_batch(batch)
        generator = torch.Generator(device=self.device).manual_seed(int(self.hparams.seed) * 100_003 + int(batch["index"][0]))
        return self.net.training_loss(**inputs, cfg_prob=0.0, generator=generator).loss

    def validation_step(self, batch, batch_idx):
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["ids"]))
        return loss

    def test_step(self, batch, batch_idx):
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=len(batch["ids"]))
        return loss

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return {"ids": batch["ids"], "captions": batch["captions"], "generated": self.generate(batch)}

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], captions: list[list[str]] | None = None, seed: int | None = None,
                 **sampler_overrides) -> torch.Tensor:
        """Sample whole stories autoregressively. Returns uint8 [B, V, H, W, 3] (V = generated frames).

        Each story's noise comes from a generator seeded by (seed, first story index), so a story's
        samples do not depend on how the test set was split across processes.
        """
        settings = {**self.hparams.sampler, **sampler_overrides}
        inputs = self.prepare_batch(batch, captions=captions)
        inputs.pop("images")
        scheduler = make_scheduler(settings["scheduler"], self.net.noise_scheduler.config)
        base = int(self.hparams.seed if seed is None else seed)
        generator = torch.Generator(device=self.device).manual_seed(base * 100_003 + int(batch["index"][0]))
        was_training = self.training
        self.eval()
        try:
            images = self.net.sample(
                **inputs,
                scheduler=scheduler,
                num_inference_steps=int(settings["num_inference_steps"]),
                guidance_scale=float(settings["guidance_scale"]),
                eta=float(settings.get("eta", 0.0)),
                height=self.image_size,
                width=self.image_size,
                generator=generator,
            )
        finally:
            self.train(was_training)
        return images

    # ---------------------------------------------------------------------------------------- optimizers

    def configure_optimizers(self):
        return configure_adamw(self, self.hparams.optimizer, self.hparams.lr_schedule,
                               defaults={"lr": 1e-5, "weight_decay": 1e-4, "betas": (0.9, 0.999)},
                               frozen_hint="check model.train.freeze_*")


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, size, size], antialiased bilinear like PIL's Resize."""
    x = images.permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if x.device.type == "cpu":  # torch's uint8 antialiased kernel matches Pillow's fixed-point resize
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)
