"""CLIP text encoder of AR-LDM (transformers ``CLIPTextModel``) and the two table resizes AR-LDM applies to it.

AR-LDM pads captions to S tokens without truncation, so the 77-row position table is extended to S, and the
character names added to the tokenizer need token rows. Both resizes keep the first min(old, new) rows.
New rows: ``init="original"`` reproduces what the original constructor produced (PyTorch's default N(0, 1) for
a bare ``nn.Embedding``, because CLIP's weight init never touches it); ``init="mean"`` starts them at the mean
of the existing rows, which is the gentler choice when fine-tuning from real weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel


def build_clip_text_encoder(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    hidden_act: str = "quick_gelu",
    layer_norm_eps: float = 1e-5,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder of the given sizes (tiny tests, the demo, checkpoint loading)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        projection_dim=hidden_size,
        bos_token_id=bos_token_id,
        # pooler_output uses eos_token_id; AR-LDM only reads last_hidden_state, so any valid id is fine.
        eos_token_id=eos_token_id if eos_token_id is not None else vocab_size - 1,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def load_clip_text_encoder(folder: str | Path) -> CLIPTextModel:
    """Load a diffusers-layout ``text_encoder`` folder (config.json + model.safetensors / pytorch_model.bin)."""
    return CLIPTextModel.from_pretrained(str(folder))


def _new_rows(old: torch.Tensor, n_new: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    if init == "original":
        return torch.randn((n_new, old.shape[1]), generator=generator, dtype=old.dtype)
    if init == "mean":
        return old.detach().float().mean(0, keepdim=True).expand(n_new, -1).to(old.dtype).cpu()
    raise ValueError(f"unknown init {init!r}: expected 'original' or 'mean'")


def _resize_embedding(
    emb: nn.Embedding, n: int, init: str, generator: torch.Generator | None
) -> nn.Embedding:
    old = emb.weight.data
    weight = torch.empty((n, old.shape[1]), dtype=old.dtype)
    keep = min(old.shape[0], n)
    weight[:keep] = old[:keep].cpu()
    if n > old.shape[0]:
        weight[old.shape[0] :] = _new_rows(old, n - old.shape[0], init, generator)
    new = nn.Embedding(n, old.shape[1], padding_idx=emb.padding_idx, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(old.device))
    new.weight.requires_grad_(emb.weight.requires_grad)
    return new


def resize_token_embeddings(
    model: CLIPTextModel, num_tokens: int, init: str = "original", generator: torch.Generator | None = None
) -> None:
    """Resize the token table to ``num_tokens`` (= ``len(tokenizer)``), keeping existing rows."""
    emb = model.embeddings.token_embedding
    if emb.num_embeddings != num_tokens:
        model.embeddings.token_embedding = _resize_embedding(emb, num_tokens, init, generator)
        model.config.vocab_size = num_tokens


def extend_position_embeddings(
    model: CLIPTextModel, num_positions: int, init: str = "original", generator: torch.Generator | None = None
) -> None:
    """Make the position table ``num_positions`` long (AR-LDM's S), keeping the first min(old, new) rows.

    Also updates ``config.max_position_embeddings`` and the ``position_ids`` buffer (arange(S)).
    """
    embeddings = model.embeddings
    emb = embeddings.position_embedding
    if emb.num_embeddings != num_positions:
        embeddings.position_embedding = _resize_embedding(emb, num_positions, init, generator)
    model.config.max_position_embeddings = num_positions
    buffer = embeddings.position_ids
    embeddings.position_ids = torch.arange(num_positions, device=buffer.device, dtype=buffer.dtype).expand((1, -1))


def clip_state_dict_from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x CLIPTextModel names (``text_model.*`` + ``position_ids``) -> this version's names."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):  # a constant arange, not stored any more
            continue
        out[key[len("text_model.") :] if key.startswith("text_model.") else key] = value
    return out
