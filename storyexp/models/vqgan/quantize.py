"""Nearest-neighbour vector quantiser with a learned codebook (``quantize.embedding.weight`` [n_embed, dim])."""

from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Maps every latent vector to its nearest codebook row (squared L2).

    minDALL-E's 1.3B stage 1 uses plain nearest-neighbour lookup at inference (no EMA statistics are stored in
    its checkpoint), so only the codebook is a parameter. The commitment loss (beta) is a training concern and
    is left to the caller.
    """

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> code indices [B, h, w] (int64)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # raster order: row-major over (h, w)
        e = self.embedding.weight
        # Expanded ||z||^2 + ||e||^2 - 2 z.e, the same formula (and summation order) as the original, so that
        # argmin picks the same entry even for near-ties; torch.cdist would round differently.
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """code indices [B, h, w] -> quantised latents [B, C, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (z_q [B, C, h, w] with a straight-through gradient to z, codes [B, h, w])."""
        codes = self.codes(z)
        z_q = self.lookup(codes)
        # Straight-through estimator: the value is z_q (to float rounding), the gradient flows to z.
        z_q = z + (z_q - z).detach()
        return z_q, codes
