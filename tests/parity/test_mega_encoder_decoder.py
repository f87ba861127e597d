"""min-dalle BART encoder / decoder (storyexp.models.mega) vs. vectors recorded from kuprel/min-dalle 0.4.11.

Parity README §2.2-2.3 (`encoder`, `decoder`) and §3 for tolerances. Sizes, cases and column / step sets are read
from cases.pt and the weight files. The recorded per-step arrays are laid out [decoder row, step, ...] (the
original concatenated each step's [rows, 1, ...] output along the token axis).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.models.mega import MegaDalle, step_weights  # noqa: E402

ATOL = 1e-4  # README §3: transformer / BART outputs
WEIGHT_RTOL = 1e-4  # README §3: multinomial weights


@functools.cache
def cases() -> dict:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> MegaDalle:
    return MegaDalle.from_pretrained(MEGA, attention_heads=cases()["meta"]["sizes"]["attention_head_count"])


def decoder_inputs():
    """The expanded batch of README §2.3 `decoder`: encoder state / text rows indexed by expanded_indices."""
    c = cases()
    d = c["decoder"]
    idx = d["expanded_indices"]
    assert torch.equal(c["encoder"]["text_tokens"][0], d["text_tokens"])
    state = c["encoder"]["encoder_state"][0][idx]
    text = d["text_tokens"][idx]
    mask = text != cases()["tokenizer"]["special_ids"]["<pad>"]
    assert torch.equal(mask[:, None, None, :], d["attention_mask"])
    prev = d["prev_tokens"].repeat(len(idx) // d["prev_tokens"].shape[0], 1)  # min-dalle's prev_tokens.repeat(2, 1)
    return state, mask, prev


def test_sizes_inferred_from_the_files(model):
    sizes, cfg = cases()["meta"]["sizes"], model.config
    assert cfg.encoder_layers == cfg.decoder_layers == sizes["layer_count"]
    assert cfg.embed_count == sizes["embed_count"]
    assert cfg.glu_embed_count == sizes["glu_embed_count"]
    assert cfg.text_vocab_count == sizes["text_vocab_count"]
    assert cfg.image_vocab_count == sizes["image_vocab_count"]
    assert cfg.text_token_count == sizes["text_token_count"]
    assert cfg.image_token_count == sizes["image_token_count"]
    assert model.decoder.lm_head.out_features == sizes["image_vocab_count"] + 1
    assert not model.training


def test_encoder_states(model):
    e = cases()["encoder"]
    assert 20 * e["err_fp32_vs_fp64"] < ATOL
    with torch.no_grad():
        for tokens, expected in zip(e["text_tokens"], e["encoder_state"], strict=True):
            torch.testing.assert_close(model.encode_text(tokens), expected, atol=ATOL, rtol=0)


def test_decoder_cached_steps_and_state(model):
    d = cases()["decoder"]
    rec = d["cached"]
    state, mask, prev = decoder_inputs()
    cols = d["logit_columns"]
    cache = model.decoder.new_cache(prev.shape[0])
    with torch.no_grad():
        for i in range(prev.shape[1]):
            logits, hidden = model.decoder.step(prev[:, [i]], state, mask, cache, return_hidden=True)
            assert logits.shape == (prev.shape[0], 1, model.config.image_vocab_count + 1)
            torch.testing.assert_close(logits[:, 0, cols], rec["step_logits_cols"][:, i], atol=ATOL, rtol=0)
            torch.testing.assert_close(hidden[:, 0], rec["final_ln_output"][:, i], atol=ATOL, rtol=0)
    original = cache.to_original()  # min-dalle's attention_state [layers, 2 * rows, 256, D]: keys, then values
    sizes = cases()["meta"]["sizes"]
    assert original.shape == (sizes["layer_count"], 2 * prev.shape[0], sizes["image_token_count"], sizes["embed_count"])
    steps = rec["attention_state_prefix"].shape[2]
    torch.testing.assert_close(original[:, :, :steps], rec["attention_state_prefix"], atol=ATOL, rtol=0)
    assert original[:, :, steps:].abs().max().item() == rec["attention_state_rest_abs_max"]
    assert cache.length == steps == prev.shape[1]


def test_decoder_full_forward(model):
    d = cases()["decoder"]
    state, mask, prev = decoder_inputs()
    assert torch.equal(d["full"]["token_index"], torch.arange(prev.shape[1]))
    with torch.no_grad():
        logits, hidden = model.decoder(prev, state, mask, return_hidden=True)
    torch.testing.assert_close(logits[:, :, d["logit_columns"]], d["full"]["logits_cols"], atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, d["full"]["final_ln_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, :, d["logit_columns"]], d["cached"]["step_logits_cols"], atol=ATOL, rtol=0)


def test_sample_tokens_weights_and_draws(model):
    d = cases()["decoder"]
    s = d["sample_tokens"]
    temperature, top_k, factor = s["settings"].tolist()
    state, mask, prev = decoder_inputs()
    with torch.no_grad():
        logits = model.decoder.step(prev[:, :1], state, mask, model.decoder.new_cache(prev.shape[0]))[:, -1]
    weights = step_weights(logits, top_k=int(top_k), temperature=temperature, supercondition_factor=factor)
    assert list(weights.shape) == s["multinomial_weights_shape"]
    kept = weights.nonzero()
    assert torch.equal(kept, s["kept_index"])
    torch.testing.assert_close(weights[kept[:, 0], kept[:, 1]], s["kept_weight"], rtol=WEIGHT_RTOL, atol=0)
    # the original drew right after torch.manual_seed(seed); a generator seeded alike gives the same stream
    draws = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(s["seed"]))[:, 0]
    assert torch.equal(draws, s["image_tokens"])


def test_float16_views_load_into_float32(model):
    # decoder.pt stores embed_tokens / lm_head as overlapping as_strided float16 views (README §2.2); a loader
    # that needed dense memory would break on them, so make sure the file still looks like that
    sd = torch.load(MEGA / "decoder.pt", map_location="cpu", weights_only=True)
    assert sd["embed_tokens.weight"].dtype == torch.float16
    assert not sd["embed_tokens.weight"].is_contiguous()
    for key in ("embed_tokens.weight", "lm_head.weight"):
        param = model.decoder.state_dict()[key]
        assert param.dtype == torch.float32 and param.is_contiguous()
        assert torch.equal(param, sd[key].float()), key
    for name, module in (("encoder.pt", model.encoder), ("detoker.pt", model.detokenizer)):
        own = module.state_dict()
        for key, value in torch.load(MEGA / name, map_location="cpu", weights_only=True).items():
            assert torch.equal(own[key], value.float()), f"{name}: {key}"


def test_resize_token_embeddings_keeps_the_pretrained_rows(model):
    """StoryDALL-E grows the text embedding for added character tokens; existing ids must encode as before."""
    import copy

    encoder = copy.deepcopy(model.encoder)
    rows = encoder.embed_tokens.num_embeddings
    encoder.resize_token_embeddings(rows + 3)
    assert encoder.embed_tokens.weight.shape[0] == rows + 3
    assert torch.equal(encoder.embed_tokens.weight[:rows], model.encoder.embed_tokens.weight)
    tokens = cases()["encoder"]["text_tokens"][0]
    with torch.no_grad():
        assert torch.equal(encoder(tokens), model.encode_text(tokens))
        grown = tokens.clone()
        grown[:, 1] = rows + 2  # a new id is now valid
        assert encoder(grown).shape == model.encode_text(tokens).shape
