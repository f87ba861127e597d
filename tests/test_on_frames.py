"""The explicit per-frame callback `on_frames`: `sample_story_frames` reports each drawn group (first index, codes)
in every frame order, the groups concatenate to the returned codes, the callback only observes (same codes
without it), and it reaches the samplers through StoryDalleNet.sample and the Mega system's `stream_story`."""

from __future__ import annotations

import hydra
import pytest
import torch

from storyexp.models.story_frames import sample_story_frames

from .conftest import TINY_DEMO, compose_cfg

B, T = 2, 3


def fake_draw(calls: list):
    """A deterministic `draw`: the codes of frame f depend on f and on the source's codes (so chaining matters)."""

    def draw(frames, source):
        calls.append((list(frames), None if source is None else source.clone()))
        base = torch.zeros(B, 1, T, dtype=torch.long) if source is None else source.sum(1).view(B, 1, 1)
        return torch.stack([base[:, 0] + 10 * (f + 1) + torch.arange(T) for f in frames], dim=1)

    return draw


# (source given, chain) -> the groups of frames drawn for 5 frames, in order
GROUPS = {
    (False, False): [[0], [1, 2, 3, 4]],  # visualization: frame 0 alone, then the rest from it
    (True, False): [[0, 1, 2, 3, 4]],  # continuation: all together from the source
    (False, True): [[0], [1], [2], [3], [4]],
    (True, True): [[0], [1], [2], [3], [4]],
}


@pytest.mark.parametrize("with_source,chain", list(GROUPS))
def test_on_frames_reports_each_drawn_group_and_they_concatenate_to_the_codes(with_source, chain):
    source = torch.arange(B * T).view(B, T) if with_source else None
    reports, calls, plain_calls = [], [], []
    codes = sample_story_frames(fake_draw(calls), 5, source, chain,
                                on_frames=lambda first, c: reports.append((first, c.clone())))
    groups = GROUPS[(with_source, chain)]
    assert [frames for frames, _ in calls] == groups
    assert [first for first, _ in reports] == [g[0] for g in groups]
    assert [c.shape for _, c in reports] == [(B, len(g), T) for g in groups]
    assert torch.equal(torch.cat([c for _, c in reports], dim=1), codes)
    assert codes.shape == (B, 5, T)
    # the callback only observes: the same draws and codes without it
    assert torch.equal(sample_story_frames(fake_draw(plain_calls), 5, source, chain), codes)
    assert len(plain_calls) == len(calls)
    # the order the sources come from, computed independently: chain -> the previous frame's codes
    for (frames, src), f in zip(calls, [g[0] for g in groups]):
        if chain and f > 0:
            assert torch.equal(src, codes[:, f - 1])
        elif not with_source and f > 0:
            assert torch.equal(src, codes[:, 0])
        elif with_source and f == 0:
            assert torch.equal(src, source)
        else:
            assert src is None


@pytest.mark.parametrize("continuation,chain", [(False, False), (True, True)])
def test_storydalle_net_sample_passes_on_frames_through(continuation, chain):
    from storyexp.models.mindalle.story import StoryDalleNet
    from storyexp.models.mindalle.transformer import Stage2Config

    torch.manual_seed(0)
    cfg = Stage2Config(vocab_size_txt=40, vocab_size_img=32, embed_dim=32, n_layers=2, n_heads=4, n_dense_layers=2,
                       ctx_len_img=4, ctx_len_txt=6)
    net = StoryDalleNet(cfg, story_len=3, sent_embed=8).eval()
    g = torch.Generator().manual_seed(1)
    texts, sent = torch.randint(1, 40, (B, 3, 6), generator=g), torch.randn(B, 3, 8, generator=g)
    source = torch.randint(0, 32, (B, 4), generator=g) if continuation else None
    reports = []
    kw = dict(top_k=8, top_p=None, chain=chain)
    codes = net.sample(texts, sent, source, generator=torch.Generator().manual_seed(7),
                       on_frames=lambda first, c: reports.append((first, c.clone())), **kw)
    assert torch.equal(net.sample(texts, sent, source, generator=torch.Generator().manual_seed(7), **kw), codes)
    expected = [0, 1, 2] if chain else [0, 1]
    assert [first for first, _ in reports] == expected
    assert torch.equal(torch.cat([c for _, c in reports], dim=1), codes)


def test_mega_stream_story_reports_the_frames_generate_candidates_draws(tmp_path, shared_data_dir):
    """StoryDALL-E on Mega (chain: one report per frame) streams exactly generate_candidates' frames, in order;
    the model's sampling is untouched after the stream."""
    cfg = compose_cfg(TINY_DEMO + ["model=mega_tiny"], tmp_path, data_dir=shared_data_dir)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v[:1] for k, v in batch.items()}  # one story keeps it quick
    updates = list(model.stream_story(batch, seed=3, num_candidates=2, chain=True))
    stories = model.generate_candidates(batch, seed=3, num_candidates=2, chain=True)
    V = model.num_targets
    assert [u.index for u in updates] == [*range(V), None]
    assert torch.equal(updates[-1].frames, stories)
    assert torch.equal(torch.stack([u.frames for u in updates[:-1]], dim=2), stories)
    assert model._frame_listener is None
