"""minDALL-E stage 2 parity: tokenizer, Transformer1d (full and KV-cached), cutoffs and the seeded sampler.

Vectors come from the original kakaobrain/minDALL-E code (parity README section 1). Every size and case is read
from the files under ``$STORYEXP_PARITY_DIR/mindalle``; a missing folder fails the run (tests/conftest.py).

The sampler knows nothing of these tests: they run its loop themselves from the public step (`next_code_step`,
which returns each step's logits and probabilities) and feed the recorded codes instead of drawing;
`test_driven_loop_is_the_sampler` shows that loop, drawing as production does, is `sample_codes`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.data_paths import parity_dir

PARITY_ROOT = parity_dir()
MD_DIR = PARITY_ROOT / "mindalle"

from storyexp.models.draws import multinomial  # noqa: E402
from storyexp.models.mindalle import (  # noqa: E402
    Stage2Config,
    Transformer1d,
    build_tokenizer,
    cutoff_topk_logits,
    cutoff_topp_probs,
    next_code_probs,
    next_code_step,
    positions_1d,
    sample_codes,
)
from storyexp.utils.loading import CheckpointMismatchError  # noqa: E402

# README section 3.
LOGITS_ATOL = 1e-4
TOPP_ATOL = 1e-6
STEP_PROBS_ATOL = 1e-5


@functools.cache
def cases() -> dict:
    return torch.load(MD_DIR / "cases.pt", map_location="cpu", weights_only=True)


@functools.cache
def model() -> Transformer1d:
    cfg = Stage2Config.from_yaml(MD_DIR / "config.yaml")
    return Transformer1d.from_ckpt(cfg, MD_DIR / "stage2_last.ckpt")


def tokenizer(context_length: int):
    return build_tokenizer(MD_DIR / "tokenizer", context_length, lowercase=True, dropout=None)


# --------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_masks_special_ids():
    c = cases()["tokenizer"]
    tok = tokenizer(c["context_length"])
    assert tok.token_to_id("[PAD]") == c["pad_id"]
    assert tok.token_to_id("[UNK]") == c["unk_id"]
    assert tok.get_vocab_size() == c["vocab_size_with_added"]
    encs = [tok.encode(t) for t in c["texts"]]
    assert torch.equal(torch.tensor([e.ids for e in encs]), c["ids"])
    assert torch.equal(torch.tensor([e.attention_mask for e in encs]), c["attention_mask"])
    assert [e.tokens for e in encs] == c["tokens"]


def test_tokenizer_real_context_length():
    c = cases()["tokenizer"]
    ctx = c["ids_ctx64"].shape[1]
    tok = tokenizer(ctx)
    ids = torch.tensor([tok.encode(t).ids for t in c["texts"]])
    assert torch.equal(ids, c["ids_ctx64"])
    assert [[i for i in row if i != c["pad_id"]] for row in ids.tolist()] == c["no_pad_ids"]


def test_config_matches_dataset_context():
    cfg = model().cfg
    assert cfg.ctx_len_txt == cases()["tokenizer"]["context_length"] == cases()["stage2_forward"]["texts"].shape[1]


def test_prompt_tokens_match_stage2_inputs():
    f = cases()["stage2_forward"]
    tok = tokenizer(f["texts"].shape[1])
    assert torch.equal(torch.tensor([tok.encode(p).ids for p in f["prompts"]]), f["texts"])


# --------------------------------------------------------------------------------------------- checkpoint
def test_strict_loading_reports_missing_and_unexpected():
    state = dict(torch.load(MD_DIR / "stage2_last.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    assert "blocks.0.attn.mask" not in state  # non-persistent buffer
    state.pop("ln_f.bias")
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        Transformer1d(model().cfg).load_checkpoint({"state_dict": state})
    assert "ln_f.bias" in str(err.value) and "bogus.weight" in str(err.value)


# --------------------------------------------------------------------------------------------- forward
@torch.no_grad()
def test_forward_full():
    f = cases()["stage2_forward"]
    assert torch.equal(f["pos_texts"], positions_1d(f["texts"]))
    assert torch.equal(f["pos_images"], positions_1d(f["images"]))
    li, lt = model()(f["images"], f["texts"], f["pos_images"], f["pos_texts"])
    assert li.shape == f["logits_img"].shape and lt.shape == f["logits_txt"].shape
    torch.testing.assert_close(li, f["logits_img"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(lt, f["logits_txt"], atol=LOGITS_ATOL, rtol=0)


@torch.no_grad()
def test_forward_partial():
    f = cases()["stage2_forward"]
    p = f["partial"]
    assert p["images"].shape[1] == p["T"]
    li, lt = model()(p["images"], f["texts"], p["pos_images"], f["pos_texts"])
    torch.testing.assert_close(li, p["logits_img"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(lt, p["logits_txt"], atol=LOGITS_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- KV cache
@torch.no_grad()
def _cached_replay(texts: torch.Tensor, images: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Teacher-forced cached loop: step 0 feeds the text, step t feeds images[:, t-1] at position t-1."""
    m, out, past = model(), [], None
    for t in range(n_steps):
        if t == 0:
            logits, past = m.step(texts=texts, pos_texts=positions_1d(texts))
        else:
            img = images[:, t - 1 : t]
            logits, past = m.step(images=img, pos_images=torch.full_like(img, t - 1), past=past)
        out.append(logits)
    return torch.stack(out)


