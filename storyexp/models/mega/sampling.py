"""min-dalle's image-token sampler (`generate_raw_image_stream` + `DalleBartDecoder.sample_tokens`).

Per step, on the logits of the newest position restricted to the first 2^14 columns (the VQGAN codebook; the
lm_head has image_vocab+1 rows, the rest are never sampled):

1. superconditioning: `l = uncond * (1 - f) + cond * f` (the unconditional rows come first in the batch);
2. top-k: keep the columns with `l >= k-th largest l` (ties with the k-th value are kept);
3. weights `exp((l - max l) / temperature)` on the kept columns, 0 elsewhere;
4. one `torch.multinomial(weights, 1)` per step for the whole batch.

Keeping exactly this order, the float32 settings tensor and one RNG call per step is what lets a run seeded like
the original (`torch.manual_seed(seed)`) draw the same tokens. The first input token is 2^14 - 1 = 16383
(min-dalle >= 0.4.11 and StoryDALL-E; the upstream config's `decoder_start_token_id` is 16384).

`decoder_step_weights` is one step up to the weights (1-3); `sample_image_tokens` is the loop of those steps and
the draws (4). The step is public so that a caller (the parity tests) can run the same loop with recorded tokens.

At factor 1 (StoryDALL-E's published sampler) step 1 is `uncond * 0 + cond * 1`, which is `cond` exactly for finite
logits, so the unconditional half contributes nothing: with `skip_unconditional` (the default) it is not computed at
all (`needs_unconditional`), halving the decoder's and the text encoder's work for the same tokens. min-dalle ran
both halves whatever the factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from storyexp.models.draws import Generators, multinomial

from .decoder import DalleBartDecoder, DecoderCache

START_TOKEN = 2**14 - 1
SAMPLED_VOCAB = 2**14


def needs_unconditional(supercondition_factor: float, skip_unconditional: bool = True) -> bool:
    """Whether the sampler must compute the unconditional half: always, unless `skip_unconditional` and the factor
    is 1 (then `uncond * 0 + cond * 1 == cond`: the half is multiplied by zero)."""
    return not (skip_unconditional and float(supercondition_factor) == 1.0)


def supercondition(logits: Tensor, factor: float | Tensor) -> Tensor:
    """[2B, V] logits (B unconditional rows, then B conditional rows) -> uncond * (1 - f) + cond * f, [B, V]."""
    factor = torch.as_tensor(factor, dtype=torch.float32, device=logits.device)
    half = logits.shape[0] // 2
    return logits[:half] * (1 - factor) + logits[half:] * factor


def topk_weights(logits: Tensor, top_k: int, temperature: float | Tensor = 1.0) -> Tensor:
    """Unnormalised multinomial weights: exp((l - max l) / temperature) where l >= the top_k-th largest, else 0."""
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    # min-dalle sorts the whole row; the k largest (torch.topk) are the same values at a fraction of the cost
    top = logits.topk(top_k, dim=-1).values
    kept = logits >= top[:, top_k - 1 : top_k]
    return ((logits - top[:, :1]) / temperature).exp() * kept.to(torch.float32)


def step_weights(logits: Tensor, *, top_k: int, temperature: float, supercondition_factor: float,
                 sampled_vocab: int = SAMPLED_VOCAB, unconditional: bool = True) -> Tensor:
    """The weights one sampling step draws from, given the step's full logits [2B, V] (uncond rows first), or
    [B, V] conditional rows alone with `unconditional=False` (factor 1, see `needs_unconditional`); only the first
    `sampled_vocab` columns (the codebook) can be drawn."""
    logits = logits[:, :sampled_vocab].float()
    mixed = supercondition(logits, supercondition_factor) if unconditional else logits
    return topk_weights(mixed, top_k, temperature)


def decoder_step_weights(
    decoder: DalleBartDecoder,
    prev: Tensor,
    encoder_state: Tensor,
    encoder_mask: Tensor,
    cache: DecoderCache,
    *,
    top_k: int,
    temperature: float,
    supercondition_factor: float,
    sampled_vocab: int = SAMPLED_VOCAB,
    condition_state: Tensor | None = None,
    condition_mask: Tensor | None = None,
    unconditional: bool = True,
) -> tuple[Tensor, Tensor]:
    """One sampling step: prev [B, 1] (each image's previous token) -> (logits [2B, V], weights [B, sampled_vocab]).
    With `unconditional=False` the cache, encoder state and logits hold the B conditional rows only.

    The token is fed to both halves of the batch (unconditional rows, then conditional rows), one cached decoder
    step advances `cache` by one position, and the newest position's logits give the superconditioned top-k
    weights the next token is drawn from (`multinomial(weights, 1, generator=...)`, as `sample_image_tokens` does).
    It is public so that a caller can run the loop itself, e.g. feed recorded tokens and compare what each step saw.
    """
    logits = decoder.step(prev.repeat(2, 1) if unconditional else prev, encoder_state, encoder_mask, cache,
                          condition_state=condition_state, condition_mask=condition_mask)[:, -1]  # fmt: skip
    weights = step_weights(logits, top_k=top_k, temperature=temperature, supercondition_factor=supercondition_factor,
                           sampled_vocab=sampled_vocab, unconditional=unconditional)  # fmt: skip
    return logits, weights


@torch.no_grad()
def sample_image_tokens(
    decoder: DalleBartDecoder,
    encoder_state: Tensor,
    encoder_mask: Tensor,
    *,
    top_k: int = 256,
    temperature: float = 1.0,
    supercondition_factor: float = 16.0,
    generator: Generators = None,
    num_tokens: int | None = None,
    start_token: int = START_TOKEN,
    sampled_vocab: int = SAMPLED_VOCAB,
    condition_state: Tensor | None = None,
    condition_mask: Tensor | None = None,
    unconditional: bool = True,
) -> Tensor:
    """Sample [B, num_tokens] image tokens (default: all decoder positions), one `decoder_step_weights` each.

    encoder_state [2B, S, D] / encoder_mask [2B, S]: the unconditional text rows first, then the conditional rows;
    with `unconditional=False` the B conditional rows only (factor 1: `needs_unconditional`).
    condition_state [2B, S', D] / condition_mask [2B, S'] (optional) feed the condition layers.
    start_token / sampled_vocab: the first decoder input and how many codebook columns can be drawn (min-dalle:
    16383 / 2^14; a model with another codebook, e.g. the demo's, passes its own).
    generator: for `torch.multinomial`; None draws from torch's global generator (as the original does); a list of
      generators draws each contiguous group of rows (one story's) from its own (`storyexp.models.draws`).
    """
    rows = encoder_state.shape[0]
    if unconditional and rows % 2:
        raise ValueError(f"encoder_state has {rows} rows; expected unconditional + conditional halves")
    if not unconditional and float(supercondition_factor) != 1.0:
        raise ValueError(f"supercondition_factor={supercondition_factor} needs the unconditional half")
    batch = rows // 2 if unconditional else rows
    steps = num_tokens or decoder.image_token_count
    cache = decoder.new_cache(rows, device=encoder_state.device)
    prev = torch.full((batch, 1), start_token, dtype=torch.long, device=encoder_state.device)
    tokens = []
    for _ in range(steps):
        _, weights = decoder_step_weights(
            decoder, prev, encoder_state, encoder_mask, cache, top_k=top_k, temperature=temperature,
            supercondition_factor=supercondition_factor, sampled_vocab=sampled_vocab,
            condition_state=condition_state, condition_mask=condition_mask, unconditional=unconditional,
        )  # fmt: skip
        prev = multinomial(weights, 1, generator=generator)  # one RNG call per step, as the original
        tokens.append(prev)
    return torch.cat(tokens, dim=1)
