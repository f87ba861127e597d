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

from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError
from storyexp.models.mindalle.build import build_storydalle
from storyexp.models.mindalle.tokenizer import pad_id, tokenizer_from_json, tokenizer_to_json, vocab_size
from storyexp.models.sentence_encoders import build_sentence_encoder
from storyexp.systems.base import has_frozen
from storyexp.systems.story_tokens import TOKENIZER_KEY, StoryTokenSystem
from storyexp.utils.images import uint8_from_zero_one

MODES = ("finetune", "prompt", "lora")
SENTENCE_SOURCES = ("dataset", "hashing", "transformers")
__all__ = ["StoryDalleSystem", "TOKENIZER_KEY"]


class StoryDalleSystem(StoryTokenSystem):
    """StoryDALL-E (Maharana et al., ECCV 2022) on minDALL-E, for story continuation and visualization.

    Args (plain config values, saved as hyper-parameters so a checkpoint rebuilds its model):
        task: continuation | visualization.
        characters: names appended to the tokenizer as whole-word tokens (the dataset's recurring characters).
        image_size: frames are resized to this square size before stage 1 encodes them.
        network: how to build stage 1 / stage 2 / tokenizer (`storyexp.models.mindalle.build`), plus
            `stage1_fit`: fit stage 1 on the training split on first use and cache it (demo).
        story: cross-attention (`condition`, `gate_init`: zero | none, `cross_every`), prompt prefix
            (`preseqlen`, `prefix_dropout`; used in `train.mode=prompt`).
        sentence_encoder: where the per-frame sentence embeddings come from: `kind: dataset` (the dataset's
            512-d USE vectors, `data.sentence_embeddings=true`), `hashing` or `transformers`, with `dim`.
        train: `mode` finetune (stage 2 + story parts) | prompt (stage 2 frozen but its embeddings and text head;
            the original's `--prompt`) | lora (peft adapters on the GPT's attention, options under `lora`: r, alpha,
            dropout, target_modules), `mask_text_padding` (false: the original's loss over `[PAD]` targets).
        optimizer: AdamW settings. lr_schedule: warm-up (steps or epochs), then `decay` cosine | constant.
        sampler: top_k, top_p, temperature, num_candidates, chain (frame i attends to generated frame i-1),
            autocast (null | fp16 | bf16 for the transformer; stage 1 decodes in fp32), static_cache (the KV cache
            preallocated and the source frame projected once; false: the original's growing loop).
        recipe: run length and clipping read by the trainer config.
    """

    modes = MODES
    lora_targets = ["key", "query", "value", "proj"]  # minDALL-E's attention linears (`AttentionProjections`)

    @classmethod
    def check_config(cls, model: dict[str, Any]) -> None:
        super().check_config(model)
        kind = (model.get("sentence_encoder") or {}).get("kind", "dataset")
        if kind not in SENTENCE_SOURCES:
            raise ConfigurationError(f"model.sentence_encoder.kind={kind!r} is not valid: it must be one of "
                                     f"{SENTENCE_SOURCES}.")
        network, story = model.get("network") or {}, model.get("story") or {}
        if (model.get("train") or {}).get("mode") == "prompt" and network.get("source") == "sizes":
            preseqlen, ctx = int(story.get("preseqlen", 32)), int((network.get("stage2") or {}).get("ctx_len_txt", 0))
            if preseqlen + 1 > ctx:  # the prefix and the story token share the text positions
                raise ConfigurationError(
                    f"model.train.mode=prompt needs model.story.preseqlen + 1 <= model.network.stage2.ctx_len_txt, "
                    f"got preseqlen={preseqlen} and ctx_len_txt={ctx}: set model.story.preseqlen={max(ctx - 1, 0)} "
                    "or lower (or a larger ctx_len_txt)."
                )

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
        self.save_hyperparameters(logger=False)  # the composed config is logged once, by tasks/common.py
        self.check_config(dict(self.hparams))
        self.init_layout(task, image_size)
        mode = str(train.get("mode", MODES[0]))

        enc_cfg = dict(sentence_encoder)
        self.sentence_source = str(enc_cfg.pop("kind", "dataset"))
        dim = int(enc_cfg.pop("dim", 512))
        encoder = None if self.sentence_source == "dataset" else build_sentence_encoder(self.sentence_source, dim,
                                                                                         **enc_cfg)
        # frozen and not part of the checkpoint: kept outside the module tree (moved to the device on use)
        object.__setattr__(self, "_sentence_encoder", encoder)

        built = build_storydalle(network, {**story, "prompt": mode == "prompt"}, list(characters),
                                 story_len=self.num_targets, sent_embed=dim)
        self.stage1, self.net, self.tokenizer = built.stage1, built.net, built.tokenizer
        self.apply_mode(mode)

    # ------------------------------------------------------------------------------------ trainable sets

    def apply_mode(self, mode: str) -> None:
        """storydalle.md §2.2: stage 1 is never trained; `prompt` freezes stage 2 except its embeddings and the
        (resized) text head, as the original's `--prompt`. Story block, prefix and cross-attention always train."""
        self.stage1.requires_grad_(False)
        self.net.requires_grad_(True)
        if mode == "prompt":
            for name, param in self.net.stage2.named_parameters():
                param.requires_grad_("emb" in name or name.startswith("head_txt"))
        if mode == "lora":
            # adapters on the GPT's self-attention only: the story block and cross-attention (outside stage 2, no
            # pretrained weights) train fully, and so do the text embedding and text head (new character rows)
            self.add_lora(self.net.stage2, self.lora_targets, "the minDALL-E transformer (stage 2)")
            self.net.stage2.tok_emb_txt.requires_grad_(True)
            if getattr(self.net.stage2, "head_txt", None) is not None:
                self.net.stage2.head_txt.requires_grad_(True)

    def frozen_sources(self) -> dict[str, list[str]]:
        """Where the frozen parts come from (lean checkpoints): minDALL-E's stage1_last.ckpt (stage 1), its
        stage2_last.ckpt when part of stage 2 stays frozen (prompt, lora), or `network.stage1_checkpoint` (sizes),
        and a released StoryDALL-E checkpoint that overwrites them (`network.init_from_storydalle`)."""
        network, sources = self.hparams.network, {}
        if network.get("source", "pretrained") == "pretrained" and network.get("mindalle"):
            folder = Path(str(network["mindalle"]))
            names = ["stage1_last.ckpt"] + (["stage2_last.ckpt"] if has_frozen(self.net.stage2) else [])
            sources["network.mindalle"] = [str(folder / name) for name in names]
        elif network.get("stage1_checkpoint"):
            sources["network.stage1_checkpoint"] = [str(network["stage1_checkpoint"])]
        if network.get("init_from_storydalle"):
            sources["network.init_from_storydalle"] = [str(network["init_from_storydalle"])]
        return sources

    def block_modules(self) -> list[torch.nn.Module]:
        """`StoryDalleNet._run_blocks` runs a backbone block piecewise (attention, then cross-attention, then MLP)
        rather than through `Block.forward`, so the units are each block's attention and MLP, the cross-attention
        layers, and the story block (which does run as one)."""
        blocks = self.net.stage2.blocks
        return [m for blk in blocks for m in (blk.attn, blk.mlp)] + list(self.net.cross_attn) + [self.net.story_block]

    # ------------------------------------------------------------------------------------ batch preparation

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[n] captions -> [n, ctx_len_txt] ids; over-long captions are truncated with a warning."""
        encodings = self.tokenizer.encode_batch(list(captions))
        self.warn_truncated([c for c, e in zip(captions, encodings) if e.overflowing],
                            f"the text context ({self.net.cfg.ctx_len_txt} tokens)")
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

    def prepare_batch(self, batch: dict[str, Any], captions: list[list[str]] | None = None,
                      targets: bool = True) -> dict[str, Any]:
        captions = captions if captions is not None else batch["captions"]
        inputs = self.story_inputs(batch, captions, targets)
        inputs["sentence_embeds"] = self.sentence_embeddings(batch, captions, self.first_target)
        return inputs

    # -------------------------------------------------------------------------------------------- steps

    def losses(self, batch: dict[str, Any], generators=None) -> dict[str, torch.Tensor]:
        inputs = self.prepare_batch(batch)
        mask = bool(self.hparams.train.get("mask_text_padding", True))
        tokens = None
        if mask and self.training:  # the text CE's normaliser: the global batch's caption tokens, per process
            texts = inputs["texts"]
            tokens = self.per_process_share((texts.reshape(-1, texts.shape[-1])[:, 1:] != self.pad_id).sum())
        return self.net.loss(**inputs, pad_id=self.pad_id, mask_text_padding=mask, text_tokens=tokens)

    # -------------------------------------------------------------------------------------------- sampling

    def sample_codes(self, batch, captions, num_candidates: int, settings: dict[str, Any],
                     generators: list[torch.Generator]) -> torch.Tensor:
        """[B*K, V, T] codes: each story repeated K times (candidates), then `StoryDalleNet.sample`."""
        inputs = self.prepare_batch(batch, captions=captions, targets=False)
        K = num_candidates
        source = inputs["source_codes"].repeat_interleave(K, dim=0) if self.task == "continuation" else None
        top_k, top_p = settings.get("top_k"), settings.get("top_p")
        return self.net.sample(
            inputs["texts"].repeat_interleave(K, dim=0),
            inputs["sentence_embeds"].repeat_interleave(K, dim=0),
            source,
            top_k=None if top_k is None else int(top_k),
            top_p=None if top_p is None else float(top_p),
            temperature=float(settings.get("temperature", 1.0)),
            generator=generators,
            chain=bool(settings.get("chain", False)),
            static_cache=bool(settings.get("static_cache", True)),
            # `stream_story` listening: each group of frames is reported as drawn (None otherwise)
            on_frames=self.codes_reporter((inputs["texts"].shape[0], K), self.decode_codes),
        )

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, T] codes -> uint8 [N, H, W, 3] (minDALL-E's clamp(0.5 x + 0.5, 0, 1), in fp32)."""
        side = self.stage1.config.latent_dim
        x = self.stage1.decode_code(codes.view(-1, side, side)).float()
        return uint8_from_zero_one(torch.clamp(x * 0.5 + 0.5, 0, 1))

    # ------------------------------------------------------------------------------------ checkpoints

    def tokenizer_state(self) -> str:
        return tokenizer_to_json(self.tokenizer)

    def load_tokenizer_state(self, state: str, state_dict: dict[str, Any]) -> None:
        self.tokenizer = tokenizer_from_json(state)
        rows = state_dict.get("net.stage2.tok_emb_txt.weight")
        if rows is not None and rows.shape[0] != self.net.cfg.vocab_size_txt:
            self.net._set_text_vocab(int(rows.shape[0]))
        if vocab_size(self.tokenizer) > self.net.cfg.vocab_size_txt:
            raise ConfigurationError(
                f"checkpoint tokenizer emits {vocab_size(self.tokenizer)} ids but the model has "
                f"{self.net.cfg.vocab_size_txt} text embedding rows"
            )
