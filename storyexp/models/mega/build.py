"""Config -> StoryDALL-E (DALL-E Mega backbone) networks (`model.network` in storyexp/conf/model/mega*.yaml).

    source: pretrained   min-dalle's files (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt; Mega or
                         Mini, sizes read from the tensors) + the taming VQGAN `last.ckpt` whose encoder turns the
                         source frame into tokens; frames are decoded by min-dalle's detokenizer
    source: sizes        encoder/decoder from the typed sizes `StoryMegaSizes` (`network.sizes`, `network.stage1`),
                         the tokenizer spelling the data vocabulary, and a stage-1 VQGAN of its own that both encodes
                         and decodes (the demo and the tiny test model; `storyexp.models.vqgan.build_stage1`)

The dataset's character names are added to the tokenizer as whole words and the text embedding is resized once,
to the tokenizer's size when that is larger (the original resized twice, leaving unused rows).

`weights_dtype` (float32 | float16 | bfloat16; default float32, as the original's `dtype=torch.float32`) is the
dtype the encoder and decoder are kept in; min-dalle distributes them in float16, so float16 keeps them as
distributed at half the memory. Stage 1 (the taming encoder, the detokenizer) stays float32 whatever it is.

`fused_attention` (default true): every attention (encoder, decoder, condition, taming encoder, detokenizer / stage-1
decoder) runs through torch's scaled_dot_product_attention; false: min-dalle's and taming's explicit matmul + softmax.

    built = build_storymega(network, story, characters)
    built = StoryMegaBuilder(story, characters).build(network)   # the same
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError
from storyexp.models.sources import NetworkBuilder, network_seed
from storyexp.models.vqgan import VQGAN, VQGANConfig, build_stage1
from storyexp.models.vqgan.build import fused_attention, set_fused_attention
from storyexp.utils.loading import UnreadableFileError, load_file

from .config import MegaSizes
from .model import MegaDalle
from .sampling import SAMPLED_VOCAB, START_TOKEN
from .story import word_tokenizer

VQGAN_HINT = (
    "StoryDALL-E (Mega) tokenizes the source frame with taming-transformers' vqgan_imagenet_f16_16384 "
    "`last.ckpt` (heidelberg heibox link in the taming-transformers README); put it at model.network.vqgan_encoder "
    "(README.md, 'Weights')."
)

WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weights_dtype(network: Mapping[str, Any]) -> torch.dtype:
    """`network.weights_dtype` as a torch dtype (ConfigurationError, one line, for any other value)."""
    name = network.get("weights_dtype", "float32")
    if name not in WEIGHTS_DTYPES:
        raise ConfigurationError(f"model.network.weights_dtype={name!r} is not valid: it must be one of "
                                 f"{list(WEIGHTS_DTYPES)}.")
    return WEIGHTS_DTYPES[name]


@dataclass(frozen=True)
class StoryMegaSizes:
    """The sizes of a `source: sizes` StoryDALL-E (Mega): stage 1 (`network.stage1`) and the BART pair
    (`network.sizes`)."""

    stage1: VQGANConfig
    sizes: MegaSizes

    @classmethod
    def from_network(cls, network: Mapping[str, Any]) -> "StoryMegaSizes":
        return cls(stage1=VQGANConfig.from_sizes(network.get("stage1"), "model.network.stage1"),
                   sizes=MegaSizes.from_dict(network.get("sizes"), "model.network.sizes"))


@dataclass
class StoryMegaComponents:
    stage1: VQGAN
    model: MegaDalle
    start_token: int  # first decoder input
    sampled_vocab: int  # codebook columns the sampler may draw


@dataclass
class StoryMegaBuilder(NetworkBuilder[StoryMegaComponents, StoryMegaComponents]):
    """`build(network)` -> `StoryMegaComponents` (see the module docstring).

    Args: `story` (model.story: condition, gate_init) and the dataset's `characters`.
    """

    story: Mapping[str, Any]
    characters: Sequence[str]

    def _condition(self) -> dict[str, Any]:
        return dict(condition_layers=bool(self.story.get("condition", True)),
                    gate_init=str(self.story.get("gate_init", "zero")))

    def from_pretrained(self, network: dict[str, Any]) -> StoryMegaComponents:
        torch.manual_seed(network_seed(network))  # condition layers and new embedding rows are reproducible
        model = MegaDalle.from_pretrained(str(network.get("min_dalle")), attention_heads=network.get("attention_heads"),
                                          dtype=weights_dtype(network), **self._condition())
        stage1 = _taming_encoder(network)
        return StoryMegaComponents(stage1=stage1, model=model, start_token=int(network.get("start_token", START_TOKEN)),
                                   sampled_vocab=SAMPLED_VOCAB)

    def from_sizes(self, network: dict[str, Any]) -> StoryMegaComponents:
        sizes = StoryMegaSizes.from_network(network)
        # seeded here, then the condition layers and new embedding rows follow on the same stream
        stage1 = build_stage1(sizes.stage1, network.get("stage1_checkpoint"), network_seed(network))
        tokenizer = word_tokenizer(list(network.get("words") or []))
        n_codes = stage1.config.n_embed
        config = sizes.sizes.to_config(text_vocab_count=tokenizer.vocab_size, image_vocab_count=n_codes,
                                       image_token_count=stage1.config.num_codes)
        model = MegaDalle(config, tokenizer, detokenizer=False, **self._condition())
        # the extra embedding row starts every image; only codes are drawn
        return StoryMegaComponents(stage1=stage1, model=model, start_token=n_codes, sampled_vocab=n_codes)

    def finish(self, parts: StoryMegaComponents, network: dict[str, Any]) -> StoryMegaComponents:
        model = parts.model
        fused = fused_attention(network)
        set_fused_attention(model, fused)  # encoder, decoder and the detokenizer
        set_fused_attention(parts.stage1, fused)
        model.tokenizer.add_tokens(list(self.characters))
        rows = model.encoder.embed_tokens.num_embeddings
        if model.tokenizer.vocab_size > rows:
            model.encoder.resize_token_embeddings(model.tokenizer.vocab_size)
        model.transformer_to(weights_dtype(network))  # pretrained: loaded in it already; sizes: built in fp32
        parts.stage1.requires_grad_(False).eval()
        if model.detokenizer is not None:
            model.detokenizer.requires_grad_(False).eval()
        return parts


def build_storymega(network: Mapping[str, Any], story: Mapping[str, Any],
                    characters: Sequence[str]) -> StoryMegaComponents:
    return StoryMegaBuilder(story, list(characters)).build(network)


def _taming_encoder(network: Mapping[str, Any]) -> VQGAN:
    """The taming f16/16384 VQGAN from `last.ckpt` (`state_dict`; `VQGAN.load_checkpoint_state` leaves out the GAN
    loss's `loss.*` keys)."""
    path = Path(str(network.get("vqgan_encoder")))
    what = "taming VQGAN checkpoint for the source frame (model.network.vqgan_encoder)"
    state = load_file(path, what, how_to_get=VQGAN_HINT)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise UnreadableFileError(f"{what} {path} holds a {type(state).__name__}, not a state dict; {VQGAN_HINT}")
    vqgan = VQGAN(VQGANConfig.from_dict(dict(network.get("vqgan_config") or {}), "model.network.vqgan_config"))
    vqgan.load_checkpoint_state(state, f"{what} {path}")
    return vqgan