def test_cached_steps_match_reference():
    c = cases()["stage2_cached"]
    ref = c["step_logits"]
    got = _cached_replay(c["texts"], c["images"], ref.shape[0])
    torch.testing.assert_close(got, ref, atol=LOGITS_ATOL, rtol=0)


@torch.no_grad()
def test_cached_equals_uncached_all_steps():
    c = cases()["stage2_cached"]
    texts, images = c["texts"], c["images"]
    cached = _cached_replay(texts, images, images.shape[1]).transpose(0, 1)  # [B, T, V]
    full, _ = model()(images, texts, positions_1d(images), positions_1d(texts))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_multi_token_chunks_use_offset_mask():
    """Text + several codes in one step, then another chunk on top of the cache: last-position logits agree."""
    c = cases()["stage2_cached"]
    texts, images = c["texts"], c["images"]
    m = model()
    full, _ = m(images, texts, positions_1d(images), positions_1d(texts))
    pos = positions_1d(images)
    logits, past = m.step(texts=texts, pos_texts=positions_1d(texts), images=images[:, :5], pos_images=pos[:, :5])
    torch.testing.assert_close(logits, full[:, 5], atol=1e-5, rtol=0)
    logits, past = m.step(images=images[:, 5:12], pos_images=pos[:, 5:12], past=past)
    torch.testing.assert_close(logits, full[:, 12], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- cutoffs
@pytest.mark.parametrize("i", range(len(cases()["cutoff"]["topk"])))
def test_cutoff_topk(i):
    case = cases()["cutoff"]["topk"][i]
    out = cutoff_topk_logits(case["logits"], case["k"])
    ref = case["out"]
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[torch.isfinite(ref)], ref[torch.isfinite(ref)])
    if case["k"] is None:
        assert out is case["logits"]


@pytest.mark.parametrize("i", range(len(cases()["cutoff"]["topp"])))
def test_cutoff_topp(i):
    case = cases()["cutoff"]["topp"][i]
    out = cutoff_topp_probs(case["probs"], case["p"])
    torch.testing.assert_close(out, case["out"], atol=TOPP_ATOL, rtol=0)
    assert torch.equal(out == 0, case["out"] == 0)
    if case["p"] is None:
        assert out is case["probs"]


