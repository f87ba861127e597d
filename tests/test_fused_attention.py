"""`model.network.fused_attention`: torch's `F.scaled_dot_product_attention` in Mega's attention, the taming VQGAN's
(and the detokenizer's) `AttnBlock` and minDALL-E's causal self-attention computes what the originals' explicit
matmul + softmax computes. Each module is checked fused vs explicit and both against an independent float64
computation (a fully masked Mega row included: min-dalle's -1e12 bias averages the values uniformly there, never
NaN); the tiny systems draw the same codes under the same seed with the switch on and off.

The parity tests (tests/parity/test_mega_*.py, test_mindalle_*.py) run with the default, fused, path against the
originals' recorded outputs."""

from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F

from storyexp.errors import ConfigurationError
from storyexp.models.mega.build import build_storymega
from storyexp.models.mega.layers import MegaAttention
from storyexp.models.mindalle.transformer import CausalSelfAttention, Stage2Config
from storyexp.models.vqgan.build import fused_attention, set_fused_attention
from storyexp.models.vqgan.layers import AttnBlock

from .conftest import TINY_DEMO, compose_cfg

D64 = torch.float64


def both(module, *args):
    """(fused output, explicit output) of `module(*args)`; the module ends up fused again."""
    outs = []
    for flag in (True, False):
        module.fused = flag
        outs.append(module(*args))
    module.fused = True
    return outs


# ------------------------------------------------------------------------------------------------ modules


def mega_reference(attn: MegaAttention, x, context, allowed):
    """float64 multi-head attention from x [B, Q, D] to context [B, K, D]; `allowed` bool [B, Q, K]. A query with no
    allowed key averages every value uniformly (what min-dalle's -1e12 bias does in float32)."""
    w = {n: getattr(attn, n).weight.to(D64) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
    x, context = x.to(D64), context.to(D64)
    B, Q, D = x.shape
    H = attn.heads
    q = (x @ w["q_proj"].T).view(B, Q, H, -1).transpose(1, 2)
    k = (context @ w["k_proj"].T).view(B, -1, H, D // H).transpose(1, 2)
    v = (context @ w["v_proj"].T).view(B, -1, H, D // H).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # [B, H, Q, K]
    allowed = allowed[:, None].expand_as(scores)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    empty = ~allowed.any(-1, keepdim=True)
    weights = torch.where(empty, torch.full_like(weights, 1.0 / scores.shape[-1]), weights)
    out = (weights @ v).transpose(1, 2).reshape(B, Q, D)
    return out @ w["out_proj"].T


def test_mega_attention_fused_equals_explicit_and_float64():
    torch.manual_seed(0)
    attn = MegaAttention(heads=4, dim=32)
    assert attn.fused  # the default
    x, context = torch.randn(3, 6, 32), torch.randn(3, 9, 32)
    keys = torch.rand(3, 9) > 0.4
    keys[0] = True
    keys[1] = False  # a fully masked row: the uniform average, as min-dalle, not NaN
    causal = torch.ones(6, 9, dtype=torch.bool).tril(3)  # [Q, K] like the cached decoder's self mask
    cases = [
        (None, torch.ones(3, 6, 9, dtype=torch.bool)),
        (keys[:, None, None, :], keys[:, None, :].expand(3, 6, 9)),
        (causal[None, None], causal[None].expand(3, 6, 9)),
    ]
    for mask, allowed in cases:
        fused, explicit = both(attn, x, context, mask)
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-6)
        reference = mega_reference(attn, x, context, allowed)
        torch.testing.assert_close(fused.to(D64), reference, rtol=0, atol=2e-6)
        torch.testing.assert_close(explicit.to(D64), reference, rtol=0, atol=2e-6)


def test_mega_attention_fused_gradients_equal_explicit():
    torch.manual_seed(1)
    attn = MegaAttention(heads=2, dim=16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = (torch.rand(2, 5) > 0.3)[:, None, None, :]
    grads = []
    for out in both(attn, x, None, mask):
        attn.zero_grad()
        x.grad = None
        out.square().sum().backward()
        grads.append((x.grad.clone(), attn.q_proj.weight.grad.clone()))
    for fused, explicit in zip(*grads):
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def attn_block_reference(block: AttnBlock, x):
    """float64 taming AttnBlock: one head over the h*w positions, 1x1 convs as matrix products."""
    x = x.to(D64)
    b, c, h, w = x.shape
    y = F.group_norm(x, block.norm.num_groups, block.norm.weight.to(D64), block.norm.bias.to(D64), block.norm.eps)
    y = y.reshape(b, c, h * w)
    conv = lambda m, t: m.weight.to(D64)[:, :, 0, 0] @ t + m.bias.to(D64)[:, None]  # noqa: E731
    q, k, v = conv(block.q, y), conv(block.k, y), conv(block.v, y)  # [b, c, hw]
    weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # [b, hw_query, hw_key]
    out = (weights @ v.transpose(1, 2)).transpose(1, 2)
    return x + conv(block.proj_out, out).reshape(b, c, h, w)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])  # taming's GroupNorm eps, min-dalle's detokenizer's
def test_attn_block_fused_equals_explicit_and_float64(eps):
    torch.manual_seed(2)
    block = AttnBlock(64, eps)
    assert block.fused
    x = torch.randn(2, 64, 8, 8)
    fused, explicit = both(block, x)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-6)
    reference = attn_block_reference(block, x)
    torch.testing.assert_close(fused.to(D64), reference, rtol=0, atol=2e-6)
    torch.testing.assert_close(explicit.to(D64), reference, rtol=0, atol=2e-6)


