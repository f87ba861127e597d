"""minDALL-E sampling: top-k / top-p cutoffs and the KV-cached autoregressive code sampler.

The per-step order is the original's: logits / temperature -> top-k on logits -> softmax -> top-p on probs ->
one `torch.multinomial` on the [candidates, vocab] probabilities. Keeping that order (and one RNG call per step)
is what lets a seeded run reproduce the reference codes exactly. `next_code_step` is one cached step up to the
probabilities; `sample_codes` is the loop of those steps and the draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from storyexp.models.draws import Generators, multinomial

from .transformer import KVCache, Transformer1d, positions_1d


def cutoff_topk_logits(logits: Tensor, k: int | None) -> Tensor:
    """Set logits strictly below each row's k-th largest value to -inf. Ties with the k-th value are kept."""
    if k is None:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def cutoff_topp_probs(probs: Tensor, p: float | None) -> Tensor:
    """Nucleus cutoff: drop an entry once the probability mass ranked strictly above it is already >= p.

    The top entry always survives (p=0 keeps only the top-1); the survivors are renormalised to sum to 1.
    """
    if p is None:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_probs, dim=-1)
    # Shift right by one: entry j is removed if the mass of entries 0..j-1 reaches p.
    remove_sorted = torch.zeros_like(cum, dtype=torch.bool)
    remove_sorted[..., 1:] = cum[..., :-1] >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to vocabulary order
    kept = probs.masked_fill(remove, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def next_code_probs(logits: Tensor, *, top_k: int | None, top_p: float | None, temperature: float = 1.0) -> Tensor:
    """The distribution one sampler step draws from, given raw image logits [B, V]."""
    logits = cutoff_topk_logits(logits.float() / temperature, top_k)
    return cutoff_topp_probs(F.softmax(logits, dim=-1), top_p)


def next_code_step(
    model: Transformer1d,
    texts: Tensor,
    codes: Tensor,
    past: KVCache | None,
    *,
    top_k: int | None,
    top_p: float | None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, KVCache]:
    """One cached sampler step: (logits [M, V], probs [M, V], past) for code t = codes.shape[1].

    texts [M, N]; codes [M, t]: the codes so far (t = 0: none). Step 0 feeds the whole text, whose last position
    predicts code 0, into `past` (None, or an empty `model.new_cache()`: preallocated); step t > 0 feeds only
    codes[:, -1] at image position t - 1 on top of `past` (the cache the previous step returned). The next code is drawn from `probs` (`sample_codes` makes one
    `multinomial(probs, 1, replacement=True)` per step). It is public so that a caller can run the loop itself,
    e.g. feed recorded codes and compare each step's probabilities.
    """
    t = codes.shape[1]
    if t == 0:
        logits, past = model.step(texts=texts, pos_texts=positions_1d(texts), past=past)
    else:
        prev = codes[:, -1:]
        logits, past = model.step(images=prev, pos_images=torch.full_like(prev, t - 1), past=past)
    probs = next_code_probs(logits, top_k=top_k, top_p=top_p, temperature=temperature)
    return logits, probs, past


@torch.no_grad()
def sample_codes(
    model: Transformer1d,
    texts: Tensor,
    *,
    top_k: int | None,
    top_p: float | None,
    temperature: float = 1.0,
    num_candidates: int = 1,
    generator: Generators = None,
    num_codes: int | None = None,
    static_cache: bool = True,
) -> Tensor:
    """Sample `num_codes` (default ctx_len_img) image codes per candidate, one `next_code_step` per code.

    texts: [N] or [1, N] ids (repeated to `num_candidates` rows) or already [num_candidates, N].
    generator: passed to `torch.multinomial`; None uses torch's global generator (as the original, which is
      seeded with `torch.manual_seed`); a list of generators draws each contiguous group of candidate rows from
      its own (`storyexp.models.draws`).
    static_cache: True = the KV cache is preallocated once and written in place (`StaticKVCache`); False = it
      grows by `torch.cat` every step, as in the original. The same codes either way.
    Returns codes [num_candidates, L].
    """
    if texts.dim() == 1:
        texts = texts.unsqueeze(0)
    if texts.shape[0] == 1 and num_candidates > 1:
        texts = texts.repeat(num_candidates, 1)
    assert texts.shape[0] == num_candidates, f"{texts.shape[0]} text rows for {num_candidates} candidates"
    L = num_codes or model.cfg.ctx_len_img

    codes = texts.new_zeros(texts.shape[0], L)  # written in place, one column per step
    past = model.new_cache() if static_cache else None
    for t in range(L):
        _, probs, past = next_code_step(model, texts, codes[:, :t], past, top_k=top_k, top_p=top_p,
                                        temperature=temperature)  # fmt: skip
        codes[:, t : t + 1] = multinomial(probs, 1, replacement=True, generator=generator)  # one RNG call per step
    return codes
    codes = texts.new_zeros(texts.shape[0], L)
    past = model.new_cache()
    for t in range(L):
        _, probs, past = next_code_step(model, texts, codes[:, :t], past, top_k=top_k, top_p=top_p,
                                        temperature=temperature)  # fmt: skip
        codes[:, t : t + 1] = multinomial(probs, 1, replacement=True, generator=generator)
    return codes
