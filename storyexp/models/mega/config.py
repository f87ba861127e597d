"""Sizes of a DALL-E Mega / Mini encoder-decoder pair, read from the tensors of `encoder.pt` and `decoder.pt`.

min-dalle hard-codes two size sets (Mega: 24+24 layers, d_model 2048, GLU 4096, 50272 text rows, image vocab
16415; Mini: 12 / 1024 / 2730 / 50264 / 16384). Reading them from the files instead makes any converted set
load, tiny test sets included. The only size the files cannot tell is the head count: min-dalle's models use
head dim 64, so it defaults to d_model / 64 (Mega 32, Mini 16).

A `source: sizes` model (the demo, the tiny tests) gives its sizes as `MegaSizes` (`model.network.sizes`); the
vocabularies and the image token count follow the tokenizer and stage 1 (`MegaSizes.to_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import Tensor

from storyexp.errors import ConfigurationError
from storyexp.models.sizes import parse_sizes
from storyexp.utils.loading import CheckpointMismatchError

from .loading import layer_count

HEAD_DIM = 64


@dataclass(frozen=True)
class MegaConfig:
    encoder_layers: int
    decoder_layers: int
    embed_count: int  # d_model
    glu_embed_count: int
    attention_head_count: int
    text_vocab_count: int  # rows of the text embedding (may exceed the tokenizer's vocabulary; see KM issue #93)
    text_token_count: int  # 64
    image_vocab_count: int  # decoder embed_tokens / lm_head have image_vocab_count + 1 rows
    image_token_count: int  # 256

    @classmethod
    def from_state_dicts(cls, encoder: Mapping[str, Tensor], decoder: Mapping[str, Tensor],
                         attention_heads: int | None = None, encoder_source: str = "encoder state dict",
                         decoder_source: str = "decoder state dict") -> "MegaConfig":  # fmt: skip
        """Sizes from the tensors; `*_source` name the files in the CheckpointMismatchError a bad file raises."""
        needed = (
            (encoder, encoder_source, ("embed_tokens.weight", "embed_positions.weight", "layers.0.glu.fc0.weight")),
            (decoder, decoder_source, ("embed_tokens.weight", "embed_positions.weight")),
        )
        for state, source, keys in needed:
            absent = [k for k in keys if k not in state]
            if absent:
                raise CheckpointMismatchError(
                    f"{source} lacks {', '.join(absent)}, needed to read the model sizes; pass min-dalle's converted "
                    "encoder.pt / decoder.pt."
                )
        text_rows, dim = encoder["embed_tokens.weight"].shape
        image_rows, dec_dim = decoder["embed_tokens.weight"].shape
        cfg = cls(
            encoder_layers=layer_count(encoder, source=encoder_source),
            decoder_layers=layer_count(decoder, source=decoder_source),
            embed_count=int(dim),
            glu_embed_count=int(encoder["layers.0.glu.fc0.weight"].shape[0]),
            attention_head_count=int(attention_heads or dim // HEAD_DIM),
            text_vocab_count=int(text_rows),
            text_token_count=int(encoder["embed_positions.weight"].shape[0]),
            image_vocab_count=int(image_rows) - 1,
            image_token_count=int(decoder["embed_positions.weight"].shape[0]),
        )
        if dec_dim != dim:
            raise CheckpointMismatchError(
                f"{encoder_source} (width {dim}) and {decoder_source} (width {dec_dim}) are not one model; pass the "
                "encoder.pt and decoder.pt of the same min-dalle model."
            )
        if cfg.attention_head_count < 1 or dim % cfg.attention_head_count:
            raise ConfigurationError(f"{cfg.attention_head_count} attention heads do not divide d_model {dim}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MegaSizes:
    """`model.network.sizes` of a `source: sizes` model: encoder and decoder both have `layers` layers."""

    layers: int
    width: int  # d_model
    heads: int
    glu: int  # GLU hidden width
    text_tokens: int  # caption length in tokens

    DERIVED = {
        "text_vocab_count": "it is the tokenizer's size (model.network.words + the dataset's characters)",
        "image_vocab_count": "it is stage 1's codebook size (model.network.stage1.n_embed)",
        "image_token_count": "it is stage 1's code count (model.network.stage1.hparams.attn_resolutions[0] squared)",
    }

    @classmethod
    def from_dict(cls, block: Mapping | None, where: str = "model.network.sizes") -> "MegaSizes":
        return parse_sizes(cls, block, where, reasons=cls.DERIVED)

    def to_config(self, text_vocab_count: int, image_vocab_count: int, image_token_count: int) -> MegaConfig:
        return MegaConfig(
            encoder_layers=self.layers, decoder_layers=self.layers, embed_count=self.width,
            glu_embed_count=self.glu, attention_head_count=self.heads, text_vocab_count=text_vocab_count,
            text_token_count=self.text_tokens, image_vocab_count=image_vocab_count,
            image_token_count=image_token_count,
        )
