"""Stage 1 runs in fp32 under any autocast (the originals force it; storyexp.models.vqgan.precision), and Mega's
`network.weights_dtype` keeps the transformer in half precision while stage 1 stays fp32."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml

from storyexp.errors import ConfigurationError
from storyexp.models.mega.detokenizer import DetokenizerConfig, VQGanDetokenizer
from storyexp.models.vqgan import VQGAN, VQGANConfig, VQGANHParams
from storyexp.tasks.common import build_data_and_model
from storyexp.utils.images import minus_one_one, resize_uint8

from .conftest import TINY_DEMO, compose_cfg, parity_dir

MD_DIR = parity_dir() / "mindalle"
BF16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)  # CPU autocast: what *-mixed does on GPU


@functools.cache
def parity_vqgan() -> tuple[VQGAN, dict]:
    with open(MD_DIR / "config.yaml") as f:
        config = VQGANConfig.from_dict(yaml.safe_load(f)["stage1"])
    cases = torch.load(MD_DIR / "cases.pt", map_location="cpu", weights_only=True)["stage1"]
    return VQGAN.from_ckpt(MD_DIR / "stage1_last.ckpt", config), cases


@torch.no_grad()
def test_parity_vqgan_codes_and_pixels_ignore_autocast():
    vqgan, cases = parity_vqgan()
    images, side = cases["images"], vqgan.latent_dim
    # the drift the guard removes: the unguarded encoder under bf16 autocast picks other codebook rows
    with BF16():
        raw = vqgan.quantize.codes(vqgan._pre_quant(images)).reshape(images.shape[0], -1)
        codes = vqgan.get_codes(images)
        raw_pixels = vqgan.decode(vqgan.quantize.lookup(cases["codes"].view(-1, side, side)))
        pixels = vqgan.decode_code(cases["codes"].view(-1, side, side))
    assert (raw != cases["codes"]).any() and raw_pixels.dtype == torch.bfloat16
    assert torch.equal(codes, cases["codes"])  # the codes the original recorded in fp32
    fp32 = vqgan.decode_code(cases["codes"].view(-1, side, side))
    assert pixels.dtype == torch.float32 and torch.equal(pixels, fp32)
    assert torch.equal(vqgan.get_codes(images.to(torch.bfloat16)), cases["codes"])  # half inputs: cast to fp32


@torch.no_grad()
def test_mega_detokenizer_decodes_in_fp32_under_autocast():
    torch.manual_seed(0)
    hp = VQGANHParams(z_channels=32, resolution=32, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(16,))
    detok = VQGanDetokenizer(DetokenizerConfig(n_embed=32, embed_dim=8, hparams=hp)).eval()
    codes = torch.randint(0, 32, (4, 64))
    fp32 = detok(codes)
    with BF16():
        under = detok(codes)
        grid = detok.decode_grid(codes, seamless=True)
    assert under.dtype == grid.dtype == torch.float32 and torch.equal(under, fp32)
    assert torch.equal(grid, detok.decode_grid(codes, seamless=True))


def tiny(tmp_path, data_dir, family: str, *overrides: str):
    cfg = compose_cfg(TINY_DEMO + [f"model={family}_tiny", *overrides], tmp_path, data_dir=data_dir)
    datamodule, model = build_data_and_model(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return model, next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("family", ["mindalle", "mega"])
@torch.no_grad()
def test_tiny_systems_encode_and_decode_in_fp32_under_autocast(tmp_path, shared_data_dir, family):
    model, batch = tiny(tmp_path, shared_data_dir, family)
    model.eval()
    codes = model.encode_frames(batch["frames"])
    pixels = model.decode_codes(codes.flatten(0, 1))
    frames = batch["frames"].flatten(0, 1)
    images = resize_uint8(frames, model.image_size)
    images = images.float().div(255.0) if model.frames_zero_one else minus_one_one(images)
    with BF16():  # what Lightning wraps every step and the callbacks' generate in under trainer.precision=bf16-mixed
        raw = model.stage1.quantize.codes(model.stage1._pre_quant(images)).reshape(codes.flatten(0, 1).shape)
        assert (raw != codes.flatten(0, 1)).any()  # without the guard the tiny stage 1 drifts as well
        assert torch.equal(model.encode_frames(batch["frames"]), codes)
        assert torch.equal(model.decode_codes(codes.flatten(0, 1)), pixels)
        # sampler.autocast=bf16 opens the same context around the transformer only; stage 1 decodes outside it
        story = model.generate(batch, autocast="bf16")
    assert story.dtype == torch.uint8 and story.shape[1] == model.num_targets


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
@torch.no_grad()
def test_mega_weights_dtype_keeps_the_transformer_half_and_stage1_fp32(tmp_path, shared_data_dir, name, dtype):
    model, batch = tiny(tmp_path, shared_data_dir, "mega", f"model.network.weights_dtype={name}")
    assert model.hparams.network["weights_dtype"] == name
    assert {p.dtype for p in model.model.encoder.parameters()} == {dtype}
    assert {p.dtype for p in model.model.decoder.parameters()} == {dtype}
    assert {p.dtype for p in model.stage1.parameters()} == {torch.float32}
    story = model.generate(batch)  # min-dalle's sampler on CPU with half weights, stage 1 in fp32
    assert story.dtype == torch.uint8 and story.shape[1] == model.num_targets
    assert torch.isfinite(model.losses(batch)["loss"]).all()


def test_mega_weights_dtype_default_and_bad_value(tmp_path):
    cfg = compose_cfg(["model=mega", "data=pororo"], tmp_path)
    assert cfg.model.network.weights_dtype == "float32"
    from storyexp.systems.storymega import StoryMegaSystem

    model = dict(cfg.model)
    model["network"] = {**cfg.model.network, "weights_dtype": "half"}
    with pytest.raises(ConfigurationError, match=r"model\.network\.weights_dtype='half' is not valid"):
        StoryMegaSystem.check_config(model)


def test_min_dalle_files_load_as_distributed_in_float16_with_a_float32_detokenizer():
    """`MegaDalle.from_pretrained(dtype=float16)` (what `weights_dtype: float16` passes for `source: pretrained`)
    keeps the files' fp16 tensors bit for bit in the transformer and loads the detokenizer into fp32."""
    from storyexp.models.mega.loading import read_state_dict
    from storyexp.models.mega.model import MegaDalle

    folder = parity_dir() / "mega"
    heads = torch.load(folder / "cases.pt", weights_only=True)["meta"]["sizes"]["attention_head_count"]
    model = MegaDalle.from_pretrained(folder, attention_heads=heads, dtype=torch.float16)
    encoder_sd = read_state_dict(folder / "encoder.pt")
    assert encoder_sd["embed_tokens.weight"].dtype == torch.float16
    for key, value in model.encoder.state_dict().items():
        assert value.dtype == torch.float16 and torch.equal(value, encoder_sd[key]), key
    assert {p.dtype for p in model.decoder.parameters()} == {torch.float16}
    assert {p.dtype for p in model.detokenizer.parameters()} == {torch.float32}
