"""`MegaDalle`: min-dalle's converted DALL-E Mega (or Mini) files as one module with the public API the StoryDALL-E
(Mega) system uses:

    m = MegaDalle.from_pretrained(folder)         # encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt
    ids = m.tokenize(list_of_captions)            # LongTensor [B, 64]: [<s>] + ids + [</s>], cut to 64, padded with 1
    state = m.encode_text(ids)                    # [B, 64, d_model]
    logits = m.decoder_logits(state, ids, prev)   # teacher forcing: prev [B, L] starts with the start token 16383;
                                                  # logits [B, L, image_vocab + 1] (all lm_head rows)
    pixels = m.decode_codes(codes)                # [B, 256] -> [B, 3, 256, 256] in [0, 1]
    codes = m.sample(ids, top_k=256, temperature=1.0, supercondition_factor=16, seed=...)   # [B, 256]

Every size comes from the tensors (`MegaConfig`), except the head count (d_model / 64 unless given). With
`condition_layers=True` the decoder gets StoryDALL-E's condition attention (see `layers.py`); the released files
do not have those keys, so they may be missing (and keep their initial values, a zero gate by default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from storyexp.utils.loading import CheckpointMismatchError

from .config import MegaConfig
from .decoder import DalleBartDecoder
from .detokenizer import DetokenizerConfig, VQGanDetokenizer
from .encoder import DalleBartEncoder
from .loading import load_checked, read_state_dict, resolve_files
from .sampling import START_TOKEN, needs_unconditional, sample_image_tokens
from .tokenizer import PAD_ID, MegaTokenizer

CONDITION_KEYS = ("pre_condition_attn_layer_norm.", "condition_attn.", "condition_attn_layer_norm.", "condition_gate")


def is_condition_key(key: str) -> bool:
    """Keys of StoryDALL-E's condition layers (`layers.<l>.<name>...`), absent from min-dalle's files."""
    parts = key.split(".", 2)
    return len(parts) == 3 and parts[0] == "layers" and parts[2].startswith(CONDITION_KEYS)


def unconditional_ids(ids: Tensor) -> Tensor:
    """min-dalle's unconditional text row for each caption row: [first id, last non-pad id, 1, 1, ...].

    For a caption cut at the text length the last id is the last kept token, not `</s>` (as in the original)."""
    out = torch.full_like(ids, PAD_ID)
    last = (ids != PAD_ID).long().cumsum(dim=1).argmax(dim=1)  # index of the last non-pad id
    out[:, 0] = ids[:, 0]
    out[:, 1] = ids.gather(1, last[:, None])[:, 0]
    return out


class MegaDalle(nn.Module):
    def __init__(self, config: MegaConfig, tokenizer: MegaTokenizer,
                 detokenizer_config: DetokenizerConfig | None = None, condition_layers: bool = False,
                 gate_init: str = "zero", detokenizer: bool = True):  # fmt: skip
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        c = config
        self.encoder = DalleBartEncoder(c.encoder_layers, c.embed_count, c.attention_head_count, c.glu_embed_count,
                                        c.text_vocab_count, c.text_token_count)  # fmt: skip
        self.decoder = DalleBartDecoder(c.decoder_layers, c.embed_count, c.attention_head_count, c.glu_embed_count,
                                        c.image_vocab_count, c.image_token_count,
                                        condition_layers=condition_layers, gate_init=gate_init)  # fmt: skip
        # detokenizer=False: models that decode with another stage 1 (the demo) skip min-dalle's fixed-size one
        self.detokenizer = VQGanDetokenizer(detokenizer_config) if detokenizer else None

    @classmethod
    def from_pretrained(cls, folder: str | Path, attention_heads: int | None = None, dtype: torch.dtype = torch.float32,
                        condition_layers: bool = False, gate_init: str = "zero") -> "MegaDalle":  # fmt: skip
        """Build from min-dalle's files (flat in `folder`, or min-dalle's `models_root` layout; see `loading.py`),
        load the encoder and decoder into `dtype` modules (the files are fp16; fp32 by default) and the detokenizer
        into fp32 ones (stage 1 always runs in fp32), and return the model in eval mode.

        Raises MissingResourceError when files are missing, UnsafeFileError / UnreadableFileError for a file that
        is not a flat dict of tensors, CheckpointMismatchError (one line) counting missing / unexpected keys and
        shape mismatches; only the condition-layer keys may be missing, and only when `condition_layers` is set.
        """
        files = resolve_files(folder)
        encoder_sd = read_state_dict(files["encoder"], "min-dalle encoder")
        decoder_sd = read_state_dict(files["decoder"], "min-dalle decoder")
        detoker_sd = read_state_dict(files["detokenizer"], "min-dalle detokenizer")
        config = MegaConfig.from_state_dicts(encoder_sd, decoder_sd, attention_heads,
                                             encoder_source=f"min-dalle encoder {files['encoder']}",
                                             decoder_source=f"min-dalle decoder {files['decoder']}")  # fmt: skip
        tokenizer = MegaTokenizer.from_files(files["vocab"], files["merges"])
        try:
            detoker_config = DetokenizerConfig.from_state_dict(detoker_sd)
        except (KeyError, IndexError, ValueError) as err:
            raise CheckpointMismatchError(
                f"min-dalle detokenizer {files['detokenizer']} lacks the VQGAN decoder layout needed to read its sizes "
                f"({type(err).__name__}: {err}); pass min-dalle's vqgan/detoker.pt."
            ) from None
        model = cls(config, tokenizer, detoker_config, condition_layers=condition_layers, gate_init=gate_init)
        model.transformer_to(dtype)  # `load_checked` then copies each tensor into its module's dtype
        load_checked(model.encoder, encoder_sd, files["encoder"])
        load_checked(model.decoder, decoder_sd, files["decoder"], may_be_missing=is_condition_key)
        load_checked(model.detokenizer, detoker_sd, files["detokenizer"])
        return model.eval()

    def transformer_to(self, dtype: torch.dtype) -> "MegaDalle":
        """Cast the encoder and decoder (the transformer) to `dtype`; the detokenizer stays fp32 (stage 1 always
        runs in fp32, as in the original, see `storyexp.models.vqgan.precision`)."""
        self.encoder.to(dtype)
        self.decoder.to(dtype)
        return self

    # ------------------------------------------------------------------ text
    @property
    def device(self) -> torch.device:
        return self.encoder.embed_tokens.weight.device

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.tokenizer.encode_batch(list(captions), self.config.text_token_count).to(self.device)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.encoder(ids)

    # ------------------------------------------------------------------ image tokens
    def decoder_logits(self, state: Tensor, ids: Tensor, prev: Tensor, condition_state: Tensor | None = None,
                       condition_mask: Tensor | None = None) -> Tensor:  # fmt: skip
        """Teacher-forced, causal, non-cached: logits [B, L, image_vocab + 1]; position t predicts token t, whose
        input prev[:, t] is the previous token (prev[:, 0] = the start token 16383)."""
        return self.decoder(prev, state, ids != PAD_ID, condition_state, condition_mask)

    def shift_tokens(self, codes: Tensor) -> Tensor:
        """Image tokens [B, T] -> decoder inputs [B, T]: the start token, then codes[:, :-1]."""
        start = torch.full_like(codes[:, :1], START_TOKEN)
        return torch.cat([start, codes[:, :-1]], dim=1)

    @torch.no_grad()
    def sample(
        self,
        ids: Tensor,
        *,
        top_k: int = 256,
        temperature: float = 1.0,
        supercondition_factor: float = 16.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        condition_state: Tensor | None = None,
        condition_mask: Tensor | None = None,
        skip_unconditional: bool = True,
    ) -> Tensor:
        """min-dalle's sampler for caption ids [B, T] -> image tokens [B, image_token_count].

        The text is encoded as [B unconditional rows; B caption rows] (see `unconditional_ids`) and every step
        draws one `torch.multinomial` over the superconditioned top-k weights (`sampling.py`).
        seed > 0: draw from a fresh generator seeded with it, which yields the same stream as the original's
        `torch.manual_seed(seed)` without touching the global RNG; otherwise `generator` (None = global RNG).
        condition_state [B, S, D] / condition_mask [B, S]: given to both halves (only the text is dropped in the
        unconditional rows). `skip_unconditional`: at factor 1 the unconditional half, multiplied by zero, is not
        computed (`sampling.needs_unconditional`); the tokens are the same.
        """
        if seed is not None and seed > 0:
            generator = torch.Generator(device=ids.device).manual_seed(int(seed))
        halves = needs_unconditional(supercondition_factor, skip_unconditional)
        text = torch.cat([unconditional_ids(ids), ids], dim=0) if halves else ids
        state = self.encoder(text)
        if condition_state is not None and halves:
            condition_state = condition_state.repeat(2, 1, 1)
            condition_mask = None if condition_mask is None else condition_mask.repeat(2, 1)
        return sample_image_tokens(
            self.decoder, state, text != PAD_ID, top_k=top_k, temperature=temperature,
            supercondition_factor=supercondition_factor, generator=generator,
            condition_state=condition_state, condition_mask=condition_mask, unconditional=halves,
        )  # fmt: skip

    # ------------------------------------------------------------------ pixels
    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        return self.detokenizer(codes)

    @torch.no_grad()
    def decode_grid(self, codes: Tensor, seamless: bool = False) -> Tensor:
        return self.detokenizer.decode_grid(codes, seamless)
