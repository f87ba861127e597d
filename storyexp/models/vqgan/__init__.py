"""taming-transformers VQGAN (f16), as used by minDALL-E / StoryDALL-E stage 1; loads their checkpoints as-is."""

from .build import build_stage1
from .config import VQGANConfig, VQGANHParams
from .layers import AttnBlock, Decoder, Encoder, ResnetBlock
from .model import VQGAN
from .precision import runs_in_fp32
from .quantize import VectorQuantizer

__all__ = [
    "VQGAN",
    "AttnBlock",
    "Decoder",
    "Encoder",
    "ResnetBlock",
    "VQGANConfig",
    "VQGANHParams",
    "VectorQuantizer",
    "build_stage1",
    "runs_in_fp32",
]
