"""Config -> StoryDALL-E (minDALL-E backbone) networks + tokenizer (`model.network` in storyexp/conf/model/mindalle*.yaml).

    source: pretrained   a minDALL-E folder as distributed (config.yaml, stage1_last.ckpt, stage2_last.ckpt,
                         tokenizer/bpe-16k-*), read by `load_mindalle_folder` (the reader `MinDalle.from_pretrained`
                         uses), optionally overlaid with a released StoryDALL-E `{epoch}.pth`
    source: sizes        stage 1 and stage 2 built from the typed sizes `StoryDalleSizes` (`network.stage1`,
                         `network.stage2`; the demo and the tiny test model); the tokenizer spells the data config's
                         vocabulary; stage 1 comes from `stage1_checkpoint`, from a VQGAN fitted on the training
                         split on first use (`stage1_fit`, see the system), or stays random (tiny tests)

Either way the dataset's character names are appended to the tokenizer as whole-word tokens and the text
embedding/head grow to match (new rows N(0, 0.02)).

`fused_attention` (default true): stage 2's causal self-attention and stage 1's attention blocks run through torch's
scaled_dot_product_attention; false: the original's explicit matmul + softmax (the story model's cross-attention
always uses scaled_dot_product_attention).

    built = build_storydalle(network, story, characters, story_len=4, sent_embed=512)
    built = StoryDalleBuilder(story, characters, story_len=4, sent_embed=512).build(network)   # the same
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storyexp.errors import ConfigurationError
from storyexp.models.sizes import parse_sizes
from storyexp.models.sources import NetworkBuilder, network_seed, original_name_tokens
from storyexp.models.vqgan import VQGAN, VQGANConfig, build_stage1
from storyexp.models.vqgan.build import fused_attention, set_fused_attention
from storyexp.utils.loading import UnreadableFileError, load_file

from .model import load_mindalle_folder
from .story import StoryDalleNet, load_storydalle_checkpoint
from .tokenizer import add_character_tokens, vocab_size, word_tokenizer
from .transformer import Stage2Config

_D = Stage2Config  # the defaults of the optional sizes are minDALL-E's own


@dataclass(frozen=True)
class Stage2Sizes:
    """`model.network.stage2` of a `source: sizes` model: the transformer's sizes. The vocabularies and the image
    context are not set here: they follow the tokenizer and stage 1 (`to_config`)."""

    embed_dim: int
    n_layers: int
    n_heads: int
    ctx_len_txt: int
    embd_pdrop: float = _D.embd_pdrop
    resid_pdrop: float = _D.resid_pdrop
    attn_pdrop: float = _D.attn_pdrop
    mlp_bias: bool = _D.mlp_bias
    attn_bias: bool = _D.attn_bias
    gelu_use_approx: bool = _D.gelu_use_approx
    use_head_txt: bool = _D.use_head_txt
    n_dense_layers: int = _D.n_dense_layers  # kept for config compatibility (unused, as in Stage2Config)

    DERIVED = {
        "vocab_size_txt": "it is the tokenizer's size (model.network.words + the dataset's characters)",
        "vocab_size_img": "it is stage 1's codebook size (model.network.stage1.n_embed)",
        "ctx_len_img": "it is stage 1's code count (model.network.stage1.hparams.attn_resolutions[0] squared)",
    }

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None, where: str = "model.network.stage2") -> "Stage2Sizes":
        return parse_sizes(cls, block, where, reasons=cls.DERIVED)

    def to_config(self, vocab_size_txt: int, vocab_size_img: int, ctx_len_img: int) -> Stage2Config:
        return Stage2Config(vocab_size_txt=vocab_size_txt, vocab_size_img=vocab_size_img, ctx_len_img=ctx_len_img,
                            **dataclasses.asdict(self))


@dataclass(frozen=True)
class StoryDalleSizes:
    """The sizes of a `source: sizes` StoryDALL-E: stage 1 (`network.stage1`) and stage 2 (`network.stage2`)."""

    stage1: VQGANConfig
    stage2: Stage2Sizes

    @classmethod
    def from_network(cls, network: Mapping[str, Any]) -> "StoryDalleSizes":
        return cls(stage1=VQGANConfig.from_sizes(network.get("stage1"), "model.network.stage1"),
                   stage2=Stage2Sizes.from_dict(network.get("stage2"), "model.network.stage2"))


@dataclass
class StoryDalleComponents:
    stage1: VQGAN
    net: StoryDalleNet
    tokenizer: Any
    stage1_config: VQGANConfig


@dataclass
class StoryDalleParts:
    """What either source gives before the story model is assembled."""

    stage1: VQGAN
    stage2_config: Stage2Config
    tokenizer: Any
    stage2_checkpoint: Path | None = None  # pretrained: loaded into the story model's stage 2


@dataclass
class StoryDalleBuilder(NetworkBuilder[StoryDalleParts, StoryDalleComponents]):
    """`build(network)` -> `StoryDalleComponents` (see the module docstring).

    Args: `story` (model.story: condition, gate_init, prompt, preseqlen, prefix_dropout, cross_every), the dataset's
    `characters`, `story_len` (target frames per story) and `sent_embed` (sentence-embedding width).
    """

    story: Mapping[str, Any]
    characters: Sequence[str]
    story_len: int
    sent_embed: int

    def from_pretrained(self, network: dict[str, Any]) -> StoryDalleParts:
        folder = load_mindalle_folder(Path(str(network.get("mindalle"))))
        return StoryDalleParts(folder.stage1, folder.stage2_config, folder.tokenizer, folder.stage2_checkpoint)

    def from_sizes(self, network: dict[str, Any]) -> StoryDalleParts:
        sizes = StoryDalleSizes.from_network(network)
        stage1 = build_stage1(sizes.stage1, network.get("stage1_checkpoint"), network_seed(network))
        tokenizer = word_tokenizer(list(network.get("words") or []), sizes.stage2.ctx_len_txt)
        stage2_cfg = sizes.stage2.to_config(vocab_size_txt=vocab_size(tokenizer), vocab_size_img=stage1.config.n_embed,
                                            ctx_len_img=stage1.config.num_codes)
        return StoryDalleParts(stage1, stage2_cfg, tokenizer)

    def finish(self, parts: StoryDalleParts, network: dict[str, Any]) -> StoryDalleComponents:
        story, tokenizer, stage1 = self.story, parts.tokenizer, parts.stage1
        fused = fused_attention(network)
        base_vocab = parts.stage2_config.vocab_size_txt
        add_character_tokens(tokenizer, list(self.characters),
                             whole_words=not original_name_tokens(network, "init_from_storydalle"))
        torch.manual_seed(network_seed(network))  # story block, prompt and cross-attention inits are reproducible
        net = StoryDalleNet(
            parts.stage2_config,
            story_len=self.story_len,
            sent_embed=self.sent_embed,
            condition=bool(story.get("condition", True)),
            gate_init=str(story.get("gate_init", "zero")),
            prompt=bool(story.get("prompt", False)),
            preseqlen=int(story.get("preseqlen", 32)),
            prefix_dropout=float(story.get("prefix_dropout", 0.1)),
            cross_every=int(story.get("cross_every", 3)),
        )
        if parts.stage2_checkpoint is not None:
            net.stage2.load_checkpoint(parts.stage2_checkpoint)
        grow = vocab_size(tokenizer) - base_vocab
        if grow > 0:
            net.grow_text_vocab(grow)

        released = network.get("init_from_storydalle")
        if released:
            _load_released(net, stage1, tokenizer, Path(released))
        stage1.requires_grad_(False).eval()  # stage 1 is never trained by the story model
        set_fused_attention(net, fused)
        set_fused_attention(stage1, fused)
        return StoryDalleComponents(stage1=stage1, net=net, tokenizer=tokenizer, stage1_config=stage1.config)


def build_storydalle(network: Mapping[str, Any], story: Mapping[str, Any], characters: Sequence[str],
                     story_len: int, sent_embed: int) -> StoryDalleComponents:
    return StoryDalleBuilder(story, list(characters), story_len, sent_embed).build(network)


def _load_released(net: StoryDalleNet, stage1: VQGAN, tokenizer, path: Path) -> None:
    """A released StoryDALL-E `{epoch}.pth` (model_state_dict layout) over the built net, strictly."""
    what = "StoryDALL-E checkpoint (model.network.init_from_storydalle)"
    state = load_file(path, what, how_to_get="The released PororoSV checkpoint is linked from the StoryDALL-E README.")
    if not isinstance(state, Mapping):
        raise UnreadableFileError(f"{what} {path} holds a {type(state).__name__}, not a state dict; pass the "
                                  "released StoryDALL-E {epoch}.pth.")
    load_storydalle_checkpoint(net, state, stage1=stage1, what=f"{what} {path}")
    if net.cfg.vocab_size_txt < vocab_size(tokenizer):
        raise ConfigurationError(
            f"{path} has {net.cfg.vocab_size_txt} text embedding rows but the tokenizer emits "
            f"{vocab_size(tokenizer)} ids: were the checkpoint's characters the ones of this dataset?"
        )
