"""The BART image decoder of DALL-E Mega (min-dalle's `DalleBartDecoder`), keys as in `decoder.pt`:
`embed_tokens` [image_vocab+1, D], `embed_positions` [256, D], `layernorm_embedding`, `layers.<l>.*`, `final_ln`,
`lm_head` (no bias, image_vocab+1 outputs).

Two ways to run it, numerically the same function:

- `forward`: teacher forcing over a whole token sequence with a causal mask (training, scoring);
- `step`: KV-cached decoding, a few tokens at a time (sampling). The cache is a `DecoderCache`; `to_original()`
  converts it to min-dalle's `attention_state` layout for comparison.

Unlike min-dalle's `forward`, neither repeats `prev_tokens` for the unconditional/conditional halves: every row
of `prev_tokens` is one decoder row, and the sampler (`sampling.py`) builds the doubled batch itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import DecoderLayer, LayerCache, key_mask


def condition_layer_flags(layer_count: int) -> list[bool]:
    """StoryDALL-E's placement: condition attention on every third layer, (i + 1) % 3 == 0."""
    return [(i + 1) % 3 == 0 for i in range(layer_count)]


class DecoderCache:
    """KV cache of all layers: `layers[l].keys/values` [N, T_max, D], filled up to `length` positions."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[1] if self.layers else 0

    def to_original(self) -> Tensor:
        """min-dalle's `attention_state` [layer_count, 2N, T_max, D]: rows 0..N-1 keys, rows N..2N-1 values."""
        return torch.stack([torch.cat([c.keys, c.values], dim=0) for c in self.layers])


class DalleBartDecoder(nn.Module):
    def __init__(
        self,
        layer_count: int,
        embed_count: int,
        attention_head_count: int,
        glu_embed_count: int,
        image_vocab_count: int,
        image_token_count: int = 256,
        condition_layers: bool = False,
        gate_init: str = "zero",
    ):
        super().__init__()
        self.image_vocab_count = image_vocab_count
        self.embed_tokens = nn.Embedding(image_vocab_count + 1, embed_count)
        self.embed_positions = nn.Embedding(image_token_count, embed_count)
        flags = condition_layer_flags(layer_count) if condition_layers else [False] * layer_count
        self.layers = nn.ModuleList(
            DecoderLayer(attention_head_count, embed_count, glu_embed_count, condition=flag, gate_init=gate_init)
            for flag in flags
        )
        self.layernorm_embedding = nn.LayerNorm(embed_count)
        self.final_ln = nn.LayerNorm(embed_count)
        self.lm_head = nn.Linear(embed_count, image_vocab_count + 1, bias=False)

    @property
    def image_token_count(self) -> int:
        return self.embed_positions.num_embeddings

    @property
    def condition_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.has_condition]

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        end = start + tokens.shape[1]
        if end > self.image_token_count:
            raise ValueError(f"image positions up to {end - 1}; the decoder has {self.image_token_count}")
        positions = torch.arange(start, end, device=tokens.device)
        return self.layernorm_embedding(self.embed_tokens(tokens) + self.embed_positions(positions)[None])

    def _head(self, x: Tensor, return_hidden: bool):
        hidden = self.final_ln(x)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def forward(
        self,
        prev_tokens: Tensor,
        encoder_state: Tensor,
        encoder_mask: Tensor | None,
        condition_state: Tensor | None = None,
        condition_mask: Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Teacher-forced logits [N, L, image_vocab+1] for prev_tokens [N, L] at positions 0..L-1.

        encoder_state [N, S, D]; encoder_mask [N, S] bool (True = real text token, i.e. `text_tokens != 1`);
        condition_state [N, S', D] / condition_mask [N, S'] feed the condition layers (skipped when None).
        With `return_hidden`, also returns the `final_ln` output (the `lm_head` input).
        """
        length = prev_tokens.shape[1]
        positions = torch.arange(length, device=prev_tokens.device)
        causal = (positions[None, :] <= positions[:, None])[None, None]  # [1, 1, L(query), L(key)]
        x = self._embed(prev_tokens, 0)
        mask = key_mask(encoder_mask)
        for layer in self.layers:
            x = layer(x, encoder_state, mask, self_mask=causal,
                      condition_state=condition_state, condition_mask=condition_mask)  # fmt: skip
        return self._head(x, return_hidden)

    def new_cache(self, batch: int, device=None, dtype=None) -> DecoderCache:
        """An empty cache for `batch` decoder rows (zeros, like min-dalle's initial attention_state)."""
        ref = self.embed_positions.weight
        shape = (batch, self.image_token_count, ref.shape[1])
        make = lambda: torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)  # noqa: E731
        return DecoderCache([LayerCache(make(), make()) for _ in self.layers])

    def step(
        self,
        prev_tokens: Tensor,
        encoder_state: Tensor,
        encoder_mask: Tensor | None,
        cache: DecoderCache,
        condition_state: Tensor | None = None,
        condition_mask: Tensor | None = None,
        return_hidden: bool = False,
    ):
        """Cached decoding: prev_tokens [N, L] are the tokens at positions cache.length .. cache.length+L-1
        (usually L = 1). Returns their logits [N, L, image_vocab+1] and advances `cache.length` by L.

        The encoder (and condition) keys/values are projected on the first call and reused afterwards, so pass
        the same states on every call with one cache.
        """
        start, length = cache.length, prev_tokens.shape[1]
        # New query i (position start+i) sees cached keys 0..start+i. As in min-dalle, the queries attend over
        # the whole buffer with the later (still zero) positions masked out, rather than over the filled prefix:
        # the same function, but this keeps the float sums in the original's order, so seeded draws match it.
        keys = torch.arange(cache.capacity, device=prev_tokens.device)
        queries = torch.arange(start, start + length, device=prev_tokens.device)
        self_mask = (keys[None, :] <= queries[:, None])[None, None]
        x = self._embed(prev_tokens, start)
        mask = key_mask(encoder_mask)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, encoder_state, mask, self_mask=self_mask, cache=layer_cache, start=start,
                      condition_state=condition_state, condition_mask=condition_mask)  # fmt: skip
        cache.length = start + length
        return self._head(x, return_hidden)
