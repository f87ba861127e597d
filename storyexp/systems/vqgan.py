"""A taming VQGAN (StoryDALL-E's stage 1) trained from scratch as a LightningModule.

The loss and the dead-code restart are those of `storyexp.systems.vqgan_training` (also usable without
Lightning); this file feeds them the data module's story batches (every frame of every story) and exports the
trained network at the end of fit in the layout `VQGAN.from_ckpt` reads, for StoryDALL-E to use as stage 1.

For the framework's story callbacks the system "generates" a story by reconstructing all its frames (encode,
quantise, decode): the test metrics (char_f1_demo, frame_acc_demo, fid_demo) are then the ceiling any stage 2 built on
this stage 1 can reach. The shuffled-caption baseline equals the test scores (captions are not used).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from storyexp.errors import ConfigurationError
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.systems.base import StorySystem
from storyexp.utils.images import minus_one_one, resize_uint8, uint8_from_minus_one_one
from storyexp.systems.vqgan_training import (
    CodeUsage,
    codebook_usage,
    pick_candidates,
    restart_dead_codes,
    save_vqgan,
    vqgan_losses,
)

log = logging.getLogger(__name__)

LR_SCHEDULES = ("cosine", "constant")


class VQGANSystem(StorySystem):
    """Stage-1 training: VQ-VAE loss (L1 + MSE reconstruction, codebook + beta * commitment) with dead-code
    restart, Adam with taming's betas.

    Args (plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        image_size: frames are resized to this square (antialiased bilinear); must equal
            ``network.hparams.resolution``.
        network: the ``stage1`` block, as `VQGANConfig.from_dict` reads it: ``{embed_dim, n_embed,
            hparams: {ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, ...}}``.
        loss: ``beta`` (commitment weight, 0.25) and ``restart_every`` (steps; codes unused over the last
            ``restart_every`` steps are restarted every ``restart_every`` steps; 0 disables it).
        optimizer: Adam ``lr``, ``betas`` (taming: [0.5, 0.9]), ``schedule`` (cosine to 0 over the run, or
            constant).
        recipe: run length read by the trainer config (kept here for the record).
        export_path: where the trained VQGAN is written at the end of fit (``{"state_dict", "stage1_config"}``,
            rank 0); null skips the export.
        seed: initialises the network (in a forked RNG, so the weights depend on it alone) and the restarts.
    """

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        """Its own options only: there is no task or sampler (every frame is reconstructed)."""
        resolution = ((model.get("network") or {}).get("hparams") or {}).get("resolution")
        if resolution is not None and int(resolution) != int(model.get("image_size")):
            raise ConfigurationError(
                f"model.image_size={model.get('image_size')} differs from model.network.hparams.resolution="
                f"{resolution}: the VQGAN's code grid is defined at its resolution; make them equal."
            )
        schedule = (model.get("optimizer") or {}).get("schedule", "cosine")
        if schedule not in LR_SCHEDULES:
            raise ConfigurationError(f"model.optimizer.schedule={schedule!r} is not valid: it must be one of "
                                     f"{LR_SCHEDULES}.")

    def __init__(
        self,
        image_size: int,
        network: dict[str, Any],
        loss: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        export_path: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the composed config is logged once, by tasks/common.py
        self.check_config(dict(self.hparams))
        self.init_layout("visualization", image_size)  # every frame of a story is "generated" (reconstructed)
        self.config = VQGANConfig.from_dict(network)
        loss = dict(loss or {})
        self.beta = float(loss.get("beta", 0.25))
        self.restart_every = int(loss.get("restart_every", 0) or 0)
        self.export_path = Path(export_path) if export_path else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.vqgan = VQGAN(self.config)
        # step at which each code was last picked (in checkpoints, so a resumed run restarts the same codes)
        self.register_buffer("code_last_used", torch.zeros(self.config.n_embed, dtype=torch.long))
        self._step_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_restart = -1
        self._eval_counts: torch.Tensor | None = None
        self.last_losses: dict[str, torch.Tensor] = {}  # the last training step's loss, rec, codebook
        self.restarted_codes = 0  # codes restarted in this process's fit (all of them, every restart)

    # ------------------------------------------------------------------------------------ batch preparation

    def prepare_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """uint8 frames [B, F, H, W, 3] -> every frame as float [B*F, 3, R, R] in [-1, 1]."""
        frames: torch.Tensor = batch["frames"]
        if frames.dim() != 5 or frames.dtype != torch.uint8 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames uint8 [B, F, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
        return minus_one_one(resize_uint8(frames.reshape(-1, *frames.shape[2:]), self.image_size))

    # --------------------------------------------------------------------------------------------- steps

    def training_step(self, batch, batch_idx):
        out = vqgan_losses(self.vqgan, self.prepare_batch(batch), beta=self.beta)
        n = out["codes"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/rec", out["rec"], batch_size=n)
        self.log("train/codebook", out["codebook"], batch_size=n)
        self._step_out = (out["codes"].detach(), out["z"].detach())
        self.last_losses = {k: out[k].detach() for k in ("loss", "rec", "codebook")}  # read by fit_vqgan's record
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """After the optimizer step: record which codes were used (on any process), log the batch's codebook
        usage, and every `restart_every` steps restart the codes unused since the last restart."""
        if self._step_out is None:
            return
        codes, z = self._step_out
        self._step_out = None
        n_embed = self.config.n_embed
        counts = torch.bincount(codes.reshape(-1), minlength=n_embed).float()
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        step = int(self.global_step)
        self.code_last_used[counts > 0] = step
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        self.log("train/codebook_usage", (counts > 0).float().mean(), batch_size=codes.shape[0])
        self.log("train/perplexity", perplexity, batch_size=codes.shape[0])
        last = step >= int(self.trainer.estimated_stepping_batches)  # no restart after the last update
        if self.restart_every and step % self.restart_every == 0 and step != self._last_restart and not last:
            self._last_restart = step  # once per optimizer step, also with gradient accumulation
            self._restart(z, step)

    @torch.no_grad()
    def _restart(self, z: torch.Tensor, step: int) -> None:
        usage = CodeUsage(self.config.n_embed, self.code_last_used)
        dead = usage.dead(step, self.restart_every)
        if dead.numel() == 0:  # the same on every process (usage is synchronised)
            return
        generator = torch.Generator(device=z.device).manual_seed(int(self.hparams.seed) * 1_000_003 + step)
        candidates = pick_candidates(z, dead.numel(), generator)
        if self.trainer.world_size > 1:  # every process must write the same vectors
            candidates = self.trainer.strategy.broadcast(candidates, src=0)
        restarted = restart_dead_codes(self.vqgan, usage, z, step, self.restart_every, candidates=candidates)
        self.restarted_codes += restarted
        self.log("train/restarted_codes", float(restarted), batch_size=1)

    def _score(self, batch, prefix: str) -> torch.Tensor:
        images = self.prepare_batch(batch)
        out = vqgan_losses(self.vqgan, images, beta=self.beta)
        n = images.shape[0]
        mae = (uint8_from_minus_one_one(out["reconstruction"]).float() - uint8_from_minus_one_one(images).float()).abs().mean()
        self.log(f"{prefix}/loss", out["loss"], prog_bar=prefix == "val", sync_dist=True, batch_size=n)
        self.log(f"{prefix}/rec", out["rec"], sync_dist=True, batch_size=n)
        self.log(f"{prefix}/mae", mae, sync_dist=True, batch_size=n)  # per pixel, on the [0, 255] scale
        counts = torch.bincount(out["codes"].reshape(-1), minlength=self.config.n_embed)
        self._eval_counts = counts if self._eval_counts is None else self._eval_counts + counts
        return out["loss"]

    def _log_eval_usage(self, prefix: str) -> None:
        if self._eval_counts is None:
            return
        counts = self._eval_counts.float()
        self._eval_counts = None
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        codes = torch.repeat_interleave(torch.arange(len(counts)), counts.long().cpu())
        stats = codebook_usage(codes, self.config.n_embed)
        self.log(f"{prefix}/codebook_usage", stats["usage"], batch_size=1)
        self.log(f"{prefix}/perplexity", stats["perplexity"], batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._eval_counts = None

    def on_test_epoch_start(self) -> None:
        self._eval_counts = None

    def validation_step(self, batch, batch_idx):
        return self._score(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_usage("val")

    def test_step(self, batch, batch_idx):
        return self._score(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval_usage("test")

    # --------------------------------------------------------------------------------------- "generation"

    def sample_stories(self, batch, captions, num_candidates: int, settings: dict[str, Any],
                       generators) -> torch.Tensor:
        """Reconstructions of every frame, uint8 [B, K, F, R, R, 3] (deterministic: the K candidates are equal;
        captions and generators are unused, accepted for the story-system contract)."""
        frames: torch.Tensor = batch["frames"]
        rec = uint8_from_minus_one_one(self.vqgan(self.prepare_batch(batch)))
        rec = rec.reshape(frames.shape[0], 1, frames.shape[1], *rec.shape[1:])
        return rec.expand(-1, num_candidates, *rec.shape[2:])

    # ---------------------------------------------------------------------------------------------- export

    def on_fit_end(self) -> None:
        self.export()

    @rank_zero_only
    def export(self, path: str | Path | None = None) -> Path | None:
        """Write the VQGAN as ``{"state_dict", "stage1_config"}`` (taming key names), for StoryDALL-E."""
        path = Path(path) if path is not None else self.export_path
        if path is None:
            return None
        written = save_vqgan(self.vqgan, path)
        log.info("VQGAN stage 1 written to %s", written)
        return written

    # ---------------------------------------------------------------------------------------- optimizers

    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer or {})
        optimizer = torch.optim.Adam(
            self.vqgan.parameters(),
            lr=float(opt_cfg.get("lr", 2e-3)),
            betas=tuple(float(b) for b in opt_cfg.get("betas", (0.5, 0.9))),
        )
        if opt_cfg.get("schedule", "cosine") == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
