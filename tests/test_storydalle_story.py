"""StoryDalleNet (StoryDALL-E on minDALL-E) at tiny sizes: shapes, registered/gated cross-attention, losses,
cached == uncached sampling, vocabulary growth and the released-checkpoint loader."""

from __future__ import annotations

import pytest
import torch

from storyexp.models.mindalle.story import (
    StoryDalleNet,
    cross_attn_block_indices,
    load_storydalle_checkpoint,
    sample_story_codes,
)
from storyexp.models.mindalle.transformer import Stage2Config
from storyexp.utils.loading import CheckpointMismatchError

B, L, N, T, S, E = 2, 3, 8, 6, 6, 12
PAD = 0


def tiny_cfg(**kw) -> Stage2Config:
    base = dict(vocab_size_txt=40, vocab_size_img=32, embed_dim=32, n_layers=6, n_heads=4, n_dense_layers=6,
                ctx_len_img=T, ctx_len_txt=N)
    base.update(kw)
    return Stage2Config(**base)


def make_net(seed: int = 0, **kw) -> StoryDalleNet:
    torch.manual_seed(seed)
    kw.setdefault("story_len", 4)
    kw.setdefault("sent_embed", E)
    return StoryDalleNet(tiny_cfg(), **kw)


def batch(seed: int = 1, pad_from: int | None = 5):
    g = torch.Generator().manual_seed(seed)
    texts = torch.randint(1, 40, (B, L, N), generator=g)
    if pad_from is not None:
        texts[..., pad_from:] = PAD
    images = torch.randint(0, 32, (B, L, T), generator=g)
    source = torch.randint(0, 32, (B, S), generator=g)
    sent = torch.randn(B, L, E, generator=g)
    return texts, images, source, sent


def plain_forward(net: StoryDalleNet, texts, images, sent):
    """The same sequence through the plain Transformer1d blocks (Block.forward, no cross-attention)."""
    texts, images = texts.reshape(B * L, N), images.reshape(B * L, T)
    prompt = net.story_embeddings(sent)
    P = prompt.shape[1]
    x = net._sequence(prompt, texts, images)
    for blk in net.stage2.blocks:
        x, _ = blk(x)
    h = net.stage2.ln_f(x)
    return net.stage2.head_img(h[:, P + N - 1 : P + N - 1 + T]), net.stage2.head_txt(h[:, P : P + N - 1])


def test_shapes_and_cross_layout():
    net = make_net().eval()
    texts, images, source, sent = batch()
    li, lt = net(texts, images, source, sent)
    assert li.shape == (B * L, T, 32) and lt.shape == (B * L, N - 1, 40)
    assert net.cross_blocks == [2, 5] == cross_attn_block_indices(6)
    assert cross_attn_block_indices(42) == list(range(2, 42, 3))
    assert net.story_embeddings(sent).shape == (B * L, 1, 32)
    pnet = make_net(prompt=True, preseqlen=3).eval()
    assert pnet.story_embeddings(sent).shape == (B * L, 4, 32)
    li, lt = pnet(texts, images, source, sent)
    assert li.shape == (B * L, T, 32) and lt.shape == (B * L, N - 1, 40)
    keys = set(pnet.state_dict())
    assert {"wte.weight", "control_trans.0.weight", "control_trans.2.bias", "story_linear.weight",
            "story_block.attn.query.weight", "story_block.mlp.2.weight", "stage2.blocks.0.attn.key.weight"} <= keys
    assert not any("mask" in k for k in keys)


