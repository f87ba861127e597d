"""StoryDALL-E on the DALL-E Mega backbone (min-dalle port) as a LightningModule.

The story logic (tasks, stage 1, steps, seeded generation, candidates, checkpointed tokenizer, optimizer) is the
minDALL-E variant's (`StoryTokenSystem`); what differs is the backbone: a BART encoder over the caption, a decoder
over image tokens whose condition attention (layers 2, 5, ...) reads the source frame's tokens, image CE only,
and min-dalle's sampler with optional superconditioning.

Fixes to the original (storydalle.md §0.3, §2.3, §8): the condition layers attend to the source frame's tokens
(the original wired them to the text encoder, so the source frame was never used), behind a zero-initialised gate;
character tokens are whole words and the embedding is resized once; superconditioning is available (the original
disabled it; `train.text_dropout` teaches a finetuned model the empty caption it needs); visualization and
frame-by-frame chaining; a real warm-up + decay, gradient clipping.
"""

from __future__ import annotations

from typing import Any

import torch

from storyexp.models.mega.build import build_storymega, weights_dtype
from storyexp.models.mega.story import sample_story, story_loss, tokenizer_from_json, tokenizer_to_json
from storyexp.systems.base import has_frozen
from storyexp.systems.story_tokens import StoryTokenSystem
from storyexp.utils.images import uint8_from_zero_one

MODES = ("finetune", "condition_only", "lora")


