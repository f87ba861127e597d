"""min-dalle's `VQGanDetokenizer`: image tokens -> pixels, the decoder half of the (dalle-mini) VQGAN f16/16384.

It is the taming decoder already used for minDALL-E (`storyexp.models.vqgan.layers.Decoder`, same key names),
with two differences that change the numbers: GroupNorm eps is torch's default 1e-5 (taming: 1e-6), and the output
is `clip(x, 0, 1)` with no `0.5 * x + 0.5`. Keys: `embedding.weight` [n_embed, embed_dim] (the codebook),
`post_quant_conv.*`, `decoder.*`.

The original hard-codes every size (16384 x 256 codebook, ch 128 x (1, 1, 2, 2, 4), 3 blocks a level, attention
at the 16 x 16 level, 16 x 16 tokens); here they are read from the state dict (`DetokenizerConfig.from_state_dict`)
and the token grid side from the number of tokens, so smaller decoders load with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import reduce

from torch import Tensor, nn

from storyexp.models.vqgan.config import VQGANHParams
from storyexp.models.vqgan.layers import Decoder
from storyexp.models.vqgan.precision import runs_in_fp32

GN_EPS = 1e-5  # torch's GroupNorm default, which min-dalle's detokenizer uses
GRID_SIDE = 16  # tokens per side in min-dalle; only names the attention levels (the network is convolutional)


@dataclass(frozen=True)
class DetokenizerConfig:
    n_embed: int = 2**14
    embed_dim: int = 2**8
    hparams: VQGANHParams = field(default_factory=VQGANHParams)  # min-dalle's sizes

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "DetokenizerConfig":
        """Sizes from tensor shapes: codebook, channel widths per level, blocks per level, attention levels."""
        n_embed, embed_dim = state["embedding.weight"].shape
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.up.")})
        widths = [int(state[f"decoder.up.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        ch = reduce(math.gcd, widths)
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("decoder.up.0.block.")}
        attn_levels = [i for i in levels if f"decoder.up.{i}.attn.0.norm.weight" in state]
        hparams = VQGANHParams(
            z_channels=int(state["decoder.conv_in.weight"].shape[1]),
            resolution=GRID_SIDE * 2 ** (len(levels) - 1),
            out_ch=int(state["decoder.conv_out.weight"].shape[0]),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=len(blocks) - 1,
            # up.<i> works at GRID_SIDE * 2^(n-1-i) (up.0 is the full resolution)
            attn_resolutions=tuple(GRID_SIDE * 2 ** (len(levels) - 1 - i) for i in attn_levels) or (GRID_SIDE,),
        )
        return cls(int(n_embed), int(embed_dim), hparams)


class VQGanDetokenizer(nn.Module):
    def __init__(self, config: DetokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or DetokenizerConfig()
        self.embedding = nn.Embedding(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.hparams.z_channels, 1)
        self.decoder = Decoder(**vars(config.hparams), eps=GN_EPS)

    @runs_in_fp32
    def decode_grid_tokens(self, tokens: Tensor) -> Tensor:
        """Token grids [B, h, w] -> pixels [B, out_ch, h*f, w*f] in [0, 1] (clip, no rescaling); fp32 with autocast
        off, as min-dalle decodes (every decode below goes through here; `storyexp.models.vqgan.precision`)."""
        z = self.embedding(tokens).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(z)).clip(0.0, 1.0)

    def forward(self, codes: Tensor) -> Tensor:
        """codes [B, side*side] (raster order) -> images [B, 3, R, R] in [0, 1]."""
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} tokens per image is not a square grid")
        return self.decode_grid_tokens(codes.reshape(codes.shape[0], side, side))

    def decode_grid(self, codes: Tensor, seamless: bool = False) -> Tensor:
        """g*g images' codes [g*g, side*side] -> one grid image [3, g*R, g*R] in [0, 1], min-dalle's placement:
        image k at row block k % g and column block k // g (the grid fills column by column).

        seamless: the g*g token grids are joined into one (g*side)^2 token grid with the same placement and
        decoded as a single image, so the tiles blend across their borders.
        """
        count, tokens = codes.shape
        g, side = math.isqrt(count), math.isqrt(tokens)
        if g * g != count or side * side != tokens:
            raise ValueError(f"decode_grid needs a square number of square token grids; got {tuple(codes.shape)}")
        if seamless:
            joined = codes.reshape(g, g, side, side).permute(1, 2, 0, 3).reshape(1, g * side, g * side)
            return self.decode_grid_tokens(joined)[0]
        images = self.forward(codes)  # [g*g, C, R, R]; image k = (column a = k // g, row b = k % g)
        c, r = images.shape[1], images.shape[-1]
        return images.reshape(g, g, c, r, r).permute(2, 1, 3, 0, 4).reshape(c, g * r, g * r)
