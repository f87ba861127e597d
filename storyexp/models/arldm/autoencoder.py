"""A parameter-free, lossless stand-in for Stable Diffusion's VAE, for the CPU demo and tiny tests.

Why it exists: the demo must train AR-LDM end to end on a CPU in minutes, and SD's ``AutoencoderKL`` can be
neither downloaded here nor trained from scratch in that budget (a random VAE would make the latents
meaningless). Rearranging pixels into channels (``pixel_unshuffle``) gives a latent grid f times smaller, which
is what makes the UNet cheap, while staying exactly invertible: the diffusion model learns the pixels themselves.

It mimics the part of diffusers' ``AutoencoderKL`` interface the AR-LDM model uses:
``encode(x).latent_dist`` with ``.mean`` / ``.std`` / ``.sample(generator)`` / ``.mode()``, ``decode(z).sample``,
``config.latent_channels`` and ``config.scaling_factor``. The posterior is a point mass (std 0).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class PointPosterior:
    """A deterministic 'posterior': every sample is the mean."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean
        self.std = torch.zeros_like(mean)
        self.var = self.std

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclasses.dataclass
class EncoderOutput:
    latent_dist: PointPosterior


@dataclasses.dataclass
class DecoderOutput:
    sample: torch.Tensor


class PixelAutoencoder(nn.Module):
    """``pixel_unshuffle`` by ``factor``: images [N, C, H, W] <-> latents [N, C*f*f, H/f, W/f], losslessly."""

    def __init__(self, factor: int = 2, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = int(factor)
        # Images live in [-1, 1] and keep their scale in the latents, so 1.0 is the natural scaling factor.
        self.config = SimpleNamespace(
            in_channels=in_channels,
            out_channels=in_channels,
            latent_channels=in_channels * self.factor**2,
            scaling_factor=float(scaling_factor),
            downsampling_factor=self.factor,
        )

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder factor {self.factor}")
        posterior = PointPosterior(F.pixel_unshuffle(x, self.factor))
        return EncoderOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        x = F.pixel_shuffle(z, self.factor)
        return DecoderOutput(x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mean).sample
