"""Config -> StoryDALL-E (DALL-E Mega backbone) networks (`model.network` in conf/model/mega*.yaml).

    source: pretrained   min-dalle's files (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt; Mega or
                         Mini, sizes read from the tensors) + the taming VQGAN `last.ckpt` whose encoder turns the
                         source frame into tokens; frames are decoded by min-dalle's detokenizer
    source: sizes        encoder/decoder from the sizes given here, the tokenizer spelling the data vocabulary, and a
                         stage-1 VQGAN of its own that both encodes and decodes (the demo and the tiny test model)

The dataset's character names are added to the tokenizer as whole words and the text embedding is resized once,
to the tokenizer's size when that is larger (the original resized twice, leaving unused rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError
from storyexp.models.mega import MegaConfig, MegaDalle
from storyexp.models.mega.sampling import SAMPLED_VOCAB, START_TOKEN
from storyexp.models.mega.story import word_tokenizer
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.systems.storydalle_builder import stage1_from_sizes
from storyexp.utils.loading import UnreadableFileError, load_file

SOURCES = ("pretrained", "sizes")
VQGAN_HINT = (
    "StoryDALL-E (Mega) tokenizes the source frame with taming-transformers' vqgan_imagenet_f16_16384 "
    "`last.ckpt` (heidelberg heibox link in the taming-transformers README); put it at model.network.vqgan_encoder "
    "(README.md, 'Weights')."
)


@dataclass
class StoryMegaComponents:
    stage1: VQGAN
    model: MegaDalle
    start_token: int  # first decoder input
    sampled_vocab: int  # codebook columns the sampler may draw


def build_storymega(network: dict[str, Any], story: dict[str, Any], characters: list[str]) -> StoryMegaComponents:
    network = dict(network)
    source = network.get("source")
    seed = int(network.get("seed", 0))
    condition = dict(condition_layers=bool(story.get("condition", True)), gate_init=str(story.get("gate_init", "zero")))
    torch.manual_seed(seed)  # condition layers and new embedding rows are reproducible
    if source == "pretrained":
        model = MegaDalle.from_pretrained(str(network.get("min_dalle")), attention_heads=network.get("attention_heads"),
                                          **condition)
        stage1 = _taming_encoder(network)
        start, sampled = int(network.get("start_token", START_TOKEN)), SAMPLED_VOCAB
    elif source == "sizes":
        stage1 = stage1_from_sizes(network, seed)
        sizes = dict(network["sizes"])
        tokenizer = word_tokenizer(list(network.get("words") or []))
        n_codes = stage1.config.n_embed
        config = MegaConfig(
            encoder_layers=int(sizes["layers"]), decoder_layers=int(sizes["layers"]), embed_count=int(sizes["width"]),
            glu_embed_count=int(sizes["glu"]), attention_head_count=int(sizes["heads"]),
            text_vocab_count=tokenizer.vocab_size, text_token_count=int(sizes["text_tokens"]),
            image_vocab_count=n_codes, image_token_count=stage1.config.num_codes,
        )
        model = MegaDalle(config, tokenizer, detokenizer=False, **condition)
        start, sampled = n_codes, n_codes  # the extra embedding row starts every image; only codes are drawn
    else:
        raise ConfigurationError(f"model.network.source must be one of {SOURCES}, got {source!r}.")

    model.tokenizer.add_tokens(list(characters))
    rows = model.encoder.embed_tokens.num_embeddings
    if model.tokenizer.vocab_size > rows:
        model.encoder.resize_token_embeddings(model.tokenizer.vocab_size)
    stage1.requires_grad_(False).eval()
    if model.detokenizer is not None:
        model.detokenizer.requires_grad_(False).eval()
    return StoryMegaComponents(stage1=stage1, model=model, start_token=start, sampled_vocab=sampled)


def _taming_encoder(network: dict[str, Any]) -> VQGAN:
    """The taming f16/16384 VQGAN from `last.ckpt` (`state_dict`; the GAN loss's `loss.*` keys are not model)."""
    path = Path(str(network.get("vqgan_encoder")))
    what = "taming VQGAN checkpoint for the source frame (model.network.vqgan_encoder)"
    state = load_file(path, what, how_to_get=VQGAN_HINT)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise UnreadableFileError(f"{what} {path} holds a {type(state).__name__}, not a state dict; {VQGAN_HINT}")
    vqgan = VQGAN(VQGANConfig.from_dict(dict(network.get("vqgan_config") or {})))
    vqgan.load_checkpoint_state({k: v for k, v in state.items() if not k.startswith("loss.")}, f"{what} {path}")
    return vqgan
