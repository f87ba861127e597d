"""Config -> StoryDALL-E (minDALL-E backbone) networks + tokenizer (`model.network` in conf/model/mindalle*.yaml).

    source: pretrained   a minDALL-E folder as distributed (config.yaml, stage1_last.ckpt, stage2_last.ckpt,
                         tokenizer/bpe-16k-*), optionally overlaid with a released StoryDALL-E `{epoch}.pth`
    source: sizes        stage 1 and stage 2 built from the sizes given here (the demo and the tiny test model);
                         the tokenizer spells the data config's vocabulary; stage 1 comes from `stage1_checkpoint`,
                         from a VQGAN fitted on the training split on first use (`stage1_fit`, see the system), or
                         stays random (tiny tests)

Either way the dataset's character names are appended to the tokenizer as whole-word tokens and the text
embedding/head grow to match (new rows N(0, 0.02)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.mindalle import Stage2Config, StoryDalleNet, load_storydalle_checkpoint
from storyexp.models.mindalle.model import CHECKPOINTS, TOKENIZER_FILES, read_config
from storyexp.models.mindalle.tokenizer import add_character_tokens, build_tokenizer, vocab_size, word_tokenizer
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.utils.loading import UnreadableFileError, load_file

SOURCES = ("pretrained", "sizes")
MINDALLE_HINT = (
    "Download minDALL-E 1.3B (https://arena.kakaocdn.net/brainrepo/models/minDALL-E/"
    "57b008f02ceaa02b779c8b7463143315/1.3B.tar.gz), unpack it and point model.network.mindalle at the folder "
    "(README.md, 'Weights')."
)


@dataclass
class StoryDalleComponents:
    stage1: VQGAN
    net: StoryDalleNet
    tokenizer: Any
    stage1_config: VQGANConfig


def build_storydalle(
    network: dict[str, Any], story: dict[str, Any], characters: list[str], story_len: int, sent_embed: int
) -> StoryDalleComponents:
    network = dict(network)
    source = network.get("source")
    seed = int(network.get("seed", 0))
    if source == "pretrained":
        stage1, stage2_cfg, tokenizer, stage2_state = _pretrained(network)
    elif source == "sizes":
        stage1, stage2_cfg, tokenizer = _from_sizes(network, seed)
        stage2_state = None
    else:
        raise ConfigurationError(f"model.network.source must be one of {SOURCES}, got {source!r}.")

    base_vocab = stage2_cfg.vocab_size_txt
    add_character_tokens(tokenizer, characters)
    torch.manual_seed(seed)  # story block, prompt and cross-attention inits are reproducible
    net = StoryDalleNet(
        stage2_cfg,
        story_len=story_len,
        sent_embed=sent_embed,
        condition=bool(story.get("condition", True)),
        gate_init=str(story.get("gate_init", "zero")),
        prompt=bool(story.get("prompt", False)),
        preseqlen=int(story.get("preseqlen", 32)),
        prefix_dropout=float(story.get("prefix_dropout", 0.1)),
        cross_every=int(story.get("cross_every", 3)),
    )
    if stage2_state is not None:
        net.stage2.load_checkpoint(stage2_state)
    grow = vocab_size(tokenizer) - base_vocab
    if grow > 0:
        net.grow_text_vocab(grow)

    released = network.get("init_from_storydalle")
    if released:
        path = Path(released)
        what = "StoryDALL-E checkpoint (model.network.init_from_storydalle)"
        state = load_file(path, what, how_to_get="The released PororoSV checkpoint is linked from the StoryDALL-E "
                                                 "README.")
        if not isinstance(state, Mapping):
            raise UnreadableFileError(f"{what} {path} holds a {type(state).__name__}, not a state dict; pass the "
                                      "released StoryDALL-E {epoch}.pth.")
        load_storydalle_checkpoint(net, state, stage1=stage1, what=f"{what} {path}")
        if net.cfg.vocab_size_txt < vocab_size(tokenizer):
            raise ConfigurationError(
                f"{path} has {net.cfg.vocab_size_txt} text embedding rows but the tokenizer emits "
                f"{vocab_size(tokenizer)} ids: were the checkpoint's characters the ones of this dataset?"
            )
    stage1.requires_grad_(False).eval()  # stage 1 is never trained by the story model
    return StoryDalleComponents(stage1=stage1, net=net, tokenizer=tokenizer, stage1_config=stage1.config)


def _pretrained(network: dict[str, Any]):
    folder = Path(str(network.get("mindalle")))
    needed = ("config.yaml", *CHECKPOINTS, *TOKENIZER_FILES)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise MissingResourceError(f"minDALL-E files {', '.join(missing)}", folder, MINDALLE_HINT)
    cfg = read_config(folder)
    stage1 = VQGAN.from_ckpt(folder / CHECKPOINTS[0], cfg["stage1"])
    tokenizer = build_tokenizer(folder / "tokenizer", cfg["context_length"], lowercase=True, dropout=None)
    return stage1, cfg["stage2"], tokenizer, folder / CHECKPOINTS[1]


def stage1_from_sizes(network: dict[str, Any], seed: int) -> VQGAN:
    """Stage 1 of a `source: sizes` model: `network.stage1` sizes, loaded from `stage1_checkpoint` when given, else
    random (seeded) until `stage1_fit` replaces it (see `StoryTokenSystem.prepare_data`)."""
    stage1_cfg = VQGANConfig.from_dict(dict(network["stage1"]))
    torch.manual_seed(seed)
    checkpoint = network.get("stage1_checkpoint")
    return VQGAN.from_ckpt(checkpoint, stage1_cfg) if checkpoint else VQGAN(stage1_cfg)


def _from_sizes(network: dict[str, Any], seed: int):
    stage1 = stage1_from_sizes(network, seed)
    stage1_cfg = stage1.config
    stage2 = dict(network["stage2"])
    tokenizer = word_tokenizer(list(network.get("words") or []), int(stage2["ctx_len_txt"]))
    stage2_cfg = Stage2Config.from_dict(
        {**stage2, "vocab_size_txt": vocab_size(tokenizer), "vocab_size_img": stage1_cfg.n_embed,
         "ctx_len_img": stage1_cfg.num_codes}
    )
    return stage1, stage2_cfg, tokenizer
