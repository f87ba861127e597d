"""The BART text encoder of DALL-E Mega (min-dalle's `DalleBartEncoder`), keys as in `encoder.pt`:
`embed_tokens`, `embed_positions`, `layernorm_embedding`, `layers.<l>.*`, `final_ln`.

`embed_tokens + embed_positions -> layernorm_embedding -> layers -> final_ln`, with the key mask `tokens != 1`
(the pad id; min-dalle never looks it up by name). The original only accepts exactly `text_token_count` (64)
tokens per row; shorter rows are accepted here and use the first positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import EncoderLayer, key_mask
from .tokenizer import PAD_ID


class DalleBartEncoder(nn.Module):
    def __init__(self, layer_count: int, embed_count: int, attention_head_count: int, glu_embed_count: int,
                 text_vocab_count: int, text_token_count: int = 64):  # fmt: skip
        super().__init__()
        self.embed_tokens = nn.Embedding(text_vocab_count, embed_count)
        self.embed_positions = nn.Embedding(text_token_count, embed_count)
        self.layers = nn.ModuleList(
            EncoderLayer(attention_head_count, embed_count, glu_embed_count) for _ in range(layer_count)
        )
        self.layernorm_embedding = nn.LayerNorm(embed_count)
        self.final_ln = nn.LayerNorm(embed_count)

    @property
    def text_token_count(self) -> int:
        return self.embed_positions.num_embeddings

    def forward(self, text_tokens: Tensor) -> Tensor:
        """text_tokens [B, T] (T <= text_token_count, padded with 1) -> encoder state [B, T, D]."""
        length = text_tokens.shape[1]
        if length > self.text_token_count:
            raise ValueError(f"{length} text tokens; the encoder has {self.text_token_count} positions")
        mask = key_mask(text_tokens != PAD_ID)
        positions = torch.arange(length, device=text_tokens.device)
        x = self.embed_tokens(text_tokens) + self.embed_positions(positions)[None]
        x = self.layernorm_embedding(x)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_ln(x)

    @torch.no_grad()
    def resize_token_embeddings(self, rows: int, std: float = 0.02) -> None:
        """Grow (or shrink) the text embedding to `rows` (e.g. `tokenizer.vocab_size` after `add_tokens`).

        Existing rows are kept; new rows are drawn from N(0, std^2), as newly added BART embeddings usually are.
        """
        old = self.embed_tokens.weight
        new = nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype)
        new.weight.normal_(0.0, std)
        keep = min(rows, old.shape[0])
        new.weight[:keep] = old[:keep]
        self.embed_tokens = new
