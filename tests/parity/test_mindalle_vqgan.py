"""minDALL-E stage 1 (taming VQGAN): storyexp.models.vqgan vs. vectors recorded from the original code.

See shared/parity/README.md §1.1/§1.2 `stage1` and §3 for the files and tolerances.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from tests.data_paths import parity_dir

PARITY_DIR = parity_dir()
MD_DIR = PARITY_DIR / "mindalle"

from storyexp.models.vqgan import VQGAN, VQGANConfig  # noqa: E402
from storyexp.utils.loading import CheckpointMismatchError  # noqa: E402

CKPT = MD_DIR / "stage1_last.ckpt"


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.cache
def config() -> VQGANConfig:
    with open(MD_DIR / "config.yaml") as f:
        return VQGANConfig.from_dict(yaml.safe_load(f)["stage1"])


@functools.cache
def model() -> VQGAN:
    return VQGAN.from_ckpt(CKPT, config())


@functools.cache
def cases() -> dict:
    return _load(MD_DIR / "cases.pt")["stage1"]


def test_config_matches_files():
    cfg, c = config(), cases()
    assert cfg.latent_dim == c["latent_dim"] == cfg.hparams.attn_resolutions[0]
    assert c["codes"].shape[1] == cfg.latent_dim**2
    assert tuple(c["decode_code_input"].shape[1:]) == (cfg.latent_dim, cfg.latent_dim)
    assert c["images"].shape[-1] == cfg.hparams.resolution


def test_strict_load_and_eval_mode():
    m = model()
    assert not m.training and not any(mod.training for mod in m.modules())
    sd = _load(CKPT)["state_dict"]
    own = m.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_codes_exact():
    c = cases()
    with torch.no_grad():
        codes = model().get_codes(c["images"])
    assert codes.dtype == torch.long
    assert codes.shape == c["codes"].shape
    assert torch.equal(codes, c["codes"])


def test_encode_output():
    c = cases()
    with torch.no_grad():
        out = model().encode(c["images"])
    assert out.shape == c["encode_output"].shape
    torch.testing.assert_close(out, c["encode_output"], atol=1e-6, rtol=0)
    # the quantised latents are codebook rows of the recorded codes (channels first, raster order)
    b, d, h, w = out.shape
    rows = model().quantize.embedding.weight[c["codes"]]  # [B, h*w, d]
    torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(b, h * w, d), rows, atol=1e-6, rtol=0)


def test_decode_code_output_raw():
    c = cases()
    with torch.no_grad():
        out = model().decode_code(c["decode_code_input"])
    assert out.shape == c["decode_code_output"].shape
    torch.testing.assert_close(out, c["decode_code_output"], atol=1e-4, rtol=0)
    assert out.min() < -1 or out.max() > 1  # raw: the recorded output leaves [-1, 1], so nothing clamps it


def test_forward_output():
    c = cases()
    with torch.no_grad():
        out = model()(c["images"])
    assert out.shape == c["forward_output"].shape
    torch.testing.assert_close(out, c["forward_output"], atol=1e-4, rtol=0)


def test_wrong_keys_are_listed():
    sd = dict(_load(CKPT)["state_dict"])
    sd["encoder.down.1.attn.0.q.extra"] = sd.pop("encoder.down.1.attn.0.q.weight")  # one missing, one unexpected
    sd.pop("quantize.embedding.weight")
    sd["decoder.conv_out.bias"] = torch.zeros(7)  # shape mismatch
    with pytest.raises(CheckpointMismatchError) as err:
        VQGAN(config()).load_checkpoint_state({"state_dict": sd})
    msg = str(err.value)
    for needle in (
        "missing keys (2)",
        "encoder.down.1.attn.0.q.weight",
        "quantize.embedding.weight",
        "unexpected keys (1)",
        "encoder.down.1.attn.0.q.extra",
        "decoder.conv_out.bias (file (7,) vs model (3,))",
    ):
        assert needle in msg, msg
    assert "\n" not in msg


def test_prefixed_keys_rejected():
    # a wrapper that prefixes keys (e.g. 'stage1.') must not load silently
    sd = {f"stage1.{k}": v for k, v in _load(CKPT)["state_dict"].items()}
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        VQGAN(config()).load_checkpoint_state(sd)
