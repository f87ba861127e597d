"""Fast unit tests of the AR-LDM network layer on a tiny model built from sizes (no parity files needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from storyexp.errors import MissingResourceError
from storyexp.utils.loading import CheckpointMismatchError

from storyexp.models.arldm import (
    ARLDM,
    BlipMultimodalConfig,
    BlipMultimodalEncoder,
    PixelAutoencoder,
    add_character_tokens,
    blip_preprocess,
    blip_resize,
    blip_resize_pil,
    build_arldm_from_pretrained,
    build_arldm_from_sizes,
    context_mask,
    extend_position_embeddings,
    interpolate_pos_embed,
    load_clip_tokenizer,
    load_blip_tokenizer,
    load_original_arldm_checkpoint,
    load_salesforce_blip_state_dict,
    masked_unet_forward,
    tokenize,
    write_bert_tokenizer,
    write_clip_tokenizer,
)

WORDS = (
    "pororo crong loopy eddy is are playing eating cake in the snow with a big tree . , ! "
    "runs outside to see house kitchen soup cooking builds new machine and together at table"
).split()
CHARACTERS = ["pororo", "crong", "poby"]
S = 16
SIZE = 16  # image size of the tiny tests
SOURCES = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    components = build_arldm_from_sizes(
        WORDS,
        tmp_path_factory.mktemp("tokenizers"),
        max_length=S,
        new_tokens=CHARACTERS,
        width=32,
        blip=dict(image_size=32, patch_size=8),
        unet=dict(sample_size=8),
        vae=dict(kind="pixel", factor=2),
        seed=0,
    )
    components.model.eval()
    return components


def _batch(components, texts, v, b=1, seed=0):
    """A tensor batch in the model's contract for ``b`` stories of ``texts`` (5 captions each)."""
    g = torch.Generator().manual_seed(seed)
    model = components.model
    clip_ids, clip_mask = tokenize(components.clip_tokenizer, [t for _ in range(b) for t in texts[SOURCES - v :]], S)
    bert_ids, bert_mask = tokenize(components.blip_tokenizer, [t for _ in range(b) for t in texts], S)
    hb = model.mm_encoder.image_size
    return dict(
        images=torch.rand(b, v, 3, SIZE, SIZE, generator=g) * 2 - 1,
        captions=clip_ids.view(b, v, S),
        attention_mask=clip_mask.view(b, v, S),
        source_images=torch.randn(b, SOURCES, 3, hb, hb, generator=g),
        source_caption=bert_ids.view(b, SOURCES, S),
        source_attention_mask=bert_mask.view(b, SOURCES, S),
    )


TEXTS = [
    "pororo is playing in the snow .",
    "crong runs outside to see the big tree .",
    "loopy is cooking soup in the kitchen .",
    "eddy builds a new machine .",
    "pororo and crong are eating cake together !",
]
OTHER = ["poby eats cake .", "eddy runs .", "the house !", "crong and loopy .", "a big machine in the snow ."]


