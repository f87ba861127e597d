"""StoryDALL-E on the minDALL-E backbone as a LightningModule: batch preparation, losses, story sampling, recipe.

The networks (taming VQGAN, `StoryDalleNet` around minDALL-E's `Transformer1d`, the CharBPE tokenizer) live in
`storyexp.models` and know nothing of Lightning. This file turns the data module's model-agnostic batches (uint8
frames + caption strings) into codes, token ids and sentence embeddings, and owns the training recipe.

Tasks (data.task):
    continuation   frame 0 is given; frames 1-4 are generated, each attending to frame 0's codes
    visualization  all 5 frames are generated; frame 0 from its text alone, the others attending to frame 0
                   (the real one in training, the generated one when sampling)

Fixes to the original (storydalle.md §0, §8.2) made here or in the networks: cross-attention registered, gated and
applied at every cached step; the first image token read at the right position; the tokenizer with its character
tokens saved in the checkpoint; a real warm-up + decay, gradient clipping (trainer), padding masked in the text
loss; deterministic validation (no sampling noise in the loss).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import lightning as L
import torch

from storyexp.data.story import N_FRAMES
from storyexp.errors import ConfigurationError
from storyexp.models.mindalle.tokenizer import pad_id, tokenizer_from_json, tokenizer_to_json, vocab_size
from storyexp.models.sentence_encoders import build_sentence_encoder
from storyexp.systems.arldm import resize_uint8
from storyexp.systems.schedules import configure_adamw
from storyexp.systems.storydalle_builder import build_storydalle

log = logging.getLogger(__name__)

TASKS = ("continuation", "visualization")
MODES = ("finetune", "prompt")
SENTENCE_SOURCES = ("dataset", "hashing", "transformers")
AUTOCAST = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_KEY = "storydalle_tokenizer"


class StoryDalleSystem(L.LightningModule):
    """StoryDALL-E (Maharana et al., ECCV 2022) on minDALL-E, for story continuation and visualization.

    Args (plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation | visualization.
        characters: names appended to the tokenizer as whole-word tokens (the dataset's recurring characters).
        image_size: frames are resized to this square size before stage 1 encodes them.
        network: how to build stage 1 / stage 2 / tokenizer (`storyexp.systems.storydalle_builder`), plus
            `stage1_fit`: fit stage 1 on the training split on first use and cache it (demo).
        story: cross-attention (`condition`, `gate_init`: zero | none, `cross_every`), prompt prefix
            (`preseqlen`, `prefix_dropout`; used in `train.mode=prompt`).
        sentence_encoder: where the per-frame sentence embeddings come from: `kind: dataset` (the dataset's
            512-d USE vectors, `data.sentence_embeddings=true`), `hashing` or `transformers`, with `dim`.
        train: `mode` finetune (stage 2 + story parts) | prompt (stage 2 frozen but its embeddings and text head;
            the original's `--prompt`), `mask_text_padding` (false: the original's loss over `[PAD]` targets).
        optimizer: AdamW settings. lr_schedule: warm-up (steps or epochs), then `decay` cosine | constant.
        sampler: top_k, top_p, temperature, num_candidates, chain (frame i attends to generated frame i-1),
            autocast (null | fp16 | bf16 for the transformer; stage 1 decodes in fp32).
        recipe: run length and clipping read by the trainer config.
    """

    def __init__(
        self,
        task: str,
        characters: list[str],
        image_size: int,
        network: dict[str, Any],
        story: dict[str, Any],
        sentence_encoder: dict[str, Any],
        train: dict[str, Any],
        optimizer: dict[str, Any],
        lr_schedule: dict[str, Any],
        sampler: dict[str, Any],
        recipe: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ConfigurationError(f"Unknown task '{task}' for StoryDALL-E; expected one of {TASKS}.")
        mode = str(train.get("mode", "finetune"))
        if mode not in MODES:
            raise ConfigurationError(f"model.train.mode must be one of {MODES}, got {mode!r}.")
        if sampler.get("autocast") not in AUTOCAST:
            raise ConfigurationError(f"model.sampler.autocast must be one of {list(AUTOCAST)}, got "
                                     f"{sampler.get('autocast')!r}.")
        self.save_hyperparameters()
        self.task = task
        self.image_size = int(image_size)
        self.num_frames = N_FRAMES
        self.num_targets = N_FRAMES - 1 if task == "continuation" else N_FRAMES

        enc_cfg = dict(sentence_encoder)
        self.sentence_source = str(enc_cfg.pop("kind", "dataset"))
        if self.sentence_source not in SENTENCE_SOURCES:
            raise ConfigurationError(
                f"model.sentence_encoder.kind must be one of {SENTENCE_SOURCES}, got {self.sentence_source!r}."
            )
        dim = int(enc_cfg.pop("dim", 512))
        encoder = None if self.sentence_source == "dataset" else build_sentence_encoder(self.sentence_source, dim,
                                                                                         **enc_cfg)
        # frozen and not part of the checkpoint: kept outside the module tree (moved to the device on use)
        object.__setattr__(self, "_sentence_encoder", encoder)

        built = build_storydalle(network, {**story, "prompt": mode == "prompt"}, list(characters),
                                 story_len=self.num_targets, sent_embed=dim)
        self.stage1, self.net, self.tokenizer = built.stage1, built.net, built.tokenizer
        self.apply_mode(mode)
        self._warned_long = 0

    # ------------------------------------------------------------------------------------ trainable sets

    def apply_mode(self, mode: str) -> None:
        """storydalle.md §2.2: stage 1 is never trained; `prompt` freezes stage 2 except its embeddings and the
        (resized) text head, as the original's `--prompt`. Story block, prefix and cross-attention always train."""
        self.stage1.requires_grad_(False)
        self.net.requires_grad_(True)
        if mode == "prompt":
            for name, param in self.net.stage2.named_parameters():
                param.requires_grad_("emb" in name or name.startswith("head_txt"))

    def on_train_epoch_start(self) -> None:
        self.stage1.eval()

    # ------------------------------------------------------------------------------------ stage 1 on demand

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

    def _stage1_fit(self) -> dict[str, Any] | None:
        network = self.hparams.network
        fit = network.get("stage1_fit")
        if not fit or network.get("source") != "sizes" or network.get("stage1_checkpoint"):
            return None
        return dict(fit)

    # ------------------------------------------------------------------------------------ batch preparation

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[n] captions -> [n, ctx_len_txt] ids; over-long captions are truncated with a warning."""
        encodings = self.tokenizer.encode_batch(list(captions))
        cut = [c for c, e in zip(captions, encodings) if e.overflowing]
        if cut and self._warned_long < 5:
            self._warned_long += 1
            warnings.warn(
                f"{len(cut)} caption(s) longer than the text context ({self.net.cfg.ctx_len_txt} tokens) were "
                f"truncated, e.g. {cut[0][:80]!r}.", stacklevel=2,
            )
        return torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)

    def sentence_embeddings(self, batch: dict[str, Any], captions: list[list[str]], first: int) -> torch.Tensor:
        """[B, L, dim] for the target frames: the dataset's vectors, or the configured text encoder's."""
        B, L = len(captions), len(captions[0]) - first
        if self.sentence_source == "dataset":
            if batch.get("sentence_embeds") is None:
                raise ConfigurationError(
                    "model.sentence_encoder.kind=dataset needs the dataset's sentence embeddings, and this batch "
                    "has none: set data.sentence_embeddings=true (raw PororoSV / FlintstonesSV folders), or use "
                    "model.sentence_encoder.kind=hashing|transformers (captions given by hand have no vectors)."
                )
            return batch["sentence_embeds"][:, first:].to(self.device, torch.float32)
        encoder = self._sentence_encoder
        if hasattr(encoder, "to"):
            encoder.to(self.device)
        flat = [c for story in captions for c in story[first:]]
        return encoder.encode(flat).to(self.device, torch.float32).view(B, L, -1)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, F, H, W, 3] -> stage-1 codes [B, F, T] (frames resized, mapped to [-1, 1])."""
        B, F = frames.shape[:2]
        images = resize_uint8(frames.reshape(-1, *frames.shape[2:]), self.image_size).to(self.device)
        images = images.float().div(127.5).sub(1.0)
        return self.stage1.get_codes(images).view(B, F, -1)

    def prepare_batch(self, batch: dict[str, Any], captions: list[list[str]] | None = None) -> dict[str, Any]:
        frames: torch.Tensor = batch["frames"]
        captions = captions if captions is not None else batch["captions"]
        if frames.dim() != 5 or frames.shape[1] != self.num_frames or frames.dtype != torch.uint8:
            raise ValueError(
                f"expected frames uint8 [B, {self.num_frames}, H, W, 3], got {tuple(frames.shape)} {frames.dtype}"
            )
        B = frames.shape[0]
        first = self.num_frames - self.num_targets
        codes = self.encode_frames(frames)
        texts = self.tokenize([c for story in captions for c in story[first:]]).view(B, self.num_targets, -1)
        source_rows = None
        if self.task == "visualization":  # frame 0 is drawn from text alone; the others attend to frame 0
            source_rows = torch.arange(self.num_targets, device=self.device) > 0
        return {
            "texts": texts,
            "images": codes[:, first:],
            "source_codes": codes[:, 0],
            "sentence_embeds": self.sentence_embeddings(batch, captions, first),
            "source_rows": source_rows,
        }

    # -------------------------------------------------------------------------------------------- steps

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_batch(batch)
        return self.net.loss(**inputs, pad_id=self.pad_id,
                             mask_text_padding=bool(self.hparams.train.get("mask_text_padding", True)))

    def _log_losses(self, stage: str, out: dict[str, torch.Tensor], batch_size: int) -> None:
        for key, value in out.items():  # loss, loss_img, loss_txt
            self.log(f"{stage}/{key}", value, prog_bar=key == "loss", sync_dist=stage != "train",
                     batch_size=batch_size)

    def training_step(self, batch, batch_idx):
        out = self._losses(batch)
        self._log_losses("train", out, len(batch["ids"]))
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self._losses(batch)
        self._log_losses("val", out, len(batch["ids"]))
        return out["loss"]

    def test_step(self, batch, batch_idx):
        out = self._losses(batch)
        self._log_losses("test", out, len(batch["ids"]))
        return out["loss"]

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
        inputs = self.prepare_batch(batch, captions=captions)
        K = int(num_candidates)
        if K < 1:
            raise ConfigurationError(f"num_candidates must be >= 1, got {K}")
        B = inputs["texts"].shape[0]
        texts = inputs["texts"].repeat_interleave(K, dim=0)
        sent = inputs["sentence_embeds"].repeat_interleave(K, dim=0)
        source = inputs["source_codes"].repeat_interleave(K, dim=0) if self.task == "continuation" else None
        base = int(self.hparams.seed if seed is None else seed)
        generator = torch.Generator(device=self.device).manual_seed(base * 100_003 + int(batch["index"][0]))
        top_k = settings.get("top_k")
        was_training = self.training
        self.eval()
        try:
            with self._autocast(settings.get("autocast")):
                codes = self.net.sample(
                    texts, sent, source,
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if settings.get("top_p") is None else float(settings["top_p"]),
                    temperature=float(settings.get("temperature", 1.0)),
                    generator=generator,
                    chain=bool(settings.get("chain", False)),
                )
            pixels = self.decode_codes(codes.reshape(-1, codes.shape[-1]))
        finally:
            self.train(was_training)
        return pixels.view(B, K, self.num_targets, *pixels.shape[1:])

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, T] codes -> uint8 [N, H, W, 3] (minDALL-E's clamp(0.5 x + 0.5, 0, 1), in fp32)."""
        side = self.stage1.config.latent_dim
        x = self.stage1.decode_code(codes.view(-1, side, side)).float()
        x = torch.clamp(x * 0.5 + 0.5, 0, 1)
        return x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _autocast(self, name: str | None):
        if AUTOCAST.get(name) is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST[name])

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the grown tokenizer (character tokens included) travels with the weights
        checkpoint[TOKENIZER_KEY] = tokenizer_to_json(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = tokenizer_from_json(checkpoint[TOKENIZER_KEY])
        rows = checkpoint.get("state_dict", {}).get("net.stage2.tok_emb_txt.weight")
        if rows is not None and rows.shape[0] != self.net.cfg.vocab_size_txt:
            self.net._set_text_vocab(int(rows.shape[0]))
        if vocab_size(self.tokenizer) > self.net.cfg.vocab_size_txt:
            raise ConfigurationError(
                f"checkpoint tokenizer emits {vocab_size(self.tokenizer)} ids but the model has "
                f"{self.net.cfg.vocab_size_txt} text embedding rows"
            )

    # ------------------------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        return configure_adamw(self, self.hparams.optimizer, self.hparams.lr_schedule,
                               defaults={"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.99)},
                               frozen_hint="check model.train.mode")


def _split_frames(datamodule, split: str):
    """Every frame of a split as uint8 [N, H, W, 3] (stage 1 is fitted on single frames)."""
    import numpy as np

    frames = [f for story in datamodule.stories(split) for f in story.frames]
    return np.stack(frames)
