"""The whole min-dalle pipeline (`MinDalle.generate_raw_image_stream`) through `MegaDalle`'s public API.

Parity README §2.3 `pipeline`: caption -> text arrays -> encoder state -> 256 superconditioned top-k steps ->
image. Every step is also checked teacher-forced by the recorded tokens (logits, final_ln output, multinomial
weights), so a numerical drift would be reported at the step it starts. The recorded tokens themselves are
reproduced exactly: `sample(seed=...)` makes the original's RNG calls (one `torch.multinomial` per step on a
generator seeded like `torch.manual_seed(seed)`) on weights that come out bitwise equal here.

The sampler knows nothing of these tests: they run its loop themselves from the public step
(`decoder_step_weights`, which returns each step's logits and weights) and feed the recorded tokens instead of
drawing; `test_driven_loop_is_the_sampler` shows that loop, drawing as production does, is `MegaDalle.sample`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.models.draws import multinomial  # noqa: E402
from storyexp.models.mega import START_TOKEN, MegaDalle, decoder_step_weights, unconditional_ids  # noqa: E402
from storyexp.models.mega.tokenizer import PAD_ID  # noqa: E402

ATOL = 1e-4  # README §3: BART outputs
WEIGHT_RTOL = 1e-4  # README §3: multinomial weights
PIXEL_ATOL, SUM_RTOL, MEAN_ATOL = 0.02, 1e-6, 1e-3  # README §3: detokenizer, 0-255 scale


@functools.cache
def cases() -> dict:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)


@functools.cache
def record() -> dict:
    return cases()["pipeline"]


@pytest.fixture(scope="module")
def model() -> MegaDalle:
    return MegaDalle.from_pretrained(MEGA, attention_heads=cases()["meta"]["sizes"]["attention_head_count"])


def images() -> int:
    return record()["grid_size"] ** 2


def settings() -> dict:
    p = record()
    return dict(top_k=p["top_k"], temperature=p["temperature"], supercondition_factor=p["supercondition_factor"])


def caption_ids(model) -> torch.Tensor:
    return model.tokenize([record()["text"]]).repeat(images(), 1)


def test_text_tokens_and_encoder_state(model):
    p = record()
    ids = model.tokenize([p["text"]])
    assert torch.equal(ids, p["text_tokens"][1:])
    assert torch.equal(unconditional_ids(ids), p["text_tokens"][:1])
    assert torch.equal(torch.tensor([[START_TOKEN]] * images()), p["prev_tokens_first"])
    with torch.no_grad():
        state = model.encode_text(p["text_tokens"])
    torch.testing.assert_close(state, p["encoder_state"], atol=ATOL, rtol=0)


class DrivenRun(NamedTuple):
    tokens: torch.Tensor  # [n, steps]
    logits: list[torch.Tensor]  # per step [2n, V]
    weights: list[torch.Tensor]  # per step [n, 2^14]


@torch.no_grad()
def driven_run(model, ids, *, teacher=None, generator=None) -> DrivenRun:
    """`MegaDalle.sample`'s loop run here from its public step: the text as [unconditional rows; caption rows],
    then one `decoder_step_weights` per token. With `teacher` [n, >= steps] the recorded tokens are fed (no RNG
    is used); otherwise each token is drawn as the sampler draws it (`multinomial(weights, 1, generator=...)`)."""
    text = torch.cat([unconditional_ids(ids), ids], dim=0)
    state, mask = model.encode_text(text), text != PAD_ID
    cache = model.decoder.new_cache(text.shape[0])
    prev = torch.full((ids.shape[0], 1), START_TOKEN, dtype=torch.long)
    tokens, logits, weights = [], [], []
    for step in range(model.decoder.image_token_count):
        step_logits, step_weights = decoder_step_weights(model.decoder, prev, state, mask, cache, **settings())
        logits.append(step_logits)
        weights.append(step_weights)
        if teacher is not None:
            prev = teacher[:, step : step + 1]
        else:
            prev = multinomial(step_weights, 1, generator=generator)
        tokens.append(prev)
    return DrivenRun(torch.cat(tokens, dim=1), logits, weights)


def teacher_forced_run(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The cached steps fed the recorded tokens: per-step logits [2n, V] and weights [n, 2^14]."""
    run = driven_run(model, caption_ids(model), teacher=record()["image_tokens"])
    assert torch.equal(run.tokens, record()["image_tokens"])
    return run.logits, run.weights