@pytest.mark.parametrize("i", range(len(cases()["cutoff"]["combined"])))
def test_cutoff_combined(i):
    case = cases()["cutoff"]["combined"][i]
    out = next_code_probs(case["logits"], top_k=case["k"], top_p=case["p"], temperature=case["temperature"])
    torch.testing.assert_close(out, case["probs"], atol=TOPP_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- sampling
def _sampling_kwargs(s: dict) -> dict:
    return dict(
        top_k=s["top_k"],
        top_p=s["top_p"],
        temperature=s["softmax_temperature"],
        num_candidates=s["num_candidates"],
    )


def test_sampling_prompt_tokens():
    s = cases()["sampling"]
    tok = tokenizer(s["tokens"].shape[1])
    ids = torch.tensor(tok.encode(s["prompt"]).ids)
    assert torch.equal(ids.unsqueeze(0).repeat(s["num_candidates"], 1), s["tokens"])


@torch.no_grad()
def _driven_codes(texts, n: int, *, teacher=None, generator=None, **settings):
    """`sample_codes`' loop run here from its public step `next_code_step`: (codes [M, n], per-step logits and
    probs [n, M, V]). With `teacher` the recorded codes are fed; otherwise they are drawn as it draws them."""
    codes, past, logits, probs = texts.new_zeros(texts.shape[0], 0), None, [], []
    for t in range(n):
        step_logits, step_probs, past = next_code_step(model(), texts, codes, past, **settings)
        logits.append(step_logits)
        probs.append(step_probs)
        if teacher is not None:
            idx = teacher[:, t : t + 1]
        else:
            idx = multinomial(step_probs, 1, replacement=True, generator=generator)
        codes = torch.cat([codes, idx], dim=1)
    return codes, torch.stack(logits), torch.stack(probs)


def _step_settings(s: dict) -> dict:
    return dict(top_k=s["top_k"], top_p=s["top_p"], temperature=s["softmax_temperature"])


def test_sampling_teacher_forced_step_probs():
    s = cases()["sampling"]
    n = s["step_probs_first32"].shape[0]
    codes, logits, probs = _driven_codes(s["tokens"], n, teacher=s["codes"], **_step_settings(s))
    assert torch.equal(codes, s["codes"][:, :n])
    torch.testing.assert_close(probs, s["step_probs_first32"], atol=STEP_PROBS_ATOL, rtol=0)
    torch.testing.assert_close(logits[0], s["step_logits_first"], atol=LOGITS_ATOL, rtol=0)


def test_driven_loop_is_the_sampler():
    """The loop the tests drive, drawing as production draws, gives `sample_codes`' codes exactly: with the
    record's settings and seed (so also the recorded codes), and with other settings under one generator and
    under one generator per candidate group (`storyexp.models.draws`)."""
    s = cases()["sampling"]
    seeded = lambda: torch.Generator().manual_seed(s["seed"])  # noqa: E731
    driven, _, _ = _driven_codes(s["tokens"], s["codes"].shape[1], generator=seeded(), **_step_settings(s))
    assert torch.equal(driven, sample_codes(model(), s["tokens"], **_sampling_kwargs(s), generator=seeded()))
    assert torch.equal(driven, s["codes"])
    rows = s["tokens"][:1].repeat(4, 1)
    other = dict(top_k=16, top_p=0.9, temperature=0.8)
    one = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    per_group = lambda: [torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)]  # noqa: E731
    for generator in (one, per_group):
        driven, _, _ = _driven_codes(rows, 24, generator=generator(), **other)
        produced = sample_codes(model(), rows, **other, num_candidates=4, num_codes=24, generator=generator())
        assert torch.equal(driven, produced)


def test_sampling_seeded_codes_exact():
    """Same RNG call sequence as the original (one multinomial per step on the global generator after
    torch.manual_seed(seed)) reproduces the recorded codes exactly."""
    s = cases()["sampling"]
    state = torch.get_rng_state()
    try:
        torch.manual_seed(s["seed"])
        codes = sample_codes(model(), s["tokens"][:1], **_sampling_kwargs(s))
    finally:
        torch.set_rng_state(state)
    assert torch.equal(codes, s["codes"])
    # An explicit generator seeded the same way draws the same stream.
    gen = torch.Generator().manual_seed(s["seed"])
    assert torch.equal(sample_codes(model(), s["tokens"], **_sampling_kwargs(s), generator=gen), s["codes"])
