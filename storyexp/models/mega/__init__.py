"""DALL-E Mega / Mini as ported by min-dalle 0.4.11 (the backbone of StoryDALL-E's Mega variant): `MegaDalle`
(folder loader + public API), its tokenizer, BART encoder/decoder (with StoryDALL-E's condition attention, wired
to the condition state), the VQGAN detokenizer and the superconditioned top-k sampler. StoryDALL-E (Mega)'s
builder (`source: pretrained | sizes`, typed sizes) is `storyexp.models.mega.build`."""

from .config import MegaConfig, MegaSizes
from .decoder import DalleBartDecoder, DecoderCache, condition_layer_flags
from .detokenizer import DetokenizerConfig, VQGanDetokenizer
from .encoder import DalleBartEncoder
from .layers import GLU, DecoderLayer, EncoderLayer, MegaAttention
from .loading import load_checked, resolve_files
from .model import MegaDalle, is_condition_key, unconditional_ids
from .sampling import (
    START_TOKEN,
    decoder_step_weights,
    sample_image_tokens,
    step_weights,
    supercondition,
    topk_weights,
)
from .tokenizer import MegaTokenizer
from .build import StoryMegaBuilder, StoryMegaComponents, StoryMegaSizes, build_storymega

__all__ = [
    "GLU",
    "START_TOKEN",
    "DalleBartDecoder",
    "DalleBartEncoder",
    "DecoderCache",
    "DecoderLayer",
    "DetokenizerConfig",
    "EncoderLayer",
    "MegaAttention",
    "MegaConfig",
    "MegaSizes",
    "MegaDalle",
    "MegaTokenizer",
    "StoryMegaBuilder",
    "StoryMegaComponents",
    "StoryMegaSizes",
    "VQGanDetokenizer",
    "build_storymega",
    "condition_layer_flags",
    "decoder_step_weights",
    "is_condition_key",
    "load_checked",
    "resolve_files",
    "sample_image_tokens",
    "step_weights",
    "supercondition",
    "topk_weights",
    "unconditional_ids",
]