def _fixed_draws(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.vae.config.latent_channels
    h = SIZE // model.vae_downsampling
    return dict(
        cfg_rows=torch.zeros(n, dtype=torch.bool),
        noise=torch.randn(n, c, h, h, generator=g),
        timesteps=torch.randint(0, 1000, (n,), generator=g),
    )


# ------------------------------------------------------------------------------------------------ training step


@pytest.mark.parametrize("v", [4, 5], ids=["continuation", "visualization"])
def test_training_loss_shapes_and_gradients(tiny, v):
    model = tiny.model
    batch = _batch(tiny, TEXTS, v, b=2)
    model.zero_grad()
    out = model.training_loss(**batch, generator=torch.Generator().manual_seed(0))
    n, s, d = 2 * v, S, model.width
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.encoder_hidden_states.shape == (n, (SOURCES + 1) * s, d)
    assert out.encoder_attention_mask.shape == (n, (SOURCES + 1) * s) and out.encoder_attention_mask.dtype == torch.bool
    assert out.noise_pred.shape == out.noise.shape == (n, model.vae.config.latent_channels, SIZE // 2, SIZE // 2)
    assert out.source_embeds.shape == (2 * SOURCES, s, d) and out.caption_embeds.shape == (n, s, d)
    out.loss.backward()
    for name in ("unet.conv_in.weight", "modal_type_embeddings.weight", "time_embeddings.weight",
                 "text_encoder.embeddings.token_embedding.weight", "mm_encoder.text.embeddings.word_embeddings.weight",
                 "mm_encoder.vision.embeddings.patch_embedding.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_training_draws_are_reproducible_and_cfg_probability(tiny):
    model = tiny.model
    batch = _batch(tiny, TEXTS, 4, b=2)
    with torch.no_grad():
        a = model.training_loss(**batch, generator=torch.Generator().manual_seed(3))
        b = model.training_loss(**batch, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.timesteps, b.timesteps)
        everything = model.training_loss(**batch, cfg_prob=1.0)
        nothing = model.training_loss(**batch, cfg_prob=0.0)
    assert bool(everything.cfg_rows.all()) and not bool(nothing.cfg_rows.any())
    # unconditional rows: same context whatever the caption; mask keeps only the block-causal part
    ctx = everything.encoder_hidden_states.view(2, 4, -1, model.width)
    assert torch.equal(ctx[0], ctx[1])
    assert not bool(everything.encoder_attention_mask[:, : 2 * S].any())


def test_blocked_history_and_padding_cannot_change_the_prediction(tiny):
    """Continuation: target j sees frames 0..j; frames > j and padding tokens must not matter."""
    model = tiny.model
    batch = _batch(tiny, TEXTS, 4)
    draws = _fixed_draws(model, 4)
    with torch.no_grad():
        ref = model.training_loss(**batch, **draws).noise_pred
        changed = dict(batch)
        changed["source_images"] = batch["source_images"].clone()
        changed["source_images"][:, 3] = torch.randn_like(batch["source_images"][:, 3]) * 3
        changed["source_caption"] = batch["source_caption"].clone()
        changed["source_caption"][:, 3, 1:4] = torch.tensor([11, 12, 13])
        out = model.training_loss(**changed, **draws).noise_pred
        # frame 3 is hidden from targets 0..2 (frames 1..3) and visible to target 3 (frame 4)
        assert torch.allclose(out[:3], ref[:3], atol=1e-6)
        assert (out[3] - ref[3]).abs().max() > 1e-4
        padded = dict(batch)
        padded["captions"] = torch.where(batch["attention_mask"] == 0, 7, batch["captions"])
        padded["source_caption"] = torch.where(batch["source_attention_mask"] == 0, 9, batch["source_caption"])
        out = model.training_loss(**padded, **draws).noise_pred
        assert torch.allclose(out, ref, atol=1e-6)


def test_context_mask_layout():
    s = 2
    clip_mask = torch.tensor([[1, 0]]).repeat(4, 1).view(1, 4, s)
    bert_mask = torch.tensor([[1, 1]]).repeat(5, 1).view(1, 5, s)
    blocked = context_mask(clip_mask, bert_mask).int()
    seg = blocked.view(4, 6, s)[..., 0]  # per-segment view (first token of each segment)
    # caption segment open; frame 0 (segment 1) always visible; target j blocks frames j+1..4
    expected = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]])
    assert torch.equal(seg, expected)
    assert bool(blocked.view(4, 6, s)[:, 0, 1].all())  # the padded caption token
    vis = context_mask(clip_mask.new_ones(1, 5, s), bert_mask).view(5, 6, s)[..., 0].int()
    assert torch.equal(vis[0], torch.tensor([0, 1, 1, 1, 1, 1]))  # first target: its caption only
    cfg = context_mask(clip_mask, bert_mask, cfg_rows=torch.tensor([True, False, False, False]))
    assert not bool(cfg[0, : 2 * s].any())


# ------------------------------------------------------------------------------------------------ UNet masking


def test_unet_blocked_positions_do_not_matter(tiny):
    unet = tiny.model.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 12, 32, generator=g)
    blocked = torch.rand(2, 12, generator=g) < 0.5
    blocked[:, 0] = False
    with torch.no_grad():
        ref = masked_unet_forward(unet, x, torch.tensor([10, 500]), ctx, blocked)
        other = torch.where(blocked[..., None], torch.randn_like(ctx) * 5, ctx)
        out = masked_unet_forward(unet, x, torch.tensor([10, 500]), other, blocked)
        free = masked_unet_forward(unet, x, torch.tensor([10, 500]), other, None)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (free - ref).abs().max() > 1e-3


