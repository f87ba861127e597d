"""minDALL-E stage 2: `Transformer1d`, a GPT-style decoder over the sequence [text tokens ; image codes].

Parameter names follow the original checkpoint layout (`tok_emb_img`, `blocks.<i>.attn.query`, `mlp.0`, ...), so
`stage2_last.ckpt`-style files load strictly with no key remapping.

The causal self-attention runs through torch's `F.scaled_dot_product_attention` (`CausalSelfAttention.fused`, the
default; `model.network.fused_attention`); `fused=False` is the original's explicit
`softmax(masked_fill(q k^T / sqrt(d), -inf)) v`. StoryDALL-E's cross-attention (`story.CrossAttention`) always uses
SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storyexp.utils.loading import UnreadableFileError, check_state_dict, load_file


class LayerKV:
    """One layer's preallocated ("static") keys and values [B, n_heads, capacity, head_dim], filled to `length`.

    The growing cache (a (k, v) pair per layer, `torch.cat` onto it every step) reallocates and copies the whole
    cache of every layer at every decoding step; this one is allocated once, on the first write (when batch, heads,
    dtype and device are known), and each step writes its new positions in place and attends over a view of the
    filled prefix. The keys and values attended to are the same numbers either way.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new positions k / v [B, nh, T, hd] after the filled ones; return views of all filled positions."""
        start, end = self.length, self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take positions {start}..{end - 1}")
        if self.keys is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class StaticKVCache(list):
    """A decoding cache allocated once: one `LayerKV` per layer, and `cross`, the projected keys / values of a
    constant attention source (StoryDALL-E's source frame), computed on the first step and reused by every later
    one (the growing path re-projects the whole source at every step)."""

    def __init__(self, n_layers: int, capacity: int):
        super().__init__(LayerKV(capacity) for _ in range(n_layers))
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def length(self) -> int:
        return self[0].length if self else 0


# Per layer either a growing (key, value) pair, each [B, n_heads, cached_len, head_dim], or a `LayerKV`
# (a `StaticKVCache`, preallocated; `model.sampler.static_cache`).
KVCache = list


@dataclass
class Stage2Config:
    """The `stage2:` block of a minDALL-E config (`vocab_size_*` at top level, the rest under `hparams`)."""

    vocab_size_txt: int = 16384
    vocab_size_img: int = 16384
    embed_dim: int = 1536
    n_layers: int = 42
    n_heads: int = 24
    n_dense_layers: int = 42  # kept for config compatibility; every block is dense in Transformer1d
    ctx_len_img: int = 256
    ctx_len_txt: int = 64
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    mlp_bias: bool = True
    attn_bias: bool = True
    gelu_use_approx: bool = False
    use_head_txt: bool = True

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> "Stage2Config":
        """Build from a `stage2:` mapping (plain dict or OmegaConf); unknown keys such as `type` are ignored."""
        try:  # OmegaConf nodes -> plain containers, without making omegaconf a hard dependency
            from omegaconf import OmegaConf

            if OmegaConf.is_config(block):
                block = OmegaConf.to_container(block, resolve=True)
        except ImportError:
            pass
        flat = {k: v for k, v in block.items() if k != "hparams"}
        flat.update(block.get("hparams") or {})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Stage2Config":
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.load(str(path))["stage2"])

    @property
    def ctx_len(self) -> int:
        return self.ctx_len_txt + self.ctx_len_img


class AttentionProjections(nn.Module):
    """The key/query/value/proj linears (minDALL-E's names) and dropouts every attention here shares, and how the
    heads attend (`attend`). fused: True = `F.scaled_dot_product_attention`, False = the original's explicit
    matmul + softmax."""

    has_fused_switch = True  # `storyexp.models.vqgan.layers.set_fused_attention` switches it

    def __init__(self, cfg: Stage2Config, fused: bool = True):
        super().__init__()
        self.fused = fused
        assert cfg.embed_dim % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.key = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.attn_bias)
        self.query = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.attn_bias)
        self.value = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.attn_bias)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Heads [B, nh, T, hd] attending to keys / values [B, nh, S, hd]; attn_mask bool [T, S] (True = visible)
        or None. SDPA (default 1/sqrt(head_dim) scale, softmax over keys) matches the original explicit
        softmax(q k^T / sqrt(d)) v to <1e-6 in float32, far inside the 1e-4 parity tolerance; the seeded sampler
        reproduces the reference codes exactly with either."""
        dropout = self.attn_pdrop if self.training else 0.0
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        att = (q @ k.transpose(-2, -1)) * (1.0 / k.shape[-1] ** 0.5)
        if attn_mask is not None:
            att = att.masked_fill(~attn_mask, float("-inf"))
        return F.dropout(torch.softmax(att, dim=-1), dropout, self.training) @ v


class CausalSelfAttention(AttentionProjections):
    """The causal self-attention over [text ; image], with its KV cache."""

    def __init__(self, cfg: Stage2Config, fused: bool = True):
        super().__init__(cfg, fused)
        # Lower-triangular mask over the whole [text ; image] context. Non-persistent: the original checkpoints
        # do not store it, and strict loading must not expect it.
        mask = torch.tril(torch.ones(cfg.ctx_len, cfg.ctx_len, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | LayerKV | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor] | LayerKV]:  # fmt: skip
        """x: [B, T, C] new positions; past: the P earlier positions' keys and values, as a growing (k, v) pair or
        a preallocated `LayerKV`. Returns (y, the cache for P+T: a new (k, v) pair, or the same `LayerKV`)."""
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # [B, nh, T, hd]
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        P = 0
        if isinstance(past, LayerKV):
            P = past.length
            k, v = past.append(k, v)
        elif past is not None:
            P = past[0].shape[-2]
            k = torch.cat([past[0], k], dim=-2)
            v = torch.cat([past[1], v], dim=-2)
        # New query i sits at absolute position P+i and may see keys 0..P+i. A single query (the usual cached
        # step) sees everything, so no mask is needed, as in the original's cached path.
        attn_mask = None if T == 1 else self.mask[P : P + T, : P + T]
        y = self.attend(q, k, v, attn_mask).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y)), past if isinstance(past, LayerKV) else (k, v)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1 x), then + mlp(ln2 x)."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.embed_dim)
        self.ln2 = nn.LayerNorm(cfg.embed_dim)
        self.attn = CausalSelfAttention(cfg)
        # Sequential indices 0 and 2 are the two Linears: that is where the checkpoint's `mlp.0` / `mlp.2` come from.
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim, bias=cfg.mlp_bias),
            nn.GELU(approximate="tanh" if cfg.gelu_use_approx else "none"),
            nn.Linear(4 * cfg.embed_dim, cfg.embed_dim, bias=cfg.mlp_bias),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | LayerKV | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor] | LayerKV]:  # fmt: skip
        a, present = self.attn(self.ln1(x), past)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, present


