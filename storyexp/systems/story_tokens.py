"""What both StoryDALL-E variants (minDALL-E and DALL-E Mega backbones) share as LightningModules.

They differ in the backbone, not in the story logic (storydalle.md §2.2-2.3), so this base owns:
- the task layout: continuation (frame 0 given, frames 1-4 generated) or visualization (all 5 generated);
- stage 1: story frames -> VQGAN codes (frozen, eval mode), optionally fitted on the training split on first use
  and cached (`network.stage1_fit`, the demo), loaded in `setup` so every process sees the same weights;
- train / val / test steps over the subclass's `losses(batch)` (metrics `<stage>/loss`, `<stage>/loss_*`);
- seeded story generation, K candidates per story, autocast while sampling, uint8 frames for the callbacks;
- the grown tokenizer travelling inside the checkpoint;
- AdamW + warm-up/decay (`storyexp.systems.schedules.configure_adamw`).

A subclass builds `self.stage1` (a `storyexp.models.vqgan.VQGAN`) and its networks, and implements
`losses(batch)`, `sample_codes(batch, captions, num_candidates, settings, generator)`, `decode_codes(codes)`,
`tokenizer_state()` / `load_tokenizer_state(state, state_dict)`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import numpy as np
import torch

from storyexp.data.story import N_FRAMES
from storyexp.errors import ConfigurationError
from storyexp.systems.arldm import resize_uint8
from storyexp.systems.schedules import configure_adamw

TASKS = ("continuation", "visualization")
AUTOCAST = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_KEY = "story_tokenizer"


class StoryTokenSystem(L.LightningModule):
    """Base of the token-based story systems; see the module docstring for the subclass contract."""

    optimizer_defaults: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.99)}
    frozen_hint = "check model.train"
    frames_zero_one = False  # stage-1 input range: [-1, 1] (taming's); True feeds [0, 1]

    def _init_story(self, task: str, image_size: int, sampler: dict[str, Any], train: dict[str, Any],
                    modes: tuple[str, ...]) -> str:
        """Checks the shared options and sets the task layout; returns the training mode (`train.mode`)."""
        mode = str(train.get("mode", modes[0]))
        if mode not in modes:
            raise ConfigurationError(f"model.train.mode must be one of {modes}, got {mode!r}.")
        if task not in TASKS:
            raise ConfigurationError(f"Unknown task '{task}' for {type(self).__name__}; expected one of {TASKS}.")
        if sampler.get("autocast") not in AUTOCAST:
            raise ConfigurationError(f"model.sampler.autocast must be one of {list(AUTOCAST)}, got "
                                     f"{sampler.get('autocast')!r}.")
        self.task = task
        self.image_size = int(image_size)
        self.num_frames = N_FRAMES
        self.num_targets = N_FRAMES - 1 if task == "continuation" else N_FRAMES
        return mode

    @property
    def first_target(self) -> int:
        return self.num_frames - self.num_targets

    def on_train_epoch_start(self) -> None:
        self.stage1.eval()

    # ------------------------------------------------------------------------------------ stage 1 on demand

    def _stage1_fit(self) -> dict[str, Any] | None:
        network = self.hparams.network
        fit = network.get("stage1_fit")
        if not fit or network.get("source") != "sizes" or network.get("stage1_checkpoint"):
            return None
        return dict(fit)

    def prepare_data(self) -> None:
        """Fit stage 1 on the training split when `network.stage1_fit` asks for it (rank 0, cached on disk)."""
        fit = self._stage1_fit()
        if fit is None or self.trainer is None or self.trainer.state.fn != "fit":
            return
        from storyexp.systems.vqgan_training import load_or_fit_vqgan

        datamodule = self.trainer.datamodule
        load_or_fit_vqgan(fit["cache"], self.stage1.config, lambda: _split_frames(datamodule, "train"),
                          **{k: v for k, v in fit.items() if k != "cache"})

    def setup(self, stage: str) -> None:
        fit = self._stage1_fit()
        if fit is None or stage != "fit":
            return  # eval/test/predict restore stage 1 from the checkpoint with everything else
        from storyexp.models.vqgan import VQGAN

        fitted = VQGAN.from_ckpt(fit["cache"], self.stage1.config)
        self.stage1.load_state_dict(fitted.state_dict())
        self.stage1.eval()

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, F, H, W, 3] -> stage-1 codes [B, F, T] (frames resized, mapped to [-1, 1] or [0, 1])."""
        B, F = frames.shape[:2]
        images = resize_uint8(frames.reshape(-1, *frames.shape[2:]), self.image_size).to(self.device)
        images = images.float().div(255.0) if self.frames_zero_one else images.float().div(127.5).sub(1.0)
        return self.stage1.get_codes(images).view(B, F, -1)

    def story_inputs(self, batch: dict[str, Any], captions: list[list[str]], targets: bool = True) -> dict[str, Any]:
        """Codes and caption ids of a batch: texts [B, L, N] (the subclass's `tokenize`), images [B, L, T] (the
        L target frames; None with `targets=False`, for sampling, which only needs frame 0), source_codes [B, T]
        (frame 0), source_rows [L] (visualization: frame 0 is drawn from its text alone, the others attend to
        frame 0) or None."""
        frames: torch.Tensor = batch["frames"]
        if frames.dim() != 5 or frames.shape[1] != self.num_frames or frames.dtype != torch.uint8:
            raise ValueError(
                f"expected frames uint8 [B, {self.num_frames}, H, W, 3], got {tuple(frames.shape)} {frames.dtype}"
            )
        first = self.first_target
        codes = self.encode_frames(frames if targets else frames[:, :1])
        texts = self.tokenize([c for story in captions for c in story[first:]])
        source_rows = None
        if self.task == "visualization":
            source_rows = torch.arange(self.num_targets, device=self.device) > 0
        return {
            "texts": texts.view(frames.shape[0], self.num_targets, -1),
            "images": codes[:, first:] if targets else None,
            "source_codes": codes[:, 0],
            "source_rows": source_rows,
        }

    # -------------------------------------------------------------------------------------------- steps

    def _step(self, stage: str, batch) -> torch.Tensor:
        out = self.losses(batch)
        for key, value in out.items():  # loss, loss_img[, loss_txt]
            self.log(f"{stage}/{key}", value, prog_bar=key == "loss", sync_dist=stage != "train",
                     batch_size=len(batch["ids"]))
        return out["loss"]

    def training_step(self, batch, batch_idx):
        return self._step("train", batch)

    def validation_step(self, batch, batch_idx):
        return self._step("val", batch)

    def test_step(self, batch, batch_idx):
        return self._step("test", batch)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        k = int(self.hparams.sampler.get("num_candidates", 1))
        candidates = self.generate_candidates(batch, num_candidates=k)
        out = {"ids": batch["ids"], "captions": batch["captions"], "generated": candidates[:, 0]}
        if k > 1:
            out["candidates"] = candidates
        return out

    # -------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], captions: list[list[str]] | None = None, seed: int | None = None,
                 **sampler_overrides) -> torch.Tensor:
        """Sample whole stories: uint8 [B, V, H, W, 3] (V = generated frames), one candidate per story."""
        return self.generate_candidates(batch, captions=captions, seed=seed, num_candidates=1,
                                        **sampler_overrides)[:, 0]

    @torch.no_grad()
    def generate_candidates(self, batch: dict[str, Any], captions: list[list[str]] | None = None,
                            seed: int | None = None, num_candidates: int = 1, **sampler_overrides) -> torch.Tensor:
        """uint8 [B, K, V, H, W, 3]: K independent stories per input story (no re-ranking).

        Codes come from a generator seeded by (seed, first story index), so a story's samples do not depend on how
        the test set was split across processes.
        """
        settings = {**self.hparams.sampler, **sampler_overrides}
        K = int(num_candidates)
        if K < 1:
            raise ConfigurationError(f"num_candidates must be >= 1, got {K}")
        base = int(self.hparams.seed if seed is None else seed)
        generator = torch.Generator(device=self.device).manual_seed(base * 100_003 + int(batch["index"][0]))
        B = batch["frames"].shape[0]
        was_training = self.training
        self.eval()
        try:
            with self._autocast(settings.get("autocast")):
                codes = self.sample_codes(batch, captions, K, settings, generator)  # [B*K, V, T]
            pixels = self.decode_codes(codes.reshape(-1, codes.shape[-1]))
        finally:
            self.train(was_training)
        return pixels.view(B, K, self.num_targets, *pixels.shape[1:])

    def _autocast(self, name: str | None):
        if AUTOCAST.get(name) is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST[name])

    @staticmethod
    def to_uint8(images01: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
        return images01.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the grown tokenizer (character tokens included) travels with the weights
        checkpoint[TOKENIZER_KEY] = self.tokenizer_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.load_tokenizer_state(checkpoint[TOKENIZER_KEY], checkpoint.get("state_dict", {}))

    # ------------------------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        return configure_adamw(self, self.hparams.optimizer, self.hparams.lr_schedule,
                               defaults=self.optimizer_defaults, frozen_hint=self.frozen_hint)


def _split_frames(datamodule, split: str) -> np.ndarray:
    """Every frame of a split as uint8 [N, H, W, 3] (stage 1 is fitted on single frames)."""
    return np.stack([f for story in datamodule.stories(split) for f in story.frames])
