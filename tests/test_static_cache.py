"""`model.sampler.static_cache`: minDALL-E's preallocated KV cache (and StoryDALL-E's source frame projected once)
draws exactly the codes of the original's growing loop, under the same seed, for every sampling mode."""

from __future__ import annotations

import pytest
import torch

from storyexp.models.mindalle.sampling import sample_codes
from storyexp.models.mindalle.story import StoryDalleNet
from storyexp.models.mindalle.transformer import LayerKV, Stage2Config, StaticKVCache, Transformer1d

from .conftest import compose_cfg
from .test_storydalle_system import TINY, build, demo_batch

B, L, N, T, S, E = 2, 3, 8, 6, 6, 12


def tiny_cfg(**kw) -> Stage2Config:
    base = dict(vocab_size_txt=40, vocab_size_img=32, embed_dim=32, n_layers=6, n_heads=4, n_dense_layers=6,
                ctx_len_img=T, ctx_len_txt=N)
    return Stage2Config(**{**base, **kw})


def story_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    texts = torch.randint(1, 40, (B, L, N), generator=g)
    source = torch.randint(0, 32, (B, S), generator=g)
    sent = torch.randn(B, L, E, generator=g)
    return texts, source, sent


def test_transformer_static_cache_draws_the_growing_loops_codes():
    torch.manual_seed(0)
    model = Transformer1d(tiny_cfg()).eval()
    texts = torch.randint(0, 40, (3, N))
    kw = dict(top_k=8, top_p=0.9, temperature=1.2, num_candidates=3)
    static = sample_codes(model, texts, generator=torch.Generator().manual_seed(5), **kw)
    growing = sample_codes(model, texts, generator=torch.Generator().manual_seed(5), static_cache=False, **kw)
    assert static.shape == (3, T) and torch.equal(static, growing)
    # and the codes are not a constant: another seed draws others
    assert not torch.equal(static, sample_codes(model, texts, generator=torch.Generator().manual_seed(6), **kw))


def test_static_cache_is_written_in_place_and_refuses_overflow():
    torch.manual_seed(0)
    model = Transformer1d(tiny_cfg()).eval()
    texts = torch.randint(0, 40, (2, N))
    cache = model.new_cache()
    _, grown = model.step(texts=texts, pos_texts=torch.arange(N).expand(2, N), past=cache)
    assert grown is cache and cache.length == N
    keys = cache[0].keys
    _, again = model.step(images=torch.zeros(2, 1, dtype=torch.long), pos_images=torch.zeros(2, 1, dtype=torch.long),
                          past=cache)  # fmt: skip
    assert again is cache and cache.length == N + 1 and cache[0].keys is keys  # no reallocation
    # the cached keys equal the growing path's
    _, plain = model.step(texts=texts, pos_texts=torch.arange(N).expand(2, N), past=None)
    torch.testing.assert_close(cache[0].keys[:, :, :N], plain[0][0], rtol=0, atol=0)
    full = LayerKV(capacity=2)
    with pytest.raises(ValueError, match="cannot take positions 0..2"):
        full.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("mode", ["continuation", "visualization", "chain", "prompt"])
def test_story_static_cache_draws_the_growing_loops_codes(mode):
    torch.manual_seed(0)
    net = StoryDalleNet(tiny_cfg(), story_len=4, sent_embed=E, prompt=mode == "prompt", preseqlen=2).eval()
    with torch.no_grad():
        for layer in net.cross_attn:  # open the gates: cross-attention changes every cached step
            layer.gate.fill_(1.0)
    texts, source, sent = story_inputs()
    source = None if mode == "visualization" else source
    kw = dict(top_k=8, top_p=0.9, temperature=1.3, chain=mode == "chain")
    draw = lambda **more: net.sample(texts, sent, source, generator=[torch.Generator().manual_seed(7 + b)  # noqa
                                                                     for b in range(B)], **kw, **more)
    static, growing, uncached = draw(), draw(static_cache=False), draw(use_cache=False)
    assert static.shape == (B, L, T)
    assert torch.equal(static, growing) and torch.equal(static, uncached)


def test_story_source_frame_is_projected_once_per_frame_batch():
    """Growing loop: the cross-attention keys of the source are computed at every one of the T steps; static: once."""
    torch.manual_seed(0)
    net = StoryDalleNet(tiny_cfg(), story_len=4, sent_embed=E).eval()
    texts, source, sent = story_inputs()
    calls: list[int] = []
    hooks = [layer.attn.key.register_forward_hook(lambda *_: calls.append(1)) for layer in net.cross_attn]
    try:
        net.sample(texts, sent, source, top_k=8, top_p=None, static_cache=False)
        growing, calls[:] = len(calls), []
        net.sample(texts, sent, source, top_k=8, top_p=None)
    finally:
        for h in hooks:
            h.remove()
    assert growing == T * len(net.cross_attn) and len(calls) == len(net.cross_attn)


def test_static_cache_switch_composes_and_keeps_the_systems_stories(tmp_path, shared_data_dir):
    cfg = compose_cfg(TINY + ["model.sampler.static_cache=false"], tmp_path, data_dir=shared_data_dir)
    assert cfg.model.sampler.static_cache is False
    cfg, model = build(tmp_path, data_dir=shared_data_dir)
    assert cfg.model.sampler.static_cache is True
    batch = demo_batch(cfg)
    assert torch.equal(model.generate(batch), model.generate(batch, static_cache=False))
    assert isinstance(model.net.stage2.new_cache(), StaticKVCache)
