"""StoryDALL-E on DALL-E Mega: story-level training and sampling over a `MegaDalle` built with condition layers.

- The source frame's codes are embedded with the decoder's own `embed_tokens` + `embed_positions` (as the original
  does) and given to the condition attention of layers 2, 5, ..., with an all-ones key mask. The original passed
  the *text* encoder state to those layers, so the source frame never reached the model (storydalle.md §0.3).
- Loss: image-token cross-entropy only (the original's), teacher-forced from the start token.
- Sampling: min-dalle's KV-cached sampler (top-k, temperature, optional superconditioning = classifier-free
  guidance with the empty caption, which the original left disabled), per frame in the order of
  `storyexp.models.story_frames` (continuation, visualization, chain).

Shapes: texts [B, L, N] caption ids, images [B, L, T] codes of the L target frames, source_codes [B, T].
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from storyexp.models.draws import Generators, rand
from storyexp.models.story_frames import OnFrames, sample_story_frames

from .model import MegaDalle, unconditional_ids
from .sampling import needs_unconditional, sample_image_tokens
from .tokenizer import PAD_ID, WORD_START, MegaTokenizer

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # BART's ids 0..3; pad must be 1 (min-dalle pads with ones)


def condition_embeddings(model: MegaDalle, source_codes: Tensor, n_frames: int) -> Tensor:
    """[B, S] source codes -> [B * n_frames, S, D]: `embed_tokens + embed_positions`, repeated over the frames."""
    dec = model.decoder
    pos = torch.arange(source_codes.shape[1], device=source_codes.device)
    state = dec.embed_tokens(source_codes) + dec.embed_positions(pos)[None]
    return state.repeat_interleave(n_frames, dim=0)


def shift_right(codes: Tensor, start_token: int) -> Tensor:
    """Decoder inputs for teacher forcing: [start, codes[:, :-1]]."""
    return torch.cat([torch.full_like(codes[:, :1], start_token), codes[:, :-1]], dim=1)


def story_logits(model: MegaDalle, texts: Tensor, images: Tensor, source_codes: Tensor | None, *,
                 start_token: int, source_rows: Tensor | None = None) -> Tensor:
    """Teacher-forced logits [B*L, T, V] for every target frame. `source_rows` [L] (bool) marks the frames that
    attend to the source (visualization: frame 0 does not); the others run without the condition branch."""
    B, L, N = texts.shape
    ids = texts.reshape(B * L, N)
    prev = shift_right(images.reshape(B * L, -1), start_token)
    state = model.encode_text(ids)
    if source_codes is None:
        return model.decoder_logits(state, ids, prev)
    cond = condition_embeddings(model, source_codes, L)
    if source_rows is None or bool(source_rows.all()):
        return model.decoder_logits(state, ids, prev, cond)
    rows = source_rows.to(ids.device).repeat(B)
    out = None
    for keep, c in ((rows, cond), (~rows, None)):
        idx = keep.nonzero()[:, 0]
        part = model.decoder_logits(state[idx], ids[idx], prev[idx], None if c is None else c[idx])
        if out is None:
            out = part.new_empty(B * L, *part.shape[1:])
        out[idx] = part
    return out


def story_loss(model: MegaDalle, texts: Tensor, images: Tensor, source_codes: Tensor | None, *, start_token: int,
               source_rows: Tensor | None = None, text_dropout: float = 0.0,
               generator: Generators = None) -> dict[str, Tensor]:
    """Image-token CE. `text_dropout`: the fraction of frames whose caption is replaced by the empty one
    (`[<s>, </s>]`) so the model also learns the unconditional half that superconditioning needs; with one
    generator per story (`models.draws`) each story's frames are drawn from its own."""
    if text_dropout > 0:
        flat = texts.reshape(-1, texts.shape[-1])
        drop = rand(flat.shape[0], generator=generator, device=flat.device) < text_dropout
        texts = torch.where(drop[:, None], unconditional_ids(flat), flat).view_as(texts)
    logits = story_logits(model, texts, images, source_codes, start_token=start_token, source_rows=source_rows)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), images.reshape(-1))
    return {"loss": loss, "loss_img": loss}


@torch.no_grad()
def sample_story(model: MegaDalle, texts: Tensor, source_codes: Tensor | None, *, start_token: int,
                 sampled_vocab: int, top_k: int, temperature: float = 1.0, supercondition_factor: float = 1.0,
                 generator: Generators = None, chain: bool = False, skip_unconditional: bool = True,
                 on_frames: OnFrames | None = None) -> Tensor:
    """Codes [B, L, T] for texts [B, L, N]; see `storyexp.models.story_frames` for the frame order.
    `skip_unconditional`: at factor 1 the unconditional half is not computed (`sampling.needs_unconditional`).
    `on_frames`: optional `on_frames(first, codes [B, n, T])` after each group of frames is drawn (observes only)."""
    B, L, N = texts.shape
    halves = needs_unconditional(supercondition_factor, skip_unconditional)

    def draw(frames: list[int], source: Tensor | None) -> Tensor:
        ids = texts[:, frames].reshape(B * len(frames), N)
        text = torch.cat([unconditional_ids(ids), ids], dim=0) if halves else ids
        cond = None if source is None else condition_embeddings(model, source, len(frames))
        if cond is not None and halves:
            cond = cond.repeat(2, 1, 1)
        codes = sample_image_tokens(
            model.decoder, model.encode_text(text), text != PAD_ID, top_k=top_k, temperature=temperature,
            supercondition_factor=supercondition_factor, generator=generator, start_token=start_token,
            sampled_vocab=sampled_vocab, condition_state=cond, unconditional=halves,
        )
        return codes.view(B, len(frames), -1)

    return sample_story_frames(draw, L, source_codes, chain, on_frames)


# ---------------------------------------------------------------------- tokenizers
def word_tokenizer(words: list[str], alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") -> MegaTokenizer:
    """A min-dalle tokenizer whose merges build each word (after 'Ġ') into one token, for the demo and tiny models;
    other text falls back to single characters (or `<unk>`)."""
    vocab: dict[str, int] = {name: i for i, name in enumerate(SPECIALS)}
    merges: dict[str, None] = {}
    for piece in [WORD_START, *alphabet, *(WORD_START + c for c in alphabet)]:
        vocab.setdefault(piece, len(vocab))
    for word in dict.fromkeys(w.lower() for w in words if w):
        current = WORD_START
        for ch in word:
            merges.setdefault(f"{current} {ch}")
            current += ch
            vocab.setdefault(current, len(vocab))
    return MegaTokenizer(vocab, list(merges))


def tokenizer_to_json(tokenizer: MegaTokenizer) -> str:
    ranked = sorted(tokenizer.merge_rank.items(), key=lambda kv: kv[1])
    return json.dumps({"vocab": tokenizer.vocab, "merges": [" ".join(pair) for pair, _ in ranked],
                       "added": tokenizer.added})


def tokenizer_from_json(text: str) -> MegaTokenizer:
    data: dict[str, Any] = json.loads(text)
    tokenizer = MegaTokenizer(data["vocab"], data["merges"])
    tokenizer.added = {k: int(v) for k, v in data["added"].items()}
    return tokenizer