def test_cross_attention_registered_and_trained():
    net = make_net()  # gate_init="zero"
    sd = net.state_dict()
    for j in range(2):
        for name in ("ln1.weight", "ln2.bias", "attn.query.weight", "attn.key.weight", "attn.value.weight",
                     "attn.proj.weight", "gate"):
            assert f"cross_attn.{j}.{name}" in sd
    params = dict(net.named_parameters())
    assert "cross_attn.0.attn.value.weight" in params
    texts, images, source, sent = batch()
    net.loss(texts, images, source, sent, PAD)["loss"].backward()
    for j in range(2):
        g = net.cross_attn[j].gate.grad
        assert g is not None and g.abs().item() > 0  # the zero gate still learns

    # Open the gate (or the ungated original): every cross-attention weight now gets a gradient.
    for gate_init in ("zero", "none"):
        net = make_net(gate_init=gate_init)
        if gate_init == "zero":
            with torch.no_grad():
                for layer in net.cross_attn:
                    layer.gate.fill_(0.5)
        else:
            assert all(layer.gate is None for layer in net.cross_attn)
        net.loss(texts, images, source, sent, PAD)["loss"].backward()
        for name, p in net.named_parameters():
            if name.startswith("cross_attn."):
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                if not name.endswith("attn.key.bias"):  # softmax is invariant to the key bias: grad ~0 by design
                    assert p.grad.abs().sum().item() > 0, name


def test_zero_gate_equals_plain_transformer():
    net = make_net().eval()
    texts, images, source, sent = batch()
    with torch.no_grad():
        li, lt = net(texts, images, source, sent)
        ri, rt = plain_forward(net, texts, images, sent)
    torch.testing.assert_close(li, ri, rtol=0, atol=1e-6)
    torch.testing.assert_close(lt, rt, rtol=0, atol=1e-6)
    # the source does matter once the gate is open, and only at image-predicting positions
    with torch.no_grad():
        for layer in net.cross_attn:
            layer.gate.fill_(1.0)
        li2, lt2 = net(texts, images, source, sent)
    assert (li2 - ri).abs().max() > 1e-4
    torch.testing.assert_close(lt2, rt, rtol=0, atol=1e-6)


