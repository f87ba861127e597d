"""StoryDALL-E's condition attention in the Mega decoder (no parity vectors exist for it: README §4).

What is checked: placement on layers (i + 1) % 3 == 0, registration (state_dict, parameters, gradients), a zero
gate leaving the decoder exactly as pretrained, and the fix of the original's miswiring: the branch attends to
`condition_state` under `condition_mask`, never to the text encoder state. Sizes are those of the parity
decoder (cases.pt meta.sizes) with more layers, since its own layer count may hold no condition layer.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.models.draws import multinomial  # noqa: E402
from storyexp.models.mega import (  # noqa: E402
    DalleBartDecoder,
    decoder_step_weights,
    is_condition_key,
    sample_image_tokens,
)

LAYERS = 6  # two condition layers (2 and 5)
CONDITION_PARTS = ("pre_condition_attn_layer_norm", "condition_attn.", "condition_attn_layer_norm", "condition_gate")


@functools.cache
def sizes() -> dict:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)["meta"]["sizes"]


def build(condition_layers: bool, gate_init: str = "zero", layers: int = LAYERS, seed: int = 0) -> DalleBartDecoder:
    s = sizes()
    torch.manual_seed(seed)
    net = DalleBartDecoder(layers, s["embed_count"], s["attention_head_count"], s["glu_embed_count"],
                           s["image_vocab_count"], s["image_token_count"],
                           condition_layers=condition_layers, gate_init=gate_init)  # fmt: skip
    return net.eval()


def open_gates(net: DalleBartDecoder, value: float = 0.7) -> DalleBartDecoder:
    with torch.no_grad():
        for i in net.condition_layer_indices:
            net.layers[i].condition_gate.fill_(value)
    return net


def inputs(batch: int = 2, length: int = 5, seed: int = 1):
    s = sizes()
    g = torch.Generator().manual_seed(seed)
    d = s["embed_count"]
    prev = torch.randint(0, s["image_vocab_count"], (batch, length), generator=g)
    encoder_state = torch.randn(batch, s["text_token_count"], d, generator=g)
    encoder_mask = torch.ones(batch, s["text_token_count"], dtype=torch.bool)
    encoder_mask[:, s["text_token_count"] // 2 :] = False
    condition_state = torch.randn(batch, s["image_token_count"], d, generator=g)
    return prev, encoder_state, encoder_mask, condition_state


def test_placement_and_registration():
    for layers in range(1, 8):
        net = build(True, layers=layers)
        expected = [i for i in range(layers) if (i + 1) % 3 == 0]
        assert net.condition_layer_indices == expected
        keys = net.state_dict().keys()
        for i in range(layers):
            own = {k for k in keys if k.startswith(f"layers.{i}.") and is_condition_key(k)}
            if i in expected:
                assert {k.split(".", 2)[2] for k in own} == {
                    "pre_condition_attn_layer_norm.weight", "pre_condition_attn_layer_norm.bias",
                    "condition_attn.q_proj.weight", "condition_attn.k_proj.weight",
                    "condition_attn.v_proj.weight", "condition_attn.out_proj.weight",
                    "condition_attn_layer_norm.weight", "condition_attn_layer_norm.bias", "condition_gate",
                }  # fmt: skip
            else:
                assert not own
    params = dict(build(True).named_parameters())
    assert all(k in params for k in build(True).state_dict() if is_condition_key(k))
    assert not any("condition_gate" in k for k in build(True, gate_init="none").state_dict())
    assert build(False).condition_layer_indices == []
    with pytest.raises(ValueError):
        build(True, gate_init="tanh")


def test_zero_gate_is_exactly_the_plain_decoder():
    plain, cond = build(False), build(True, seed=5)
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_condition_key(k) for k in missing)
    prev, enc, mask, condition = inputs()
    with torch.no_grad():
        expected = plain(prev, enc, mask)
        assert torch.equal(cond(prev, enc, mask, condition), expected)
        cache_p, cache_c = plain.new_cache(prev.shape[0]), cond.new_cache(prev.shape[0])
        for t in range(prev.shape[1]):
            step_p = plain.step(prev[:, [t]], enc, mask, cache_p)
            assert torch.equal(cond.step(prev[:, [t]], enc, mask, cache_c, condition), step_p)


def test_gradients_reach_the_condition_layers():
    prev, enc, mask, condition = inputs()
    for gate in (0.0, 0.5):
        net = open_gates(build(True).train(), gate)
        net(prev, enc, mask, condition).float().logsumexp(-1).mean().backward()
        for name, p in net.named_parameters():
            if not is_condition_key(name):
                continue
            assert p.grad is not None, name
            if gate != 0.0 or name.endswith("condition_gate"):  # a zero gate blocks all but its own gradient
                assert p.grad.abs().sum() > 0, (gate, name)


def test_branch_reads_the_condition_state_not_the_encoder_state():
    net = open_gates(build(True))
    prev, enc, mask, condition = inputs()
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        getattr(net.layers[i].condition_attn, proj).register_forward_hook(
            lambda mod, args, out, proj=proj: seen.append((proj, args[0].detach().clone()))
        )
        for i in net.condition_layer_indices
        for proj in ("k_proj", "v_proj")
    ]
    other_enc = torch.randn_like(enc)
    with torch.no_grad():
        out = net(prev, enc, mask, condition)
        out_other_enc = net(prev, other_enc, mask, condition)
        cache = net.new_cache(prev.shape[0])
        net.step(prev[:, :1], enc, mask, cache, condition)
    for h in hooks:
        h.remove()
    # keys and values of every condition attention come from condition_state, whatever the encoder state is
    # (full forward twice + the cached step, which projects them once into the cache)
    assert len(seen) == 3 * 2 * len(net.condition_layer_indices)
    assert all(torch.equal(x, condition) for _, x in seen)
    assert not torch.equal(out, out_other_enc)  # the encoder state still matters, through encoder_attn
    with torch.no_grad():
        changed = net(prev, enc, mask, torch.randn_like(condition))
        as_original = net(prev, enc, mask, enc)  # what the miswired original attended to
        skipped = net(prev, enc, mask)
    assert not torch.equal(changed, out) and not torch.equal(as_original, out) and not torch.equal(skipped, out)


def test_condition_branch_in_isolation():
    net = open_gates(build(True))
    layer = net.layers[net.condition_layer_indices[0]]
    _, enc, _, condition = inputs()
    x = torch.randn(condition.shape[0], 3, condition.shape[-1])
    with torch.no_grad():
        contribution = layer.condition_branch(x, condition)
        # the branch's only inputs are x and the condition state: the encoder state cannot enter it
        assert torch.equal(layer.condition_branch(x, condition), contribution)
        assert not torch.equal(layer.condition_branch(x, torch.randn_like(condition)), contribution)
        h = layer.condition_attn_layer_norm(layer.condition_attn(layer.pre_condition_attn_layer_norm(x), condition))
        torch.testing.assert_close(contribution, torch.tanh(layer.condition_gate) * h, atol=0, rtol=0)


def test_condition_mask_hides_positions():
    net = open_gates(build(True))
    prev, enc, mask, condition = inputs()
    cond_mask = torch.zeros(condition.shape[:2], dtype=torch.bool)
    cond_mask[:, : condition.shape[1] // 3] = True
    edited = condition.clone()
    edited[:, condition.shape[1] // 3 :] += 5.0  # only hidden positions change
    with torch.no_grad():
        a = net(prev, enc, mask, condition, cond_mask)
        b = net(prev, enc, mask, edited, cond_mask)
        c = net(prev, enc, mask, edited)  # no mask: every position is attended
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c, atol=1e-3)


def test_gate_none_is_the_original_ungated_residual():
    net = build(True, gate_init="none")
    prev, enc, mask, condition = inputs()
    with torch.no_grad():
        assert not torch.allclose(net(prev, enc, mask, condition), net(prev, enc, mask), atol=1e-3)


SAMPLER = dict(top_k=8, temperature=1.0, supercondition_factor=3.0)


@torch.no_grad()
def driven_tokens(net, prev0, enc, mask, condition, steps: int, *, teacher=None, generator=None, sampled_vocab=None):
    """`sample_image_tokens`' loop run here from its public step `decoder_step_weights`: (tokens [B, steps],
    per-step logits [2B, V]). With `teacher` the given tokens are fed; otherwise they are drawn as it draws."""
    cache = net.new_cache(enc.shape[0])
    prev = torch.full((enc.shape[0] // 2, 1), prev0, dtype=torch.long)
    vocab = {} if sampled_vocab is None else dict(sampled_vocab=sampled_vocab)
    tokens, logits = [], []
    for step in range(steps):
        step_logits, weights = decoder_step_weights(net, prev, enc, mask, cache, condition_state=condition,
                                                    **SAMPLER, **vocab)  # fmt: skip
        logits.append(step_logits)
        prev = teacher[:, step : step + 1] if teacher is not None else multinomial(weights, 1, generator=generator)
        tokens.append(prev)
    return torch.cat(tokens, dim=1), logits


def test_cached_sampler_matches_teacher_forcing_with_condition():
    net = open_gates(build(True))
    prev, enc, mask, condition = inputs(batch=4)  # two "unconditional" rows, then two caption rows
    half = prev.shape[0] // 2
    teacher = prev[:half, 1:]
    tokens, logits_seen = driven_tokens(net, int(prev[0, 0]), enc, mask, condition, teacher.shape[1], teacher=teacher)
    assert torch.equal(tokens, teacher)
    full_prev = torch.cat([torch.full((half, 1), int(prev[0, 0])), teacher], dim=1)[:, :-1].repeat(2, 1)
    with torch.no_grad():
        full = net(full_prev, enc, mask, condition)
    torch.testing.assert_close(torch.stack(logits_seen, dim=1), full, atol=1e-4, rtol=0)


def test_driven_loop_is_the_sampler():
    """The loop the tests drive, drawing as production draws, is `sample_image_tokens` exactly (same tokens), with
    one seeded generator and with one generator per row group (`storyexp.models.draws`)."""
    net = open_gates(build(True))
    prev, enc, mask, condition = inputs(batch=4)
    start, steps, vocab = int(prev[0, 0]), 12, 64  # a small codebook, so that the draws are not all the same
    one = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    per_row = lambda: [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]  # noqa: E731
    for generator in (one, per_row):
        driven, _ = driven_tokens(net, start, enc, mask, condition, steps, generator=generator(), sampled_vocab=vocab)
        produced = sample_image_tokens(net, enc, mask, **SAMPLER, generator=generator(), num_tokens=steps,
                                       start_token=start, sampled_vocab=vocab, condition_state=condition)  # fmt: skip
        assert torch.equal(driven, produced)