def test_mask_dropping_attention_processor_is_refused(tiny):
    class NoMaskProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            raise AssertionError("must not be reached")

    unet = tiny.model.unet
    saved = unet.attn_processors
    unet.set_attn_processor(NoMaskProcessor())
    try:
        with pytest.raises(RuntimeError, match="cross-attention mask"):
            masked_unet_forward(unet, torch.zeros(1, 12, 8, 8), 1, torch.zeros(1, 4, 32), None)
    finally:
        unet.set_attn_processor(saved)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("v", [4, 5], ids=["continuation", "visualization"])
def test_sample_returns_uint8_images(tiny, v):
    model = tiny.model
    batch = _batch(tiny, TEXTS, v)
    del batch["images"]
    steps = 2
    calls = []  # (context, blocked) of every UNet call, seen by a standard forward pre-hook

    def hook(module, args, kwargs):
        calls.append((args[2], kwargs["encoder_attention_mask"] == 0))  # diffusers' keep-mask -> True = blocked

    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = model.sample(
            **batch, scheduler=DDIMScheduler(), num_inference_steps=steps, guidance_scale=3.0, height=SIZE,
            width=SIZE, generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert images.dtype == torch.uint8 and images.shape == (1, v, SIZE, SIZE, 3)
    assert len(calls) == v * steps
    # the masks are the initial ones of each target, and the unconditional half of the context never changes
    with torch.no_grad():
        ctx = model.sampling_contexts(**batch)
    for i in range(v):
        for context, blocked in calls[i * steps : (i + 1) * steps]:
            assert torch.equal(blocked, ctx.frame(i)[1])
            assert torch.equal(context[:1], ctx.uncond[:, i])
    # feedback: history slot of frame (i + src_V - V) holds BLIP(returned frame i) + modal[1] + time
    offset = SOURCES - v
    last = calls[-1][0][1:]
    for i in range(v - 1):
        f = i + offset
        caption, caption_mask = batch["source_caption"][:, f], batch["source_attention_mask"][:, f]
        with torch.no_grad():
            new = model.encode_generated(images[:, i], caption, caption_mask)
            expected = model.history_update(new, f)
        assert torch.allclose(last[:, (1 + f) * S : (2 + f) * S], expected, atol=1e-6)


def test_sample_batches_stay_story_major(tiny):
    """Two stories sampled together come back in input order, each as if sampled alone (no interleaving)."""
    model = tiny.model
    a, b = _batch(tiny, TEXTS, 4, seed=1), _batch(tiny, OTHER, 4, seed=2)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, model.vae.config.latent_channels, SIZE // 2, SIZE // 2, generator=g)
    keys = ("captions", "attention_mask", "source_images", "source_caption", "source_attention_mask")

    def run(stories, lat):
        batch = {k: torch.cat([st[k] for st in stories]) for k in keys}
        return model.sample(**batch, scheduler=PNDMScheduler(skip_prk_steps=True), num_inference_steps=2,
                            guidance_scale=2.0, height=SIZE, width=SIZE, initial_latents=lat)

    ab = run([a, b], latents)
    ba = run([b, a], latents.flip(0))
    alone = run([a], latents[:1])
    assert ab.shape == (2, 4, SIZE, SIZE, 3)
    assert (ab[0].int() - ba[1].int()).abs().max() <= 1 and (ab[1].int() - ba[0].int()).abs().max() <= 1
    assert (ab[0].int() - alone[0].int()).abs().max() <= 1
    assert (ab[0].int() - ab[1].int()).abs().max() > 10  # different stories really differ


# ------------------------------------------------------------------------------------------------ checkpoints

_REVERSE_BLIP = [
    (r"^vision\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision\.post_layernorm\.", "visual_encoder.norm."),
    (r"^text\.", "text_encoder."),
]


def _salesforce_name(key: str) -> str:
    for pattern, repl in _REVERSE_BLIP:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise AssertionError(f"no Salesforce name for {key}")


def _original_format(model: ARLDM) -> dict:
    """The tiny model's state dict written in the original AR-LDM naming (what its Lightning ckpt holds)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("text_encoder."):
            out["text_encoder.text_model." + key[len("text_encoder.") :]] = value
        elif key.startswith("mm_encoder."):
            out["mm_encoder." + _salesforce_name(key[len("mm_encoder.") :])] = value
        else:
            out[key] = value
    out["text_encoder.text_model.embeddings.position_ids"] = torch.arange(S).view(1, -1)
    positions = model.mm_encoder.config.text_max_positions
    out["mm_encoder.text_encoder.embeddings.position_ids"] = torch.arange(positions).view(1, -1)
    return out


def _fresh(tmp_path):
    return build_arldm_from_sizes(WORDS, tmp_path / "tok", max_length=S, new_tokens=CHARACTERS, width=32,
                                  blip=dict(image_size=32, patch_size=8), unet=dict(sample_size=8), seed=1).model


def test_original_checkpoint_round_trip_and_strict_errors(tiny, tmp_path):
    state = _original_format(tiny.model)
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 7}, path)
    fresh = _fresh(tmp_path)
    assert load_original_arldm_checkpoint(fresh, path) == {"epoch": 3, "global_step": 7}
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    broken = dict(state)
    del broken["unet.conv_in.bias"]
    broken["mm_encoder.itm_head.weight"] = torch.zeros(2, 32)  # unknown BLIP part
    broken["time_embeddings.weight"] = torch.zeros(9, 32)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_original_arldm_checkpoint(fresh, tmp_path / "broken.ckpt")
    message = str(err.value)
    assert re.search(r"missing keys \(1\): unet\.conv_in\.bias", message)
    assert re.search(r"unexpected keys \(1\): mm_encoder\.itm_head\.weight", message)
    assert "time_embeddings.weight (file (9, 32) vs model (5, 32))" in message
    assert "\n" not in message and str(tmp_path / "broken.ckpt") in message


def test_salesforce_blip_loader_resizes_and_checks(tiny):
    encoder = tiny.model.mm_encoder
    state = {_salesforce_name(k): v for k, v in encoder.state_dict().items()}
    state.update({"vision_proj.weight": torch.zeros(1), "image_queue": torch.zeros(1)})  # ignored extras
    config = BlipMultimodalConfig(**{**encoder.config.__dict__, "vocab_size": encoder.config.vocab_size + 3})
    bigger = BlipMultimodalEncoder(config)
    load_salesforce_blip_state_dict(bigger, state, generator=torch.Generator().manual_seed(0))
    words = encoder.text.embeddings.word_embeddings.weight
    assert torch.equal(bigger.text.embeddings.word_embeddings.weight[: words.shape[0]], words)

    # a checkpoint trained at another resolution: pos_embed is interpolated over the patch grid, cls row kept
    config = BlipMultimodalConfig(**{**encoder.config.__dict__, "image_size": 48})
    larger = BlipMultimodalEncoder(config)
    load_salesforce_blip_state_dict(larger, state)
    pos = larger.vision.embeddings.position_embedding
    assert pos.shape == (1, 37, encoder.config.vision_width)
    assert torch.equal(pos[:, :1], state["visual_encoder.pos_embed"][:, :1])
    assert torch.equal(pos, interpolate_pos_embed(state["visual_encoder.pos_embed"], 36))
    assert torch.equal(interpolate_pos_embed(state["visual_encoder.pos_embed"], 16), state["visual_encoder.pos_embed"])

    del state["text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"text\.encoder\.layer\.0\.crossattention\.self\.key\.weight"):
        load_salesforce_blip_state_dict(bigger, state)


def test_missing_pretrained_files_give_one_error(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text("{}")
    (tmp_path / "bert").mkdir()
    with pytest.raises(MissingResourceError) as err:
        build_arldm_from_pretrained(tmp_path / "sd", tmp_path / "model_large.pth", tmp_path / "bert", local_files_only=True)
    message = str(err.value)
    for expected in ("UNet weights", "VAE config", "CLIP tokenizer vocabulary", "model_large.pth",
                     "BERT tokenizer vocabulary", "storage.googleapis.com"):
        assert expected in message, expected
    with pytest.raises(MissingResourceError, match="offline"):
        build_arldm_from_pretrained("someone/not-cached-model", tmp_path / "model_large.pth", tmp_path / "bert",
                                    local_files_only=True)


# ------------------------------------------------------------------------------------------------ pieces


def test_tokenizer_writers_round_trip(tmp_path):
    words = WORDS + ["bananas", "banana", "ban", "café", "aaaa", "aaa"]
    clip = load_clip_tokenizer(write_clip_tokenizer(words, tmp_path / "clip", model_max_length=S))
    bert = load_blip_tokenizer(write_bert_tokenizer(words, tmp_path / "bert"))
    for w in words:
        assert len(clip(w, add_special_tokens=False).input_ids) == 1, w
    assert clip.convert_ids_to_tokens([clip.bos_token_id, clip.eos_token_id, clip.pad_token_id]) == [
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"]
    assert clip.convert_tokens_to_ids(["!", "!</w>"]) == [0, 256]
    text = "pororo and crong eat zebra soup at noon !"
    ids = clip(text).input_ids
    assert clip.decode(ids, skip_special_tokens=True).strip() == text  # unseen words fall back to bytes
    vocab = (tmp_path / "bert" / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = bert.convert_ids_to_tokens(bert("Pororo meets a xylophone-playing zebra, 42!").input_ids)
    assert "[UNK]" not in tokens and tokens[0] == "[CLS]" and tokens[1] == "pororo"
    assert bert.enc_token_id == len(bert) - 1 and bert.bos_token_id == len(bert) - 2
    from transformers import BertTokenizerFast

    fast = BertTokenizerFast.from_pretrained(str(tmp_path / "bert"))
    assert fast("a big tree").input_ids == bert("a big tree").input_ids
    assert add_character_tokens(bert, ["pororo", "poby"]) == ["poby"]


def test_build_with_kl_autoencoder(tmp_path):
    components = build_arldm_from_sizes(
        WORDS, tmp_path, max_length=S, unet=dict(sample_size=8),
        vae=dict(kind="kl", block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4),
    )
    model = components.model
    assert model.vae_downsampling == 2 and model.latent_scale_factor == pytest.approx(0.18215)
    assert not any(p.requires_grad for p in model.vae.parameters())
    with torch.no_grad():
        out = model.training_loss(**_batch(components, TEXTS, 4))
    assert out.noise_pred.shape == (4, 4, SIZE // 2, SIZE // 2) and torch.isfinite(out.loss)
    model.train()
    assert not model.vae.training and model.unet.training


def test_pixel_autoencoder_is_lossless():
    vae = PixelAutoencoder(factor=2)
    x = torch.rand(3, 3, 8, 12) * 2 - 1
    posterior = vae.encode(x).latent_dist
    assert posterior.mean.shape == (3, 12, 4, 6) and vae.config.latent_channels == 12
    assert torch.equal(posterior.std, torch.zeros_like(posterior.mean))
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode(z).sample, x)
    assert list(vae.parameters()) == []
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 7, 8))


def test_clip_position_extension(tiny):
    from transformers import CLIPTextModel

    model = CLIPTextModel(tiny.model.text_encoder.config)
    old = model.embeddings.position_embedding.weight.detach().clone()
    extend_position_embeddings(model, S + 4, generator=torch.Generator().manual_seed(0))
    assert model.config.max_position_embeddings == S + 4
    assert torch.equal(model.embeddings.position_embedding.weight[:S], old)
    assert torch.equal(model.embeddings.position_ids, torch.arange(S + 4).view(1, -1))
    out = model(input_ids=torch.zeros(1, S + 4, dtype=torch.long)).last_hidden_state
    assert out.shape == (1, S + 4, model.config.hidden_size)
    extend_position_embeddings(model, S - 2)
    assert torch.equal(model.embeddings.position_embedding.weight, old[: S - 2])


@pytest.mark.parametrize("size", [(40, 56), (9, 9), (64, 64)], ids=["down", "up", "exact"])
def test_blip_preprocess_pillow_and_torch_paths(size):
    images = np.random.default_rng(0).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    ours = blip_preprocess(torch.from_numpy(images), 32)
    assert ours.shape == (2, 3, 32, 32)
    resized = np.stack([blip_resize_pil(im, 32) for im in images])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    assert torch.equal(ours, (torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255 - mean) / std)
    fast = blip_resize(torch.from_numpy(images), 32, backend="torch")
    assert (fast.int() - torch.from_numpy(resized).int()).abs().max() <= 2


def test_blip_encoder_does_not_touch_caller_ids_and_drop_path_only_in_train(tiny):
    config = BlipMultimodalConfig(**{**tiny.model.mm_encoder.config.__dict__, "vision_drop_path_rate": 0.5})
    encoder = BlipMultimodalEncoder(config)
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    pixels = torch.randn(1, 3, 32, 32)
    encoder.eval()
    with torch.no_grad():
        a, b = encoder(pixels, ids, None), encoder(pixels, ids, None)
    assert torch.equal(a, b) and ids[0, 0] == 2
    encoder.train()
    torch.manual_seed(0)
    with torch.no_grad():
        outs = [encoder(pixels, ids, None) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
