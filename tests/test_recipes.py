"""Published recipes (storyexp/conf/experiment/, storyexp/conf/sampler/): each per-table experiment composes to its paper's settings,
its documented fast sampler is one override away, and the SSID recipe's resize + centre crop (training frames and
BLIP's input) matches an independent PIL computation on a non-square frame."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storyexp.data.datamodule import StoryItems, StoryDataModule
from storyexp.data.frames import FRAME_FITS, fit_frame
from storyexp.data.story import Story
from storyexp.errors import ConfigurationError
from storyexp.models.arldm.blip import CLIP_MEAN, CLIP_STD, blip_preprocess
from storyexp.systems.arldm import ARLDMSystem

from .conftest import CONF, compose_cfg

DDIM250 = {"scheduler": "ddim", "num_inference_steps": 250, "guidance_scale": 6.0}
PNDM50 = {"scheduler": "pndm", "num_inference_steps": 50, "guidance_scale": 7.5}
PNDM25 = {"scheduler": "pndm", "num_inference_steps": 25, "guidance_scale": 7.5}
K96 = {"top_k": 96, "top_p": 0.5, "autocast": "fp16"}
K96_FP32 = {"top_k": 96, "top_p": 0.5, "autocast": None}
K256 = {"top_k": 256, "supercondition_factor": 1.0, "autocast": None}
K256_FP16 = {"top_k": 256, "supercondition_factor": 1.0, "autocast": "fp16"}

# experiment: (task, published sampler, fast override, fast sampler)
RECIPES = {
    "arldm_pororo_continuation": ("continuation", DDIM250, "arldm_pndm50", PNDM50),
    "arldm_pororo_visualization": ("visualization", DDIM250, "arldm_pndm50", PNDM50),
    "arldm_flintstones_continuation": ("continuation", DDIM250, "arldm_pndm50", PNDM50),
    "arldm_ssid_visualization": ("visualization", PNDM50, "arldm_pndm25", PNDM25),
    "arldm_ssid_continuation": ("continuation", PNDM50, "arldm_pndm25", PNDM25),
    "mindalle_pororo": ("continuation", K96, "mindalle_k96_fp32", K96_FP32),
    "mindalle_flintstones": ("continuation", K96, "mindalle_k96_fp32", K96_FP32),
    "mega_pororo": ("continuation", K256, "mega_k256_fp16", K256_FP16),
    "mega_flintstones": ("continuation", K256, "mega_k256_fp16", K256_FP16),
}
ALIASES = {"arldm_pororo": "arldm_pororo_continuation", "arldm_flintstones": "arldm_flintstones_continuation",
           "arldm_ssid": "arldm_ssid_visualization"}


@functools.cache
def _composed(*overrides: str):
    """The composed config of these overrides, composed once per module (the tests only read it; paths unused)."""
    return compose_cfg(list(overrides), Path(tempfile.gettempdir()) / "storyexp_test_recipes")


def _subset(cfg_node, expected: dict) -> dict:
    return {k: cfg_node.get(k) for k in expected}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_its_tables_task_and_sampler_and_a_one_override_fast_setting(name, tmp_path):
    task, published, fast_name, fast = RECIPES[name]
    cfg = _composed(f"experiment={name}")
    assert cfg.data.task == task and cfg.model.task == task and task in cfg.tags
    assert _subset(cfg.model.sampler, published) == published
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert f"sampler={fast_name}" in text  # the fast setting is documented in the file
    fast_cfg = _composed(f"experiment={name}", f"sampler={fast_name}")
    assert _subset(fast_cfg.model.sampler, fast) == fast
    assert fast_cfg.model.recipe == cfg.model.recipe and fast_cfg.data == cfg.data  # only the sampler changes


def test_every_sampler_option_is_used_by_a_recipe():
    used = {v[2] for v in RECIPES.values()} | {"arldm_ddim250", "arldm_pndm50", "mindalle_k96", "mega_k256"}
    assert {p.stem for p in (CONF / "sampler").glob("*.yaml")} == used


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_the_dataset_names_are_the_same_recipe(alias, tmp_path):
    a = _composed(f"experiment={alias}")
    b = _composed(f"experiment={ALIASES[alias]}")
    assert a.model == b.model and a.data == b.data and a.trainer == b.trainer


def test_pororo_and_flintstones_keep_the_original_recipe(tmp_path):
    for name in ("arldm_pororo_continuation", "arldm_flintstones_continuation"):
        cfg = _composed(f"experiment={name}")
        assert cfg.model.image_size == 512 and cfg.model.blip_fit == "squash"  # Resize([224, 224]), arldm.md §3.3
        assert cfg.model.recipe.max_epochs == 50 and cfg.model.recipe.gradient_clip_val == 1.0
        assert cfg.trainer.precision == "32-true"


@pytest.mark.parametrize("name", ["arldm_ssid", "arldm_ssid_visualization", "arldm_ssid_continuation"])
def test_ssid_recipe_is_the_reimplementations(name, tmp_path):
    cfg = _composed(f"experiment={name}")
    assert cfg.model.recipe.max_epochs == 5 and cfg.model.recipe.gradient_clip_val is None
    assert cfg.trainer.gradient_clip_val is None and cfg.trainer.max_epochs == 5
    assert cfg.data.batch_size == 1 and cfg.trainer.precision == "16-mixed"
    assert cfg.trainer.accumulate_grad_batches == 1
    assert cfg.model.image_size == 256 and cfg.data.frame_size == 256
    assert cfg.data.frame_fit == "center_crop" and cfg.model.blip_fit == "center_crop"
    assert all(cfg.model.train[k] for k in ("freeze_clip", "freeze_blip", "freeze_resnet"))


def test_fit_options_compose_and_bad_values_are_one_line(tmp_path):
    for fit in FRAME_FITS:
        cfg = _composed("experiment=arldm_ssid", f"data.frame_fit={fit}", f"model.blip_fit={fit}")
        assert cfg.data.frame_fit == fit and cfg.model.blip_fit == fit
    with pytest.raises(ConfigurationError, match=r"^data\.frame_fit='crop' is not valid[^\n]*$"):
        StoryDataModule(name="ssid", path=tmp_path / "x.h5", frame_fit="crop")
    model = dict(task="visualization", sampler={"scheduler": "pndm"}, blip_fit="crop")
    with pytest.raises(ConfigurationError, match=r"^model\.blip_fit='crop' is not valid[^\n]*$"):
        ARLDMSystem.check_config(model)


def _frame(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _pil_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Reference: torchvision's Resize(size) + CenterCrop(size) written out with PIL."""
    h, w = frame.shape[:2]
    if h <= w:
        new_w, new_h = int(size * w / h), size
    else:
        new_w, new_h = size, int(size * h / w)
    img = Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return np.array(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("shape", [(90, 160), (150, 60)])
def test_training_frames_center_crop_keeps_the_aspect_ratio(shape):
    frame = _frame(*shape)
    out = fit_frame(frame, 32, "center_crop")
    ref = _pil_center_crop(frame, 32)
    assert out.shape == ref.shape == (32, 32, 3)
    # cv2 INTER_AREA vs PIL bilinear resampling differ in filter, not in geometry: the crops agree closely
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 25
    squashed = fit_frame(frame, 32, "squash")
    assert squashed.shape == (32, 32, 3) and not np.array_equal(squashed, out)
    # geometry, exactly: a frame whose left/right thirds are black and middle white crops to all white
    h, w = shape
    bars = np.zeros((h, w, 3), np.uint8)
    if h <= w:
        bars[:, (w - h) // 2 : (w + h) // 2] = 255
    else:
        bars[(h - w) // 2 : (h + w) // 2] = 255
    assert fit_frame(bars, 16, "center_crop")[2:-2, 2:-2].min() == 255


def test_data_module_items_use_the_fit():
    frames = [_frame(90, 160)] * 5
    story = Story(id="s0", frames=frames, captions=["a"] * 5)
    item = StoryItems([story], frame_size=32, frame_fit="center_crop")[0]
    assert all(np.array_equal(f, fit_frame(frames[0], 32, "center_crop")) for f in item["frames"])
    assert StoryItems([story], frame_size=32)[0]["frames"][0].shape == (32, 32, 3)  # squash by default


def test_blip_center_crop_equals_pil_resize_and_crop_and_squash_is_unchanged():
    frame = _frame(90, 160)
    x = torch.from_numpy(frame)[None]
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)

    def norm(a):
        return torch.from_numpy(((a / 255.0 - mean) / std).transpose(2, 0, 1)[None]).float()

    got = blip_preprocess(x, 24, fit="center_crop")
    torch.testing.assert_close(got, norm(_pil_center_crop(frame, 24)), atol=1e-5, rtol=0)
    squash = np.array(Image.fromarray(frame).resize((24, 24), Image.BILINEAR))
    torch.testing.assert_close(blip_preprocess(x, 24), norm(squash), atol=1e-5, rtol=0)
    square = torch.from_numpy(_frame(40, 40))[None]  # generated frames are square: both fits agree
    torch.testing.assert_close(blip_preprocess(square, 24, fit="center_crop"), blip_preprocess(square, 24))
    torch_crop = blip_preprocess(x, 24, backend="torch", fit="center_crop")
    assert (torch_crop - got).abs().max() < 0.1
