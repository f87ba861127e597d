"""Building blocks of the taming-transformers VQGAN encoder/decoder, written in plain ``torch.nn``.

Attribute names (``norm1``, ``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/``proj_out``, ``downsample.conv`` ...)
are chosen so that ``state_dict()`` keys equal those of taming / minDALL-E checkpoints; do not rename them.

Fused attention: `AttnBlock(fused=True)` (the default) computes its attention with torch's
`F.scaled_dot_product_attention` (one kernel, no [hw, hw] weight matrix kept for the backward on the
memory-efficient / flash backends); `fused=False` is taming's explicit `softmax(q k^T / sqrt(c)) v` with two bmm.
They agree to float rounding (tests/test_fused_attention.py). `set_fused_attention(module, flag)` switches every
attention module under `module` that has the switch (these blocks, Mega's `MegaAttention`, minDALL-E's
`CausalSelfAttention`); the builders apply `model.network.fused_attention` with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NUM_GROUPS

# taming's Normalize uses eps 1e-6 (not torch's default 1e-5; it changes outputs measurably). min-dalle's VQGAN
# detokenizer (DALL-E Mega) is the same decoder with torch's default 1e-5, hence the `eps` parameters below.
TAMING_GN_EPS = 1e-6


def normalize(channels: int, eps: float = TAMING_GN_EPS) -> nn.GroupNorm:
    # 32 groups, affine; `eps` defaults to taming's 1e-6.
    return nn.GroupNorm(NUM_GROUPS, channels, eps=eps, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x), i.e. SiLU; F.silu computes the same function.
    return F.silu(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, swish, conv3x3) twice, plus a 1x1 ``nin_shortcut`` when the channel
    count changes. taming's time-embedding branch is never used by the VQGAN (temb_ch=0), so it is absent."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, eps: float = TAMING_GN_EPS):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


def set_fused_attention(module: nn.Module, fused: bool) -> int:
    """Set `fused` on every submodule of `module` (itself included) whose class declares `has_fused_switch`;
    returns how many were set (0 means the module has no switchable attention)."""
    count = 0
    for sub in module.modules():
        if getattr(type(sub), "has_fused_switch", False):
            sub.fused = bool(fused)
            count += 1
    return count


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions, with 1x1 convs for q/k/v/proj_out.

    fused: True = `F.scaled_dot_product_attention`; False = taming's explicit bmm + softmax (module docstring)."""

    has_fused_switch = True

    def __init__(self, channels: int, eps: float = TAMING_GN_EPS, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.norm = normalize(channels, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.fused:
            # one head: [b, 1, hw, c]; SDPA's default scale is c**-0.5, as below
            q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
            return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # [b, hw, c]
        k = self.k(y).reshape(b, c, h * w)  # [b, c, hw]
        v = self.v(y).reshape(b, c, h * w)  # [b, c, hw]
        attn = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # [b, hw_query, hw_key]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)  # out[:, :, i] = sum_j attn[i, j] v[:, :, j]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv. taming pads asymmetrically (right/bottom only, zeros)
    and uses padding=0 in the conv, which differs from a symmetric padding=1 conv; keep it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """The bottleneck: res block, attention, res block (keys ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``)."""

    def __init__(self, channels: int, dropout: float, eps: float = TAMING_GN_EPS):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, eps)
        self.attn_1 = AttnBlock(channels, eps)
        self.block_2 = ResnetBlock(channels, channels, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block.<j>`` res blocks, each followed by ``attn.<j>`` when this level's
    resolution is in attn_resolutions, then an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], with_attn: bool, resample: nn.Module | None, resample_name: str,
                 eps: float = TAMING_GN_EPS):  # fmt: skip
        super().__init__()
        self.block = nn.ModuleList(blocks)
        # An empty ModuleList adds no state_dict keys, matching taming where levels without attention
        # still own an (empty) `attn` list.
        self.attn = nn.ModuleList([AttnBlock(b.out_channels, eps) for b in blocks] if with_attn else [])
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        resample = getattr(self, self.resample_name, None)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    """Image [B, in_channels, R, R] -> latent [B, z_channels (x2 if double_z), R/2^(L-1), R/2^(L-1)]."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels, z_channels,
                 double_z=False, pdrop=0.0, out_ch=None, eps: float = TAMING_GN_EPS):  # fmt: skip
        super().__init__()
        del out_ch  # shared hparams block; only the decoder uses it
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, res = [], resolution
        in_mult = (1, *ch_mult)  # level i goes from ch*in_mult[i] to ch*ch_mult[i] channels
        for i, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[i], ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, pdrop, eps) for j in range(num_res_blocks)]
            last = i == len(ch_mult) - 1
            down = None if last else Downsample(c_out)
            levels.append(_Level(blocks, res in attn_resolutions, down, "downsample", eps))
            if not last:
                res //= 2
        self.down = nn.ModuleList(levels)
        c = ch * ch_mult[-1]
        self.mid = _Mid(c, pdrop, eps)
        self.norm_out = normalize(c, eps)
        self.conv_out = nn.Conv2d(c, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, r, r] -> image [B, out_ch, r*2^(L-1), ...] (raw, unbounded).

    Each level has num_res_blocks + 1 res blocks. ``up.<i>`` is indexed in *ascending resolution* order
    (up.0 is the full-resolution level, as in the checkpoints), but run from the last index to the first.
    `eps` is the GroupNorm epsilon: taming's 1e-6 by default, torch's 1e-5 for min-dalle's detokenizer.
    """

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_ch, z_channels,
                 pdrop=0.0, in_channels=None, double_z=None, eps: float = TAMING_GN_EPS):  # fmt: skip
        super().__init__()
        del in_channels, double_z  # shared hparams block; encoder-only
        n = len(ch_mult)
        c = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Mid(c, pdrop, eps)
        levels: list[_Level] = [None] * n  # type: ignore[list-item]
        for i in reversed(range(n)):  # build in execution order, store at index i
            c_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out, pdrop, eps))
                c = c_out
            up = Upsample(c) if i != 0 else None
            levels[i] = _Level(blocks, res in attn_resolutions, up, "upsample", eps)
            if i != 0:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(c, eps)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))