def test_text_loss_masking():
    net = make_net().eval()
    texts, images, source, sent = batch(pad_from=4)
    with torch.no_grad():
        masked = net.loss(texts, images, source, sent, PAD, mask_text_padding=True)
        orig = net.loss(texts, images, source, sent, PAD, mask_text_padding=False)
    assert set(masked) == {"loss", "loss_img", "loss_txt"}
    torch.testing.assert_close(masked["loss_img"], orig["loss_img"])
    assert (masked["loss_txt"] - orig["loss_txt"]).abs() > 1e-5
    torch.testing.assert_close(masked["loss"], masked["loss_img"] + masked["loss_txt"])
    # no padding: both agree
    texts, images, source, sent = batch(pad_from=None)
    with torch.no_grad():
        a = net.loss(texts, images, source, sent, PAD, mask_text_padding=True)["loss_txt"]
        b = net.loss(texts, images, source, sent, PAD, mask_text_padding=False)["loss_txt"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prompt", [False, True])
def test_cached_equals_uncached_sampling(prompt):
    net = make_net(prompt=prompt, preseqlen=2).eval()
    with torch.no_grad():
        for layer in net.cross_attn:  # exercise cross-attention on every cached step
            layer.gate.fill_(1.0)
    texts, _, source, sent = batch()
    kw = dict(top_k=8, top_p=0.9, temperature=1.3)
    cached = net.sample(texts, sent, source, generator=torch.Generator().manual_seed(7), **kw)
    uncached = net.sample(texts, sent, source, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert cached.shape == (B, L, T)
    assert torch.equal(cached, uncached)
    # global-RNG path (generator=None) is seeded by torch.manual_seed, as the original
    torch.manual_seed(3)
    a = sample_story_codes(net, texts, sent, source, **kw)
    torch.manual_seed(3)
    b = sample_story_codes(net, texts, sent, source, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_cached_step_logits_match_full_forward():
    """Per-step cached logits equal the teacher-forced forward's (first token read at P+N-1, cross-attn each step)."""
    net = make_net().eval()
    with torch.no_grad():
        for layer in net.cross_attn:
            layer.gate.fill_(1.0)
    texts, images, source, sent = batch()
    with torch.no_grad():
        li, _ = net(texts, images, source, sent)
        prompt = net.story_embeddings(sent)
        P = prompt.shape[1]
        src = net.source_embeddings(source, L)
        flat_t, flat_i = texts.reshape(B * L, N), images.reshape(B * L, T)
        first = P + N - 1
        logits, past = net.step(prompt=prompt, texts=flat_t, src=src, start=0, first_img_pred=first)
        steps = [logits]
        for t in range(1, T):
            logits, past = net.step(images=flat_i[:, t - 1 : t], src=src, start=first + t, first_img_pred=first,
                                    past=past)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), li, rtol=1e-5, atol=1e-5)


def test_grow_text_vocab_keeps_old_rows():
    net = make_net()
    emb, head = net.stage2.tok_emb_txt.weight.detach().clone(), net.stage2.head_txt.weight.detach().clone()
    assert net.grow_text_vocab(9) == 49
    assert net.cfg.vocab_size_txt == 49
    assert net.stage2.tok_emb_txt.weight.shape == (49, 32) and net.stage2.head_txt.weight.shape == (49, 32)
    torch.testing.assert_close(net.stage2.tok_emb_txt.weight[:40].detach(), emb, rtol=0, atol=0)
    torch.testing.assert_close(net.stage2.head_txt.weight[:40].detach(), head, rtol=0, atol=0)
    assert net.stage2.tok_emb_txt.weight[40:].abs().sum() > 0
    # the new tokens are usable end to end
    texts, images, source, sent = batch()
    texts[..., 1] = 45
    out = net.loss(texts, images, source, sent, PAD)
    out["loss"].backward()
    assert net.stage2.tok_emb_txt.weight.grad[45].abs().sum() > 0


def released_layout(src_net: StoryDalleNet) -> dict:
    """A checkpoint in the released layout: stage1.*, stage2.*, story_*; no cross-attention keys."""
    sd = {k: v.clone() for k, v in src_net.state_dict().items() if not k.startswith("cross_attn.")}
    sd["stage1.quantize.embedding.weight"] = torch.randn(32, 4)
    return {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {}, "iteration": 10, "loss": 1.0}


def test_checkpoint_roundtrip_and_listing(tmp_path):
    src = make_net(seed=11)
    src.grow_text_vocab(9)  # Pororo-style: the vocab size must be taken from the tensors
    ckpt = released_layout(src)
    path = tmp_path / "pororo_3.pth"
    torch.save(ckpt, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)

    dst = make_net(seed=22)
    assert dst.cfg.vocab_size_txt == 40
    stage1 = load_storydalle_checkpoint(dst, loaded)
    assert dst.cfg.vocab_size_txt == 49
    assert set(stage1) == {"quantize.embedding.weight"}
    dsd = dst.state_dict()
    for k, v in ckpt["model_state_dict"].items():
        if k.startswith("stage2.") or k.startswith("story_"):
            assert torch.equal(dsd[k], v), k
    # zero gates: the loaded net computes the released backbone's function exactly
    texts, images, source, sent = batch()
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(texts, images, source, sent)[0], src(texts, images, source, sent)[0])

    # a full state dict (with cross-attention) round-trips strictly too
    full = {k: v.clone() for k, v in src.state_dict().items()}
    dst2 = make_net(seed=33)
    load_storydalle_checkpoint(dst2, {"state_dict": full})
    assert all(torch.equal(dst2.state_dict()[k], v) for k, v in full.items())

    # a missing key is listed
    broken = dict(ckpt["model_state_dict"])
    del broken["story_block.mlp.0.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): story_block\.mlp\.0\.bias;"):
        load_storydalle_checkpoint(make_net(), {"model_state_dict": broken})
    # a partial cross-attention set is not excused
    partial = dict(full)
    del partial["cross_attn.1.gate"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): cross_attn\.1\.gate;"):
        load_storydalle_checkpoint(make_net(), partial)
    # unexpected keys (a --prompt checkpoint into a non-prompt net) are listed
    extra = dict(ckpt["model_state_dict"], **{"wte.weight": torch.zeros(2, 32)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): wte\.weight;"):
        load_storydalle_checkpoint(make_net(), extra)