class Transformer1d(nn.Module):
    def __init__(self, cfg: Stage2Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb_img = nn.Embedding(cfg.vocab_size_img, cfg.embed_dim)
        self.tok_emb_txt = nn.Embedding(cfg.vocab_size_txt, cfg.embed_dim)
        # Text and image have separate 1-D position tables; both start at 0.
        self.pos_emb_img = nn.Embedding(cfg.ctx_len_img, cfg.embed_dim)
        self.pos_emb_txt = nn.Embedding(cfg.ctx_len_txt, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.embed_dim)
        self.head_img = nn.Linear(cfg.embed_dim, cfg.vocab_size_img, bias=False)
        if cfg.use_head_txt:
            self.head_txt = nn.Linear(cfg.embed_dim, cfg.vocab_size_txt, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # GPT-2 style init (N(0, 0.02), zero bias, unit LayerNorm); irrelevant when a checkpoint is loaded.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, path_or_state: str | Path | Mapping[str, Any],
                        what: str = "minDALL-E stage-2 checkpoint") -> "Transformer1d":
        """Strictly load `{'state_dict': ...}` (or a bare state dict) from a file or a mapping.

        Raises one `CheckpointMismatchError` counting every missing / unexpected key and shape mismatch.
        """
        state = path_or_state
        if isinstance(state, (str, Path)):
            path = state
            state = load_file(path, what, how_to_get="Expected minDALL-E's stage2_last.ckpt.")
            what = f"{what} {path}"
            if not isinstance(state, Mapping):
                raise UnreadableFileError(f"{what} holds a {type(state).__name__}, not a state dict "
                                          "({'state_dict': ...}); pass a minDALL-E stage-2 checkpoint.")
        if "state_dict" in state:
            state = state["state_dict"]
        check_state_dict(self.state_dict(), state, what,
                         hint="use the stage-2 checkpoint that belongs to the configured sizes (or the sizes that "
                              "belong to the checkpoint)")
        self.load_state_dict(state, strict=True)
        return self

    @classmethod
    def from_ckpt(cls, cfg: Stage2Config, path: str | Path) -> "Transformer1d":
        return cls(cfg).load_checkpoint(path).eval()

    # ------------------------------------------------------------------ full forward (training / scoring)
    def forward(self, images: Tensor, texts: Tensor, pos_images: Tensor, pos_texts: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, T] (T <= ctx_len_img), texts [B, N] (N == ctx_len_txt), positions alike.

        Returns (logits_img [B, T, V_img], logits_txt [B, N-1, V_txt]). Position N-1 (last text token) predicts
        image token 0, so image logits are read at N-1 .. N+T-2 and text logits at 0 .. N-2.
        """
        T, N = images.shape[1], texts.shape[1]
        assert T <= self.cfg.ctx_len_img, f"{T} image tokens > ctx_len_img {self.cfg.ctx_len_img}"
        assert N == self.cfg.ctx_len_txt, f"text length {N} != ctx_len_txt {self.cfg.ctx_len_txt}"
        x = torch.cat([self._embed_txt(texts, pos_texts), self._embed_img(images, pos_images)], dim=1)
        x = self.drop(x)
        for block in self.blocks:
            x, _ = block(x)
        x = self.ln_f(x)
        logits_img = self.head_img(x[:, N - 1 : -1])
        logits_txt = self.head_txt(x[:, : N - 1])
        return logits_img, logits_txt

    # ------------------------------------------------------------------ KV-cached decoding
    @torch.no_grad()
    def step(
        self,
        *,
        texts: Tensor | None = None,
        pos_texts: Tensor | None = None,
        images: Tensor | None = None,
        pos_images: Tensor | None = None,
        past: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Feed only the new positions (texts, then images, either may be absent) after a cache of earlier ones.

        Returns the image logits predicted by the LAST new position [B, V_img] and the grown cache. Decoding:
        step 0 feeds the whole text (its last position predicts code 0); step t feeds code t-1 at position t-1.
        `past` may be an empty `new_cache()` at step 0 (then it is filled in place and returned).
        """
        parts = []
        if texts is not None:
            parts.append(self._embed_txt(texts, pos_texts))
        if images is not None:
            parts.append(self._embed_img(images, pos_images))
        assert parts, "step() needs texts and/or images"
        x = self.drop(torch.cat(parts, dim=1))
        presents: KVCache = past if isinstance(past, StaticKVCache) else []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            if presents is not past:
                presents.append(kv)
        x = self.ln_f(x[:, -1])
        return self.head_img(x), presents

    def new_cache(self, extra_positions: int = 0) -> StaticKVCache:
        """An empty preallocated cache for a whole [text ; image] context (+ `extra_positions`, e.g. a prompt)."""
        return StaticKVCache(len(self.blocks), self.cfg.ctx_len + extra_positions)

    def _embed_txt(self, texts: Tensor, pos_texts: Tensor) -> Tensor:
        return self.tok_emb_txt(texts) + self.pos_emb_txt(pos_texts)

    def _embed_img(self, images: Tensor, pos_images: Tensor) -> Tensor:
        return self.tok_emb_img(images) + self.pos_emb_img(pos_images)


def positions_1d(x: Tensor) -> Tensor:
    """0..L-1 for every row of a [B, L] token tensor (minDALL-E's '1d' positional encoding)."""
    B, L = x.shape
    return torch.arange(L, device=x.device).unsqueeze(0).expand(B, L)
