"""Masked cross-attention UNet: current diffusers + storyexp's mask conversion vs. ARLDM's vendored UNet."""

from __future__ import annotations

import functools

import pytest
import torch

from . import arldm_support as S


from storyexp.models.arldm import masked_unet_forward  # noqa: E402

UNET_CASES = sorted(S.meta()["unet_cases"])


@functools.cache
def pretrained_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(S.ARLDM_DIR / "pretrained" / "unet")).eval()


def _timestep(data, passed_as: str):
    ts = S.t(data["timesteps"])
    if passed_as == "int":
        assert bool((ts == ts[0]).all()), "an int timestep implies one value for all rows"
        return int(ts[0])
    if passed_as == "tensor_0d":
        assert bool((ts == ts[0]).all())
        return ts[0].clone()
    assert passed_as == "tensor_1d", f"unknown timestep form {passed_as!r}"
    return ts


def _run(data, info, context, with_mask=True):
    mask = S.t(data["encoder_attention_mask"]) if with_mask and "encoder_attention_mask" in data else None
    with torch.no_grad():
        return masked_unet_forward(
            pretrained_unet(), S.t(data["sample"]), _timestep(data, info["timestep_passed_as"]), context, mask
        )


@pytest.mark.parametrize("case", UNET_CASES)
def test_unet_output(case):
    info = S.meta()["unet_cases"][case]
    data = S.npz(info["file"])
    out = _run(data, info, S.t(data["encoder_hidden_states"]))
    S.assert_close(out, data["output"], S.ATOL, f"{case}: UNet output")
    assert abs(out.abs().max().item() - info["max_abs_output"]) <= S.ATOL


@pytest.mark.parametrize("case", [c for c in UNET_CASES if "encoder_attention_mask" in S.meta()["unet_cases"][c]["shapes"]])
def test_unet_mask_is_honoured(case):
    info = S.meta()["unet_cases"][case]
    data = S.npz(info["file"])
    # Blocked positions replaced by unrelated values: the output must not move.
    changed = _run(data, info, S.t(data["encoder_hidden_states_blocked_changed"]))
    S.assert_close(changed, data["output"], S.ATOL, f"{case}: output with blocked positions changed")
    # Without the mask: the recorded mask-ignored output, differing from the masked one as recorded.
    unmasked = _run(data, info, S.t(data["encoder_hidden_states"]), with_mask=False)
    S.assert_close(unmasked, data["output_if_mask_ignored"], S.ATOL, f"{case}: output without mask")
    recorded = info["max_abs_diff_vs_mask_ignored"]
    ours = S.max_abs(unmasked, data["output"])
    assert abs(ours - recorded) <= 2 * S.ATOL, f"{case}: mask effect {ours:.3e}, recorded {recorded:.3e}"