def test_mindalle_causal_self_attention_fused_equals_explicit_with_and_without_cache():
    torch.manual_seed(3)
    cfg = Stage2Config(vocab_size_txt=16, vocab_size_img=16, ctx_len_txt=4, ctx_len_img=8, embed_dim=32, n_layers=1,
                       n_heads=4)
    attn = CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 12, 32)
    (fused, kv_f), (explicit, kv_e) = both(attn, x)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=2e-6)
    assert torch.equal(kv_f[0], kv_e[0]) and torch.equal(kv_f[1], kv_e[1])
    # float64: causal softmax over every earlier position
    w = {n: getattr(attn, n) for n in ("query", "key", "value", "proj")}
    lin = lambda m, t: t.to(D64) @ m.weight.to(D64).T + m.bias.to(D64)  # noqa: E731
    split = lambda t: t.view(2, 12, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = (split(lin(w[n], x)) for n in ("query", "key", "value"))
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -torch.inf)
    reference = lin(w["proj"], (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(fused.to(D64), reference, rtol=0, atol=2e-6)
    # cached: a block of 3 new positions after 9 (masked), then a single position (unmasked)
    past = (kv_f[0][:, :, :9], kv_f[1][:, :, :9])
    block_f, block_e = both(attn, x[:, 9:], past)
    torch.testing.assert_close(block_f[0], block_e[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(block_f[0], fused[:, 9:], rtol=0, atol=2e-6)
    past = (kv_f[0][:, :, :11], kv_f[1][:, :, :11])
    one_f, one_e = both(attn, x[:, 11:], past)
    torch.testing.assert_close(one_f[0], one_e[0], rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------ systems


def switched(root) -> list[bool]:
    return [m.fused for m in root.modules() if getattr(type(m), "has_fused_switch", False)]


def tiny_system(tmp_path, data_dir, family: str, fused: bool):
    cfg = compose_cfg(TINY_DEMO + [f"model={family}_tiny", f"model.network.fused_attention={str(fused).lower()}"],
                      tmp_path, data_dir=data_dir)
    assert cfg.model.network.fused_attention is fused
    model = hydra.utils.instantiate(cfg.model, _convert_="all").eval()
    assert model.hparams.network["fused_attention"] is fused
    with torch.no_grad():  # open the zero-initialised gates so the condition / cross attention counts
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.5)
    return model


@pytest.mark.parametrize("family", ["mega", "mindalle"])
@torch.no_grad()
def test_tiny_systems_draw_the_same_codes_fused_and_explicit(tmp_path, shared_data_dir, demo_train_batch, family):
    models = {flag: tiny_system(tmp_path, shared_data_dir, family, flag) for flag in (True, False)}
    for flag, model in models.items():
        flags = switched(model)
        assert len(flags) > 0 and set(flags) == {flag}
        assert set(switched(model.stage1)) == {flag}  # stage 1's AttnBlocks too
        if family == "mindalle":  # StoryDALL-E's retro cross-attention too
            cross = [m.fused for m in model.modules() if type(m).__name__ == "CrossAttention"]
            assert cross and set(cross) == {flag}
    on, off = models[True], models[False]
    batch = demo_train_batch
    codes = {flag: m.encode_frames(batch["frames"]) for flag, m in models.items()}  # taming encoder attention
    assert torch.equal(codes[True], codes[False])
    torch.testing.assert_close(on.losses(batch)["loss"], off.losses(batch)["loss"], rtol=1e-5, atol=1e-6)
    drawn = {}
    for flag, model in models.items():
        settings = dict(model.hparams.sampler)
        with model.sampling_mode():
            drawn[flag] = model.sample_codes(batch, None, 1, settings, model.story_generators(batch, seed=7))
    assert torch.equal(drawn[True], drawn[False])
    side = on.stage1.config.latent_dim
    grid = drawn[True].reshape(-1, side, side)
    torch.testing.assert_close(on.stage1.decode_code(grid), off.stage1.decode_code(grid), rtol=0, atol=1e-5)


def test_fused_attention_option_defaults_and_bad_values(tmp_path):
    for name in ("mega", "mindalle"):
        assert compose_cfg([f"model={name}", "data=pororo"], tmp_path).model.network.fused_attention is True
    assert fused_attention({}) is True and fused_attention({"fused_attention": False}) is False
    with pytest.raises(ConfigurationError, match=r"model\.network\.fused_attention='yes' is not valid"):
        fused_attention({"fused_attention": "yes"})
    net = {"source": "sizes", "fused_attention": 1,
           "stage1": {"embed_dim": 8, "n_embed": 32, "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1],
                                                                  "num_res_blocks": 1, "attn_resolutions": [8],
                                                                  "z_channels": 8}},
           "sizes": {"layers": 1, "width": 32, "heads": 2, "glu": 64, "text_tokens": 8}}
    with pytest.raises(ConfigurationError, match="fused_attention=1 is not valid"):
        build_storymega(net, {}, [])
    block = AttnBlock(32)
    assert set_fused_attention(torch.nn.Sequential(block, MegaAttention(2, 32)), False) == 2 and not block.fused