def test_cached_steps_teacher_forced(model):
    p = record()
    logits, weights = teacher_forced_run(model)
    assert len(logits) == p["image_tokens"].shape[1]
    torch.testing.assert_close(logits[0], p["logits_step0"], atol=ATOL, rtol=0)
    steps, cols = p["logit_steps"], p["logit_columns"]
    seen = torch.stack([logits[int(s)][:, cols] for s in steps], dim=1)  # [rows, steps, cols]
    torch.testing.assert_close(seen, p["logits_cols"], atol=ATOL, rtol=0)
    for step, rec in enumerate(p["multinomial_first8"]):
        kept = weights[step].nonzero()
        assert torch.equal(kept, rec["kept_index"]), step
        torch.testing.assert_close(weights[step][kept[:, 0], kept[:, 1]], rec["kept_weight"], rtol=WEIGHT_RTOL, atol=0)


def test_full_forward_teacher_forced(model):
    p = record()
    text = torch.cat([unconditional_ids(caption_ids(model)), caption_ids(model)])
    prev = model.shift_tokens(p["image_tokens"]).repeat(2, 1)
    with torch.no_grad():
        state = model.encode_text(text)
        logits = model.decoder_logits(state, text, prev)
        _, hidden = model.decoder(prev, state, text != 1, return_hidden=True)
    seen = logits[:, p["logit_steps"]][:, :, p["logit_columns"]]  # [rows, steps, columns]
    torch.testing.assert_close(seen, p["logits_cols"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, p["final_ln_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, 0], p["logits_step0"], atol=ATOL, rtol=0)


def test_seeded_sampling_reproduces_the_recorded_tokens(model):
    p = record()
    state = torch.random.get_rng_state()
    tokens = model.sample(caption_ids(model), **settings(), seed=p["seed"])
    assert torch.equal(torch.random.get_rng_state(), state)  # a private generator: the global RNG is untouched
    assert torch.equal(tokens, p["image_tokens"])
    # the same draws from the global RNG seeded the original's way (restored afterwards)
    try:
        torch.manual_seed(p["seed"])
        assert torch.equal(model.sample(caption_ids(model), **settings()), p["image_tokens"])
    finally:
        torch.random.set_rng_state(state)


def test_driven_loop_is_the_sampler(model):
    """The loop the tests drive, drawing as production draws, gives `MegaDalle.sample`'s tokens exactly: with the
    record's seed (so also the recorded tokens), and with one generator per image (`storyexp.models.draws`)."""
    p = record()
    ids = caption_ids(model)
    driven = driven_run(model, ids, generator=torch.Generator().manual_seed(p["seed"]))
    assert torch.equal(driven.tokens, model.sample(ids, **settings(), seed=p["seed"]))
    assert torch.equal(driven.tokens, p["image_tokens"])
    two = model.tokenize([p["text"], "a different caption"])
    gens = lambda: [torch.Generator().manual_seed(p["seed"] + i) for i in range(2)]  # noqa: E731
    driven = driven_run(model, two, generator=gens())
    assert torch.equal(driven.tokens, model.sample(two, **settings(), generator=gens()))


def test_image_from_the_recorded_tokens(model):
    p = record()
    previous = torch.get_num_threads()
    torch.set_num_threads(max(previous, min(4, os.cpu_count() or 1)))  # one full-size VQGAN decode
    try:
        with torch.no_grad():
            if images() == 1 and not p["is_seamless"]:
                img = model.decode_codes(p["image_tokens"])[0]
            else:
                img = model.decode_grid(p["image_tokens"], seamless=p["is_seamless"])
    finally:
        torch.set_num_threads(previous)
    img = img.permute(1, 2, 0) * 255
    assert list(img.shape) == p["image_shape"]
    sub = p["image_sub4"]
    stride = img.shape[0] // sub.shape[0]
    torch.testing.assert_close(img[::stride, ::stride], sub, atol=PIXEL_ATOL, rtol=0)
    crop = p["image_crop"]
    top, left = (img.shape[0] - crop.shape[0]) // 2, (img.shape[1] - crop.shape[1]) // 2
    window = img[top : top + crop.shape[0], left : left + crop.shape[1]]
    torch.testing.assert_close(window, crop, atol=PIXEL_ATOL, rtol=0)
    assert math.isclose(img.double().sum().item(), p["image_sum"], rel_tol=SUM_RTOL)
    torch.testing.assert_close(img.double().mean(dim=(1, 2)), p["row_means"], atol=MEAN_ATOL, rtol=0)
    torch.testing.assert_close(img.double().mean(dim=(0, 2)), p["col_means"], atol=MEAN_ATOL, rtol=0)
