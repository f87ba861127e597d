"""The taming-transformers VQGAN (f16) as used by minDALL-E, loading its checkpoints unchanged.

diffusers' ``VQModel`` was considered and not used: its module tree and state-dict key names
(``encoder.down_blocks.*.resnets.*``, ``quantize.embedding`` vs taming's ``encoder.down.*.block.*``,
``decoder.up`` stored in ascending-resolution order, ``nin_shortcut``, ``q/k/v/proj_out`` convs ...) differ
from taming's, and minDALL-E's (and StoryDALL-E's) checkpoints must load strictly with their original key names,
without a conversion step that could silently drop or mis-map a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from storyexp.utils.loading import UnreadableFileError, check_state_dict, load_file

from .config import VQGANConfig
from .layers import Decoder, Encoder
from .precision import runs_in_fp32
from .quantize import VectorQuantizer


TAMING_LOSS_PREFIX = "loss."  # taming's VQModel keeps its VQLPIPSWithDiscriminator as `self.loss`


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> codebook -> post_quant_conv -> Decoder.

    Inputs are images in [-1, 1] of shape [B, in_channels, R, R]; the code grid is latent_dim x latent_dim
    (latent_dim = attn_resolutions[0], as minDALL-E computes it).
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        hp = vars(config.hparams)
        self.encoder = Encoder(**hp)
        self.decoder = Decoder(**hp)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.hparams.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.hparams.z_channels, 1)
        self.latent_dim = config.latent_dim

    # ------------------------------------------------------------------ the original's public methods
    def _pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> quantised latents [B, embed_dim, h, w] (codebook rows, channels first)."""
        return self.quantize(self._pre_quant(x))[0]

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, embed_dim, h, w] -> raw decoder output [B, out_ch, R, R] (not clamped)."""
        return self.decoder(self.post_quant_conv(quant))

    @runs_in_fp32
    def get_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> LongTensor [B, latent_dim**2] of nearest-codebook indices in raster (row-major) order.
        Always fp32, autocast off (the originals force it; `precision.py`)."""
        codes = self.quantize.codes(self._pre_quant(x))
        return codes.reshape(x.shape[0], self.latent_dim**2)

    @runs_in_fp32
    def decode_code(self, code: torch.Tensor) -> torch.Tensor:
        """Code grid [B, h, w] (int) -> raw decoder output [B, out_ch, R, R], fp32 with autocast off (the originals
        decode in fp32; `precision.py`). Not clamped; the samplers map pixels with clamp(x * 0.5 + 0.5, 0, 1)
        themselves."""
        if code.dim() != 3:
            raise ValueError(f"decode_code expects a code grid [B, h, w]; got shape {tuple(code.shape)}")
        return self.decode(self.quantize.lookup(code.long()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the reconstruction, raw."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ loading
    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], what: str = "VQGAN checkpoint") -> None:
        """Strictly load a VQGAN state dict with the original key names (or a ``{'state_dict': ...}`` wrapper).

        taming-transformers' own training checkpoints (``last.ckpt``) also hold the GAN loss (``loss.*``: LPIPS and
        discriminator), which is not part of the VQGAN; those keys are left out, every other key is checked.
        Raises :class:`storyexp.utils.loading.CheckpointMismatchError` (one line; ``what`` names the file) counting
        the missing / unexpected keys and shape mismatches, rather than torch's first-error behaviour, so a wrong
        checkpoint is diagnosed in one go.
        """
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not (isinstance(k, str) and k.startswith(TAMING_LOSS_PREFIX))}
        check_state_dict(self.state_dict(), state, what,
                         hint="use the VQGAN checkpoint that belongs to the configured stage-1 sizes (or the "
                              "sizes that belong to the checkpoint)")
        self.load_state_dict(state, strict=True)

    @classmethod
    def from_ckpt(cls, path: str | Path, config: VQGANConfig, what: str = "VQGAN checkpoint",
                  how_to_get: str = "Expected minDALL-E's stage1_last.ckpt.") -> VQGAN:
        """Build from ``config``, strictly load ``path`` (``{'state_dict': ...}``), return it in eval mode."""
        state = load_file(path, what, how_to_get=how_to_get)
        if not isinstance(state, Mapping):
            raise UnreadableFileError(f"VQGAN checkpoint {path} holds a {type(state).__name__}, not a state dict "
                                      "({'state_dict': ...}); pass a taming / minDALL-E stage-1 checkpoint.")
        model = cls(config)
        model.load_checkpoint_state(state, f"VQGAN checkpoint {path}")
        return model.eval()
