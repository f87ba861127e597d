"""What both StoryDALL-E variants (minDALL-E and DALL-E Mega backbones) share as LightningModules.

They differ in the backbone, not in the story logic (storydalle.md §2.2-2.3), so this base owns (on top of the
story-system contract, `storyexp.systems.base.StorySystem`: layout, per-story seeding, steps, optimizer):
- stage 1: story frames -> VQGAN codes (frozen, eval mode), optionally fitted on the training split on first use
  and cached (`network.stage1_fit`, the demo), loaded in `setup` so every process sees the same weights;
- story sampling as codes, K candidates per story, autocast while sampling, uint8 frames for the callbacks;
- the grown tokenizer travelling inside the checkpoint;
- precomputed stage-1 codes (`data.precompute=true`, `storyexp.systems.frozen_inputs`): `frozen_inputs` /
  `frozen_key` say what is cached, `story_inputs` reads `batch["precomputed"]["codes"]` instead of encoding.

A subclass builds `self.stage1` (a `storyexp.models.vqgan.VQGAN`) and its networks, and implements
`losses(batch, generators)`, `sample_codes(batch, captions, num_candidates, settings, generators)`,
`decode_codes(codes)`, `tokenize(captions)`, `tokenizer_state()` / `load_tokenizer_state(state, state_dict)`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from storyexp.errors import ConfigurationError
from storyexp.systems.base import StorySystem
from storyexp.systems.frozen_inputs import module_sha256, use_precomputed
from storyexp.utils.images import minus_one_one, resize_uint8, uint8_from_zero_one

AUTOCAST = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_KEY = "story_tokenizer"


class StoryTokenSystem(StorySystem):
    """Base of the token-based story systems; see the module docstring for the subclass contract."""

    optimizer_defaults: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.99)}
    frozen_hint = "check model.train.mode"
    frames_zero_one = False  # stage-1 input range: [-1, 1] (taming's); True feeds [0, 1]

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        super().check_config(model)
        autocast = (model.get("sampler") or {}).get("autocast")
        if autocast not in AUTOCAST:
            raise ConfigurationError(f"model.sampler.autocast={autocast!r} is not valid: it must be one of "
                                     f"{list(AUTOCAST)}.")

    def on_train_epoch_start(self) -> None:
        self.stage1.eval()

    def on_fit_start(self) -> None:
        use_precomputed(self)  # data.precompute=true: cached stage-1 codes for the training split

    def saved_frozen_prefixes(self) -> tuple[str, ...]:
        # a stage 1 fitted on the training split (`network.stage1_fit`) cannot be rebuilt from the config, so a lean
        # checkpoint keeps it (eval / sample restore stage 1 from the checkpoint, `setup`)
        return ("stage1.",) if self._stage1_fit() is not None else ()

    # ------------------------------------------------------------------------------------ stage 1 on demand

    def _stage1_fit(self) -> dict[str, Any] | None:
        network = self.hparams.network
        fit = network.get("stage1_fit")
        if not fit or network.get("source") != "sizes" or network.get("stage1_checkpoint"):
            return None
        return dict(fit)

    def _stage1_cache(self, fit: dict[str, Any]):
        """(cache path, data fingerprint): the shared `stage1_fit.cache`, or a run-local file when the training
        split is limited (a limited run never reads or writes the shared cache)."""
        from storyexp.systems.vqgan_training import stage1_cache

        return stage1_cache(fit["cache"], self.trainer.datamodule, self.trainer.default_root_dir)

    def prepare_data(self) -> None:
        """Fit stage 1 on the training split when `network.stage1_fit` asks for it (rank 0, cached on disk with a
        record of what produced it: a cache of another config or other data is refitted)."""
        fit = self._stage1_fit()
        if fit is None or self.trainer is None or self.trainer.state.fn != "fit":
            return
        from storyexp.systems.vqgan_training import load_or_fit_vqgan

        datamodule = self.trainer.datamodule
        cache, fingerprint = self._stage1_cache(fit)
        load_or_fit_vqgan(cache, self.stage1.config, lambda: _split_frames(datamodule, "train"),
                          fingerprint=fingerprint, **{k: v for k, v in fit.items() if k != "cache"})

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the frozen digest of the weights as built (StorySystem.frozen_digest)
        fit = self._stage1_fit()
        if fit is None or stage != "fit":
            return  # eval/test/predict restore stage 1 from the checkpoint with everything else
        from storyexp.models.vqgan import VQGAN

        cache, _ = self._stage1_cache(fit)
        fitted = VQGAN.from_ckpt(cache, self.stage1.config)
        self.stage1.load_state_dict(fitted.state_dict())
        self.stage1.eval()

    def prepare_frozen(self, datamodule, output_dir) -> None:
        """Without a Trainer (task=precompute, benchmark): stage 1 as a training run on `datamodule` has it, the
        fitted one for `network.stage1_fit` (fitted and cached first when missing), so the precomputed codes' key
        is the training run's."""
        fit = self._stage1_fit()
        if fit is None:
            return
        from storyexp.systems.vqgan_training import load_or_fit_vqgan, stage1_cache

        cache, fingerprint = stage1_cache(fit["cache"], datamodule, output_dir)
        fitted, _ = load_or_fit_vqgan(cache, self.stage1.config, lambda: _split_frames(datamodule, "train"),
                                      fingerprint=fingerprint, **{k: v for k, v in fit.items() if k != "cache"})
        self.stage1.load_state_dict(fitted.state_dict())
        self.stage1.eval()

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, F, H, W, 3] -> stage-1 codes [B, F, T] (frames resized, mapped to [-1, 1] or [0, 1]).

        In fp32 with autocast off even inside a `trainer.precision=*-mixed` step or `sampler.autocast`, as the
        originals extract codes: `VQGAN.get_codes` guarantees it (`storyexp.models.vqgan.precision`)."""
        B, F = frames.shape[:2]
        images = resize_uint8(frames.reshape(-1, *frames.shape[2:]), self.image_size).to(self.device)
        images = images.float().div(255.0) if self.frames_zero_one else minus_one_one(images)
        return self.stage1.get_codes(images).view(B, F, -1)

    # ------------------------------------------------------------------------------------ precomputed codes

    def frozen_inputs(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a precomputed file holds per frame: the stage-1 codes, in the smallest integer type that fits."""
        dtype = torch.int16 if int(self.stage1.config.n_embed) <= torch.iinfo(torch.int16).max + 1 else torch.int32
        return {"codes": self.encode_frames(frames).to(dtype)}

    def frozen_key(self) -> dict[str, Any]:
        """What the codes depend on besides the frames (the record of a precomputed file)."""
        return {"system": type(self).__name__, "arrays": ["codes"], "image_size": int(self.image_size),
                "input_range": "[0, 1]" if self.frames_zero_one else "[-1, 1]",
                "stage1_sha256": module_sha256(self.stage1)}

    def _codes(self, batch: dict[str, Any], frames: torch.Tensor) -> torch.Tensor:
        """[B, F, T] codes of `frames` (all 5, or frame 0): precomputed ones when the batch carries them."""
        cached = (batch.get("precomputed") or {}).get("codes")
        if cached is None:
            return self.encode_frames(frames)
        return cached[:, : frames.shape[1]].to(self.device, torch.long)

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
        codes = self._codes(batch, frames if targets else frames[:, :1])
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

    # -------------------------------------------------------------------------------------------- sampling

    def sample_stories(self, batch, captions, num_candidates: int, settings: dict[str, Any],
                       generators: list[torch.Generator]) -> torch.Tensor:
        """Codes drawn under the configured autocast (rows story-major, so story b's draws all come from
        generators[b]), decoded by stage 1 in fp32 (the stage-1 networks turn autocast off themselves, also under
        the callbacks' precision context; `storyexp.models.vqgan.precision`): uint8 [B, K, V, H, W, 3]."""
        B, K = batch["frames"].shape[0], num_candidates
        with self._autocast(settings.get("autocast")):
            codes = self.sample_codes(batch, captions, K, settings, generators)  # [B*K, V, T]
        pixels = self.decode_codes(codes.reshape(-1, codes.shape[-1]))
        return pixels.view(B, K, self.num_targets, *pixels.shape[1:])

    def _autocast(self, name: str | None):
        if AUTOCAST.get(name) is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST[name])

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint_extras(self) -> dict[str, Any]:
        # the grown tokenizer (character tokens included) travels with the weights
        return {TOKENIZER_KEY: self.tokenizer_state()}

    def load_checkpoint_extras(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.load_tokenizer_state(checkpoint[TOKENIZER_KEY], checkpoint.get("state_dict", {}))


def _split_frames(datamodule, split: str) -> np.ndarray:
    """Every frame of a split as uint8 [N, H, W, 3] (stage 1 is fitted on single frames)."""
    return np.stack([f for story in datamodule.stories(split) for f in story.frames])