class StoryMegaSystem(StoryTokenSystem):
    """StoryDALL-E (Mega) for story continuation and visualization.

    Args (plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation | visualization.
        characters: names added to the tokenizer as whole words.
        image_size: frames are resized to this square before stage 1 encodes them.
        network: `storyexp.models.mega.build` (`source: pretrained | sizes`), plus `start_token`
            (pretrained: 16383, min-dalle's), `source_zero_one` (true: the original's [0, 1] input to the taming
            encoder; taming VQGANs are trained on [-1, 1]), `stage1_fit` (sizes: fit stage 1 on first use) and
            `weights_dtype` (float32 | float16 | bfloat16: the dtype the encoder and decoder are kept in; stage 1
            stays float32).
        story: `condition` (condition layers on), `gate_init` zero | none (the original's ungated layers).
        train: `mode` finetune (encoder + decoder, the original's) | condition_only (condition layers and the text
            embedding) | lora (peft adapters on BART's attention, options under `lora`: r, alpha, dropout,
            target_modules; the condition layers and the text embedding train fully); `text_dropout` (fraction of
            captions replaced by the empty one while training).
        optimizer, lr_schedule: AdamW and warm-up + `decay` cosine | constant.
        sampler: top_k, temperature, supercondition_factor (1 = off, as the original), num_candidates, chain,
            autocast.
        recipe: run length and clipping read by the trainer config.
    """

    modes = MODES
    lora_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]  # BART's attention (`MegaAttention`)

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        super().check_config(model)
        weights_dtype(model.get("network") or {})  # one-line ConfigurationError for a bad weights_dtype

    def __init__(
        self,
        task: str,
        characters: list[str],
        image_size: int,
        network: dict[str, Any],
        story: dict[str, Any],
        train: dict[str, Any],
        optimizer: dict[str, Any],
        lr_schedule: dict[str, Any],
        sampler: dict[str, Any],
        recipe: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the composed config is logged once, by tasks/common.py
        self.check_config(dict(self.hparams))
        self.init_layout(task, image_size)
        mode = str(train.get("mode", MODES[0]))
        built = build_storymega(network, story, list(characters))
        self.stage1, self.model = built.stage1, built.model
        self.start_token, self.sampled_vocab = built.start_token, built.sampled_vocab
        self.frames_zero_one = bool(network.get("source_zero_one", False))
        self.apply_mode(mode)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def apply_mode(self, mode: str) -> None:
        """Stage 1 and the detokenizer never train; `condition_only` trains the condition layers and the text
        embedding (where the character tokens live) on a frozen backbone."""
        self.stage1.requires_grad_(False)
        self.model.requires_grad_(mode == "finetune")
        if self.model.detokenizer is not None:
            self.model.detokenizer.requires_grad_(False)
        if mode == "lora":
            # adapters on the encoder's and decoder's self- and encoder attention; the condition attention has no
            # pretrained weights, so it gets none and trains fully (below, with the text embedding)
            self.add_lora(self.model.encoder, self.lora_targets, "the Mega BART encoder")
            self.add_lora(self.model.decoder, self.lora_targets, "the Mega BART decoder", exclude=r".*condition_attn.*")
        if mode in ("condition_only", "lora"):
            self.model.encoder.embed_tokens.requires_grad_(True)
            for name, param in self.model.decoder.named_parameters():
                if "condition" in name:
                    param.requires_grad_(True)

    def frozen_sources(self) -> dict[str, list[str]]:
        """Where the frozen parts come from (lean checkpoints): min-dalle's detoker.pt (the detokenizer), its
        encoder.pt / decoder.pt when part of them stays frozen (condition_only, lora), the taming VQGAN that encodes
        the source frame (`network.vqgan_encoder`), or `network.stage1_checkpoint` (sizes)."""
        network, sources = self.hparams.network, {}
        if network.get("source", "pretrained") == "pretrained":
            from storyexp.models.mega.loading import resolve_files

            files = resolve_files(str(network.get("min_dalle")))
            parts = {"detokenizer": self.model.detokenizer, "encoder": self.model.encoder,
                     "decoder": self.model.decoder}
            sources["network.min_dalle"] = [str(files[role]) for role, part in parts.items()
                                            if part is not None and has_frozen(part)]
            sources["network.vqgan_encoder"] = [str(network.get("vqgan_encoder"))]
        elif network.get("stage1_checkpoint"):
            sources["network.stage1_checkpoint"] = [str(network["stage1_checkpoint"])]
        return {key: paths for key, paths in sources.items() if paths}

    def block_modules(self) -> list[torch.nn.Module]:
        """The BART encoder and decoder layers (the condition attention lives inside its decoder layer)."""
        return [*self.model.encoder.layers, *self.model.decoder.layers]

    # ------------------------------------------------------------------------------------ batch preparation

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[n] captions -> [n, text_tokens] ids (cut and padded as min-dalle); over-long ones warn."""
        length = self.model.config.text_token_count
        ids = self.tokenizer.encode_batch(list(captions), length)
        self.warn_truncated([c for c, row in zip(captions, ids) if int(row[-1]) != self.tokenizer.pad_id
                             and len(self.tokenizer.tokenize(c)) > length], f"{length} tokens")
        return ids.to(self.device)

    def prepare_batch(self, batch: dict[str, Any], captions: list[list[str]] | None = None,
                      targets: bool = True) -> dict[str, Any]:
        return self.story_inputs(batch, captions if captions is not None else batch["captions"], targets)

    # -------------------------------------------------------------------------------------------- steps

    def losses(self, batch: dict[str, Any], generators=None) -> dict[str, torch.Tensor]:
        inputs = self.prepare_batch(batch)
        dropout = float(self.hparams.train.get("text_dropout", 0.0)) if self.training else 0.0
        return story_loss(self.model, **inputs, start_token=self.start_token, text_dropout=dropout,
                          generator=generators)

    # -------------------------------------------------------------------------------------------- sampling

    def sample_codes(self, batch, captions, num_candidates: int, settings: dict[str, Any],
                     generators: list[torch.Generator]) -> torch.Tensor:
        inputs = self.prepare_batch(batch, captions=captions, targets=False)
        K = num_candidates
        source = inputs["source_codes"].repeat_interleave(K, dim=0) if self.task == "continuation" else None
        return sample_story(
            self.model, inputs["texts"].repeat_interleave(K, dim=0), source,
            start_token=self.start_token, sampled_vocab=self.sampled_vocab,
            top_k=int(settings.get("top_k", 256)), temperature=float(settings.get("temperature", 1.0)),
            supercondition_factor=float(settings.get("supercondition_factor", 1.0)), generator=generators,
            chain=bool(settings.get("chain", False)),
            skip_unconditional=bool(settings.get("skip_unconditional", True)),
            # `stream_story` listening: each group of frames is reported as drawn (None otherwise)
            on_frames=self.codes_reporter((inputs["texts"].shape[0], K), self.decode_codes),
        )

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, T] -> uint8 [N, H, W, 3]: min-dalle's detokenizer (clip to [0, 1]), or the model's own stage 1."""
        if self.model.detokenizer is not None:
            return uint8_from_zero_one(self.model.decode_codes(codes).float())
        side = self.stage1.config.latent_dim
        x = self.stage1.decode_code(codes.view(-1, side, side)).float()
        return uint8_from_zero_one(torch.clamp(x * 0.5 + 0.5, 0, 1))

    # ------------------------------------------------------------------------------------ checkpoints

    def tokenizer_state(self) -> str:
        return tokenizer_to_json(self.tokenizer)

    def load_tokenizer_state(self, state: str, state_dict: dict[str, Any]) -> None:
        self.model.tokenizer = tokenizer_from_json(state)
        rows = state_dict.get("model.encoder.embed_tokens.weight")
        if rows is not None and rows.shape[0] != self.model.encoder.embed_tokens.num_embeddings:
            self.model.encoder.resize_token_embeddings(int(rows.shape[0]))
