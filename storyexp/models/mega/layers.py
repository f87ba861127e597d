"""The BART layers of min-dalle's DALL-E Mega port, plus StoryDALL-E's condition attention.

Arithmetic follows min-dalle 0.4.11 operation by operation, because the pretrained weights and the parity vectors
were produced with it:

- attention: q/k/v/out projections without bias; heads split as [B, T, H, C]; the *queries* are divided by
  sqrt(C) before the dot product; the key mask (True = attend) is added as `(1 - mask) * -1e12`, not -inf, then
  softmax;
- GLU: `fc2(ln1(gelu(fc0(ln0 z)) * fc1(ln0 z)))`, bias-free linears, exact GELU;
- "sandwich" norms: every attention sublayer is `x + ln_post(attn(ln_pre(x)))`; the GLU carries its own norms.

Fused attention: `MegaAttention(fused=True)` (the default; `model.network.fused_attention`) runs the same arithmetic
through torch's `F.scaled_dot_product_attention`: the queries are still divided by sqrt(C) first (SDPA then gets
scale 1), and the key mask is passed as the same *float* additive bias `(1 - mask) * -1e12`, so a fully masked row
still averages the values uniformly as in min-dalle (a bool mask would give NaN there). `fused=False` is min-dalle's
einsum + softmax. The two agree to float rounding (tests/test_fused_attention.py).

Attribute names equal min-dalle's, so `state_dict()` keys equal the converted files' keys.

Condition attention (StoryDALL-E): on the decoder layers where (i+1) % 3 == 0, a third sandwich attention after the
encoder cross-attention, before the GLU. Unlike the original, which passed the *text* encoder state to it (so the
source frame never reached the model), it attends to `condition_state` [B, S, D] with its own key mask. With
`gate_init="zero"` its output is multiplied by `tanh(condition_gate)`, a scalar initialised to 0, so a pretrained
decoder starts out computing exactly its original function; `gate_init="none"` is the original's ungated residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_VALUE = -1e12  # min-dalle's additive bias for masked keys
GATE_INITS = ("zero", "none")


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool key mask (True = attend), broadcastable to [B, H, Q, K] -> additive bias `(1 - mask) * -1e12`."""
    return ((1 - mask.to(torch.float32)) * MASK_VALUE).to(dtype)


def key_mask(mask: Tensor | None) -> Tensor | None:
    """[B, K] key mask -> [B, 1, 1, K] (the layout the attention adds); None stays None (attend to every key)."""
    return None if mask is None else mask[:, None, None, :]


