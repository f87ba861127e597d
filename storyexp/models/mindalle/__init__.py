"""minDALL-E (kakaobrain) reimplementation: `MinDalle` (folder loader + public API), the CharBPE tokenizer,
Transformer1d (stage 2) and its sampler; stage 1 is the shared taming VQGAN in `storyexp.models.vqgan`.
StoryDALL-E's builder (`source: pretrained | sizes`, typed sizes) is `storyexp.models.mindalle.build`."""

from .model import MinDalle, MinDalleFolder, load_mindalle_folder
from .story import StoryDalleNet, load_storydalle_checkpoint
from .sampling import cutoff_topk_logits, cutoff_topp_probs, next_code_probs, next_code_step, sample_codes
from .tokenizer import build_tokenizer
from .transformer import KVCache, LayerKV, Stage2Config, StaticKVCache, Transformer1d, positions_1d
from .build import Stage2Sizes, StoryDalleBuilder, StoryDalleComponents, StoryDalleSizes, build_storydalle

__all__ = [
    "KVCache",
    "LayerKV",
    "StaticKVCache",
    "MinDalle",
    "MinDalleFolder",
    "Stage2Config",
    "Stage2Sizes",
    "StoryDalleBuilder",
    "StoryDalleComponents",
    "StoryDalleNet",
    "StoryDalleSizes",
    "Transformer1d",
    "build_storydalle",
    "build_tokenizer",
    "cutoff_topk_logits",
    "cutoff_topp_probs",
    "load_mindalle_folder",
    "load_storydalle_checkpoint",
    "next_code_probs",
    "next_code_step",
    "positions_1d",
    "sample_codes",
]
