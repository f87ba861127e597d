"""min-dalle's VQGAN detokenizer (storyexp.models.mega.detokenizer) vs. kuprel/min-dalle 0.4.11.

Parity README §2.2 `detoker.pt` (full size: it has no constructor arguments) and §2.3 `detokenizer`: the 2x2 grid
and the seamless grid of the recorded codes, compared on the stored summaries (every 8th pixel, the centre crop
across the tile seams, the sum, row / column means). Strides and crop positions are derived from the stored
shapes (the crop is centred). The full-size decoder is loaded and run once per module.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.models.mega import DetokenizerConfig, VQGanDetokenizer  # noqa: E402
from storyexp.models.mega.loading import load_checked, read_state_dict  # noqa: E402
from storyexp.models.vqgan.config import VQGANHParams  # noqa: E402

PIXEL_ATOL = 0.02  # README §3, on the 0-255 scale
SUM_RTOL = 1e-6
MEAN_ATOL = 1e-3


@functools.cache
def cases() -> dict:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)["detokenizer"]


def compare_image(img: torch.Tensor, rec: dict, prefix: str = "") -> None:
    """img [H, W, 3] on the 0-255 scale vs. the stored summaries `{prefix}sub<n>`, `{prefix}crop`, sums, means."""
    sub_key = next(k for k in rec if k.startswith(prefix + "sub"))
    sub = rec[sub_key]
    stride = img.shape[0] // sub.shape[0]
    torch.testing.assert_close(img[::stride, ::stride], sub, atol=PIXEL_ATOL, rtol=0)
    crop = rec[prefix + "crop"]
    top, left = (img.shape[0] - crop.shape[0]) // 2, (img.shape[1] - crop.shape[1]) // 2
    window = img[top : top + crop.shape[0], left : left + crop.shape[1]]
    torch.testing.assert_close(window, crop, atol=PIXEL_ATOL, rtol=0)
    assert math.isclose(img.double().sum().item(), rec[prefix + "sum"], rel_tol=SUM_RTOL)
    torch.testing.assert_close(img.double().mean(dim=(1, 2)), rec["row_means"], atol=MEAN_ATOL, rtol=0)
    torch.testing.assert_close(img.double().mean(dim=(0, 2)), rec["col_means"], atol=MEAN_ATOL, rtol=0)


@pytest.fixture(scope="module")
def detokenizer() -> VQGanDetokenizer:
    state = read_state_dict(MEGA / "detoker.pt")
    net = VQGanDetokenizer(DetokenizerConfig.from_state_dict(state))
    load_checked(net, state, MEGA / "detoker.pt")
    return net.eval()


@pytest.fixture(scope="module")
def grids(detokenizer) -> dict[str, torch.Tensor]:
    """Both recorded grids, decoded once ([H, W, 3], 0-255), with the machine's cores (full-size convolutions)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(previous, min(4, os.cpu_count() or 1)))
    try:
        with torch.no_grad():
            z = cases()["z"]
            return {
                key: detokenizer.decode_grid(z, cases()[key]["is_seamless"]).permute(1, 2, 0) * 255
                for key in ("grid", "seamless")
            }
    finally:
        torch.set_num_threads(previous)


def test_sizes_read_from_the_file(detokenizer):
    cfg, z = detokenizer.config, cases()["z"]
    state = torch.load(MEGA / "detoker.pt", map_location="cpu", weights_only=True)
    assert (cfg.n_embed, cfg.embed_dim) == tuple(state["embedding.weight"].shape)
    assert int(z.max()) < cfg.n_embed
    norms = [m for m in detokenizer.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)  # torch's default, unlike taming's 1e-6 (README §2.2)


@pytest.mark.parametrize("key", ["grid", "seamless"])
def test_grid_matches_the_original(grids, key):
    rec = cases()[key]
    img = grids[key]
    assert list(img.shape) == rec["shape"]
    assert img.min() >= 0 and img.max() <= 255
    compare_image(img, rec)


def test_grid_placement_and_decode_codes_on_a_small_detokenizer():
    """Image k sits at row block k % g, column block k // g; seamless joins the token grids the same way.

    Checked on a small randomly initialised detokenizer of the same design, so it costs nothing; the recorded
    full-size grids above pin the numbers."""
    torch.manual_seed(0)
    hp = VQGANHParams(z_channels=32, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
    net = VQGanDetokenizer(DetokenizerConfig(n_embed=64, embed_dim=8, hparams=hp)).eval()
    assert DetokenizerConfig.from_state_dict(net.state_dict()).hparams.ch_mult == hp.ch_mult
    g, side = 2, 4
    codes = torch.randint(0, 64, (g * g, side * side))
    with torch.no_grad():
        singles = net(codes)
        grid = net.decode_grid(codes, seamless=False)
        seamless = net.decode_grid(codes, seamless=True)
        # the seamless grid is the decode of the joined token grid
        joined = torch.zeros(g * side, g * side, dtype=torch.long)
        for k in range(g * g):
            r, c = k % g, k // g
            joined[r * side : (r + 1) * side, c * side : (c + 1) * side] = codes[k].view(side, side)
        expected_seamless = net.decode_grid_tokens(joined[None])[0]
    res = singles.shape[-1]
    assert singles.min() >= 0 and singles.max() <= 1
    for k in range(g * g):
        r, c = k % g, k // g
        assert torch.equal(grid[:, r * res : (r + 1) * res, c * res : (c + 1) * res], singles[k])
    torch.testing.assert_close(seamless, expected_seamless, atol=0, rtol=0)