class MegaAttention(nn.Module):
    """Multi-head attention with bias-free projections (keys `{q,k,v,out}_proj.weight`).

    fused: True = `F.scaled_dot_product_attention`, False = min-dalle's einsum + softmax (module docstring)."""

    has_fused_switch = True  # `storyexp.models.vqgan.layers.set_fused_attention` switches it

    def __init__(self, heads: int, dim: int, fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} attention heads do not divide the model width {dim}")
        self.heads = heads
        self.fused = fused
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.k_proj(context), self.v_proj(context)

    def attend(self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Projected queries [B, Q, D], keys/values [B, K, D]; mask bool broadcastable to [B, 1|H, Q, K]."""
        b, q_len, dim = queries.shape
        q = queries.reshape(b, q_len, self.heads, -1)
        k = keys.reshape(*keys.shape[:2], self.heads, -1)
        v = values.reshape(*values.shape[:2], self.heads, -1)
        q = q / q.shape[-1] ** 0.5
        if self.fused:
            bias = None if mask is None else mask_bias(mask, q.dtype)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=bias, scale=1.0)  # [B, H, Q, C]; q is scaled already
            return self.out_proj(out.transpose(1, 2).reshape(b, q_len, dim))
        weights = torch.einsum("bqhc,bkhc->bhqk", q, k)
        if mask is not None:
            weights = weights + mask_bias(mask, weights.dtype)
        weights = torch.softmax(weights, dim=-1)
        out = torch.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, q_len, dim)
        return self.out_proj(out)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
        """Attend from x to `context` (x itself when None); `kv` = precomputed `project_kv(context)`."""
        if kv is None:
            kv = self.project_kv(x if context is None else context)
        return self.attend(self.q_proj(x), *kv, mask)


class GLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(dim)
        self.ln1 = nn.LayerNorm(hidden)
        self.fc0 = nn.Linear(dim, hidden, bias=False)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, z: Tensor) -> Tensor:
        z = self.ln0(z)
        return self.fc2(self.ln1(F.gelu(self.fc0(z)) * self.fc1(z)))


class EncoderLayer(nn.Module):
    def __init__(self, heads: int, dim: int, glu_hidden: int):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = MegaAttention(heads, dim)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.glu = GLU(dim, glu_hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, T, D]; mask [B, 1, 1, T] bool (True = real token)."""
        x = x + self.self_attn_layer_norm(self.self_attn(self.pre_self_attn_layer_norm(x), mask=mask))
        return x + self.glu(x)


class LayerCache:
    """One decoder layer's cache: self-attention keys/values [N, T_max, D] written position by position, and the
    projected keys/values of the encoder state and of the condition state (computed on the first cached call;
    those states are constant while sampling, so recomputing them every step would only cost time)."""

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys, self.values = keys, values
        self.encoder_kv: tuple[Tensor, Tensor] | None = None
        self.condition_kv: tuple[Tensor, Tensor] | None = None


class DecoderLayer(nn.Module):
    """Sandwich causal self-attention -> sandwich encoder cross-attention -> [condition attention] -> GLU."""

    def __init__(self, heads: int, dim: int, glu_hidden: int, condition: bool = False, gate_init: str = "zero"):
        super().__init__()
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        self.pre_self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = MegaAttention(heads, dim)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.pre_encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = MegaAttention(heads, dim)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.has_condition = condition
        self.gated = condition and gate_init == "zero"
        if condition:
            self.pre_condition_attn_layer_norm = nn.LayerNorm(dim)
            self.condition_attn = MegaAttention(heads, dim)
            self.condition_attn_layer_norm = nn.LayerNorm(dim)
            if self.gated:
                self.condition_gate = nn.Parameter(torch.zeros(()))
        self.glu = GLU(dim, glu_hidden)

    def condition_branch(self, x: Tensor, condition_state: Tensor, condition_mask: Tensor | None = None,
                         kv: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
        """What this layer adds to x from the condition state: `[tanh(gate) *] ln(attn(ln(x), condition_state))`.

        condition_mask: [B, S] bool, True = attend (None: every condition position)."""
        h = self.pre_condition_attn_layer_norm(x)
        h = self.condition_attn(h, condition_state, key_mask(condition_mask), kv=kv)
        h = self.condition_attn_layer_norm(h)
        return torch.tanh(self.condition_gate) * h if self.gated else h

    def forward(
        self,
        x: Tensor,
        encoder_state: Tensor,
        encoder_mask: Tensor | None,
        *,
        self_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        start: int = 0,
        condition_state: Tensor | None = None,
        condition_mask: Tensor | None = None,
    ) -> Tensor:
        """x [N, L, D]; encoder_mask [N, 1, 1, S] bool.

        Without `cache`: self-attention over x itself under `self_mask` (the causal mask, [1, 1, L, L]).
        With `cache`: x holds the tokens at positions start..start+L-1; their keys/values are written into the
        cache and the queries attend to the whole cache buffer under `self_mask` ([1, 1, L, T_max], which hides
        the positions not written yet).
        """
        h = self.pre_self_attn_layer_norm(x)
        if cache is None:
            h = self.self_attn(h, mask=self_mask)
        else:
            end = start + h.shape[1]
            k, v = self.self_attn.project_kv(h)
            cache.keys[:, start:end] = k.to(cache.keys.dtype)
            cache.values[:, start:end] = v.to(cache.values.dtype)
            h = self.self_attn.attend(self.self_attn.q_proj(h), cache.keys, cache.values, self_mask)
        x = x + self.self_attn_layer_norm(h)

        h = self.pre_encoder_attn_layer_norm(x)
        enc_kv = None
        if cache is not None:
            if cache.encoder_kv is None:
                cache.encoder_kv = self.encoder_attn.project_kv(encoder_state)
            enc_kv = cache.encoder_kv
        h = self.encoder_attn(h, encoder_state, encoder_mask, kv=enc_kv)
        x = x + self.encoder_attn_layer_norm(h)

        if self.has_condition and condition_state is not None:
            cond_kv = None
            if cache is not None:
                if cache.condition_kv is None:
                    cache.condition_kv = self.condition_attn.project_kv(condition_state)
                cond_kv = cache.condition_kv
            x = x + self.condition_branch(x, condition_state, condition_mask, kv=cond_kv)

        return x + self.glu(x)
