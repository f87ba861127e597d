"""minDALL-E sampling: top-k / top-p cutoffs and the KV-cached autoregressive code sampler.

The per-step order is the original's: logits / temperature -> top-k on logits -> softmax -> top-p on probs ->
one `torch.multinomial` on the [candidates, vocab] probabilities. Keeping that order (and one RNG call per step)
is what lets a seeded run reproduce the reference codes exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .transformer import Transformer1d, positions_1d


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


@torch.no_grad()
def sample_codes(
    model: Transformer1d,
    texts: Tensor,
    *,
    top_k: int | None,
    top_p: float | None,
    temperature: float = 1.0,
    num_candidates: int = 1,
    generator: torch.Generator | None = None,
    num_codes: int | None = None,
    teacher_codes: Tensor | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample `num_codes` (default ctx_len_img) image codes per candidate, one cached transformer step per code.

    texts: [N] or [1, N] ids (repeated to `num_candidates` rows) or already [num_candidates, N].
    generator: passed to `torch.multinomial`; None uses torch's global generator (as the original, which is
      seeded with `torch.manual_seed`).
    teacher_codes: [num_candidates, L] codes to feed instead of sampling (no RNG is consumed); used to replay a
      recorded run and compare per-step probabilities.
    Returns codes [num_candidates, L], plus the per-step probabilities [L, num_candidates, V] if return_probs.
    """
    if texts.dim() == 1:
        texts = texts.unsqueeze(0)
    if texts.shape[0] == 1 and num_candidates > 1:
        texts = texts.repeat(num_candidates, 1)
    assert texts.shape[0] == num_candidates, f"{texts.shape[0]} text rows for {num_candidates} candidates"
    L = num_codes or model.cfg.ctx_len_img
    if teacher_codes is not None:
        L = min(L, teacher_codes.shape[1])

    codes: list[Tensor] = []
    step_probs: list[Tensor] = []
    past = None
    for t in range(L):
        if t == 0:  # the whole text; its last position predicts code 0
            logits, past = model.step(texts=texts, pos_texts=positions_1d(texts), past=None)
        else:  # only the previous code, at image position t-1
            prev = codes[-1]
            logits, past = model.step(images=prev, pos_images=torch.full_like(prev, t - 1), past=past)
        probs = next_code_probs(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        if return_probs:
            step_probs.append(probs)
        if teacher_codes is not None:
            idx = teacher_codes[:, t : t + 1].to(texts.device)
        else:
            idx = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
        codes.append(idx)
    out = torch.cat(codes, dim=1)
    return (out, torch.stack(step_probs)) if return_probs else out
