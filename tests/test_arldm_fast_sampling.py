"""AR-LDM's sampling switches on the tiny configuration: the fewer-step multistep solvers (`dpm`, `unipc`), the
skipped last BLIP feedback (`model.sampler.skip_unread_feedback`), channels-last UNet / VAE
(`model.network.channels_last`), and the helpers of benchmarks/sampler_steps.py."""

from __future__ import annotations

import importlib.util
import json
import re

import hydra
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from storyexp.errors import ConfigurationError
from storyexp.models.arldm.model import SD_NOISE_SCHEDULER
from storyexp.systems.arldm import ARLDMSystem
from storyexp.systems.samplers import ALIASES, make_scheduler

from .conftest import CONF, REPO, TINY_DEMO, compose_cfg

MULTISTEP = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def build(tmp_path, *overrides):
    cfg = compose_cfg(TINY_DEMO + ["model=arldm_tiny", *overrides], tmp_path)
    return hydra.utils.instantiate(cfg.model, _convert_="all"), cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def batch(tiny, demo_train_batch):
    """Two stories of the tiny demo set (its frames are resized to the model's size by prepare_batch)."""
    return {k: (v[:2] if isinstance(v, (torch.Tensor, list)) else v) for k, v in demo_train_batch.items()}


def unet_calls(model):
    calls = []
    handle = model.net.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


# ------------------------------------------------------------------------------------------ the solvers


def test_scheduler_comment_lists_every_alias():
    """storyexp/conf/model/arldm.yaml's comment on `sampler.scheduler` names every alias samplers.py knows."""
    text = (CONF / "model" / "arldm.yaml").read_text()
    line = next(ln for ln in text.splitlines() if re.match(r"\s+scheduler:", ln))
    comment = line.split("#", 1)[1]
    following = text.split(line, 1)[1].splitlines()[0]  # the comment goes on on the next line
    named = set(re.findall(r"[a-z]+", comment + following.split("#", 1)[-1]))
    assert set(ALIASES) <= named, set(ALIASES) - named


@pytest.mark.parametrize("name", sorted(MULTISTEP))
def test_multistep_alias_takes_the_training_schedule(name, tmp_path):
    """`dpm` is DPM-Solver++ 2nd order and `unipc` UniPC bh2 / x0, both on the training betas and prediction type
    (the demo model's v-prediction)."""
    cfg = compose_cfg(["model=arldm_demo"], tmp_path)
    training = DDPMScheduler(**{**SD_NOISE_SCHEDULER, **cfg.model.network.noise_scheduler_config})
    assert training.config.prediction_type == "v_prediction"
    scheduler = make_scheduler(name, training.config)
    assert type(scheduler) is MULTISTEP[name]
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert scheduler.config[key] == training.config[key], key
    assert torch.equal(scheduler.betas, training.betas)
    assert torch.equal(scheduler.alphas_cumprod, training.alphas_cumprod)
    if name == "dpm":
        assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2
    else:
        assert scheduler.config.solver_type == "bh2" and scheduler.config.predict_x0 is True
        assert scheduler.config.solver_order == 2


@pytest.mark.parametrize("name", sorted(MULTISTEP))
def test_tiny_samples_a_story_with_each_multistep_solver(tiny, batch, name):
    model, cfg = tiny
    steps = int(cfg.model.sampler.num_inference_steps) + 1
    calls, handle = unet_calls(model)
    try:
        first = model.generate(batch, scheduler=name, num_inference_steps=steps)
    finally:
        handle.remove()
    size = cfg.model.image_size
    assert first.shape == (2, model.num_targets, size, size, 3) and first.dtype == torch.uint8
    assert len(calls) == steps * model.num_targets  # one guided UNet call per step and frame
    again = model.generate(batch, scheduler=name, num_inference_steps=steps)
    assert torch.equal(first, again)  # seeded per story


@pytest.mark.parametrize("name", sorted(MULTISTEP))
def test_multistep_state_does_not_leak_between_frames(tiny, batch, name):
    """`denoise` resets the solver (set_timesteps) for every frame: the same latents and context denoised twice
    with one scheduler object, and once with a fresh one, give the same latents."""
    model, cfg = tiny
    net = model.net
    inputs = model.prepare_batch(batch)
    inputs.pop("images")
    with torch.no_grad():
        context, blocked = net.sampling_contexts(**inputs).frame(0)
        shape = net.latent_shape(2, cfg.model.image_size, cfg.model.image_size)
        start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        scheduler = make_scheduler(name, net.noise_scheduler.config)
        steps, scale = 4, float(cfg.model.sampler.guidance_scale)
        once = net.denoise(start.clone(), context, blocked, scheduler, steps, scale)
        assert scheduler.model_outputs[-1] is not None  # the solver does keep state across steps
        twice = net.denoise(start.clone(), context, blocked, scheduler, steps, scale)
        fresh = net.denoise(start.clone(), context, blocked, make_scheduler(name, net.noise_scheduler.config),
                            steps, scale)
    assert torch.equal(once, twice) and torch.equal(once, fresh)


# ------------------------------------------------------------------------------------- skipped feedback


def test_skip_unread_feedback_gives_the_same_frames_with_one_blip_forward_fewer(tiny, batch):
    model, cfg = tiny
    assert cfg.model.sampler.skip_unread_feedback is True  # the default
    counts = {}
    for skip in (True, False):
        calls = []
        handle = model.net.mm_encoder.register_forward_hook(lambda *_: calls.append(1))
        try:
            counts[skip] = (model.generate(batch, skip_unread_feedback=skip), len(calls))
        finally:
            handle.remove()
    (on, on_calls), (off, off_calls) = counts[True], counts[False]
    assert torch.equal(on, off)
    assert on_calls == off_calls - 1
    # off: the source frames, the null history and one feedback per target; on: the last feedback is not run
    assert off_calls == 2 + model.num_targets


def test_skip_unread_feedback_reaches_the_sampler_from_the_config(tmp_path, batch):
    model, _ = build(tmp_path, "model.sampler.skip_unread_feedback=false")
    calls = []
    handle = model.net.mm_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.generate(batch)
    finally:
        handle.remove()
    assert len(calls) == 2 + model.num_targets


@pytest.mark.parametrize("key", ["sampler.skip_unread_feedback", "network.channels_last"])
def test_switches_must_be_booleans(tmp_path, key):
    cfg = compose_cfg(TINY_DEMO + ["model=arldm_tiny", f"model.{key}=maybe"], tmp_path)
    with pytest.raises(ConfigurationError, match=rf"model\.{re.escape(key)}='maybe' is not valid"):
        ARLDMSystem.check_config(dict(cfg.model))


# ------------------------------------------------------------------------------------------ channels last


@pytest.fixture(scope="module")
def channels_last_pair(tmp_path_factory):
    on, _ = build(tmp_path_factory.mktemp("cl_on"), "model.network.channels_last=true")
    off, _ = build(tmp_path_factory.mktemp("cl_off"), "model.network.channels_last=false")
    return on, off


def test_channels_last_keeps_the_weights_and_converts_the_convolutions(channels_last_pair):
    on, off = channels_last_pair
    conv = [(n, p) for n, p in on.net.unet.named_parameters() if p.dim() == 4]
    assert conv and all(p.is_contiguous(memory_format=torch.channels_last) for _, p in conv)
    assert not off.net.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert on.net.unet.conv_in.weight.shape[-1] > 1  # a 3x3 kernel: the two formats differ in strides
    on_state, off_state = on.state_dict(), off.state_dict()
    assert list(on_state) == list(off_state)
    assert all(torch.equal(on_state[k], off_state[k]) for k in on_state)
    # the saved checkpoint holds the default format, the same as the switch off writes
    checkpoint = {"state_dict": dict(on_state)}
    on.on_save_checkpoint(checkpoint)
    assert all(v.is_contiguous() for v in checkpoint["state_dict"].values())
    assert all(torch.equal(checkpoint["state_dict"][k], off_state[k]) for k in off_state)
    # loading weights in keeps the format
    on.load_state_dict(off_state)
    assert on.net.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_training_loss_and_samples_match(channels_last_pair, batch):
    on, off = channels_last_pair
    losses = {}
    for name, model in (("on", on), ("off", off)):
        inputs = model.prepare_batch(batch)
        torch.manual_seed(0)  # the same dropout masks (train mode) for both
        out = model.net.training_loss(**inputs, cfg_prob=0.5, generator=torch.Generator().manual_seed(3))
        losses[name] = out
    assert losses["on"].noisy_latents.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(losses["on"].loss, losses["off"].loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["on"].noisy_latents, losses["off"].noisy_latents, rtol=0, atol=0)
    a, b = on.generate(batch), off.generate(batch)
    assert a.shape == b.shape
    assert int((a.int() - b.int()).abs().max()) <= 1


# ----------------------------------------------------------------------------- benchmarks/sampler_steps.py


@pytest.fixture(scope="module")
def sampler_steps():
    spec = importlib.util.spec_from_file_location("sampler_steps", REPO / "benchmarks" / "sampler_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_steps_points_and_overrides(sampler_steps, tmp_path):
    assert sampler_steps.parse_points(["ddim:250", "dpm:10", "ddim:250"]) == [("ddim", 250), ("dpm", 10)]
    for bad in ("dpm", "dpm:0", "dpm:x", ":5"):
        with pytest.raises(ValueError, match="is not <scheduler>:<steps>"):
            sampler_steps.parse_point(bad)
    overrides = sampler_steps.eval_overrides("c.ckpt", "unipc", 15, 7, tmp_path / "r", ["data.limit_test=16"], False)
    assert overrides[:5] == ["task=eval", "ckpt_path=c.ckpt", "model.sampler.scheduler=unipc",
                             "model.sampler.num_inference_steps=15", "seed=7"]
    assert "eval.baseline=null" in overrides and overrides[-1] == "data.limit_test=16"


def test_sampler_steps_reads_runs_and_writes_the_table(sampler_steps, tmp_path):
    run = tmp_path / "runs" / sampler_steps.run_name("dpm", 25, 42)
    run.mkdir(parents=True)
    assert sampler_steps.read_point(run) is None  # not finished
    (run / "metrics.json").write_text(json.dumps({"test/fid_demo": 41.5, "test/frame_acc_demo": 0.9375,
                                                  "val/loss": 0.1}))
    (run / "sampling_time.json").write_text(json.dumps({"sampling_s": 8.0, "stories": 16, "calls": 2}))
    point = sampler_steps.read_point(run)
    assert point["metrics"] == {"test/fid_demo": 41.5, "test/frame_acc_demo": 0.9375}  # test keys only
    rows = [{"scheduler": "dpm", "steps": 25, "seed": 42, **point},
            {"scheduler": "ddim", "steps": 250, "seed": 42, "metrics": {"test/fid_demo": 40.0}, "sampling_s": 80.0,
             "stories": 16}]
    result = {"meta": {"ckpt": "c.ckpt", "command": "python benchmarks/sampler_steps.py", "machine": "m",
                       "date": "2026-12-01", "stories": 16}, "points": rows}
    sampler_steps.write_results(tmp_path, result)
    assert json.loads((tmp_path / "sampler_steps.json").read_text()) == result
    table = [ln for ln in (tmp_path / "sampler_steps.md").read_text().splitlines() if ln.startswith("|")]
    assert table[0] == "| scheduler | steps | seed | fid_demo | frame_acc_demo | sampling s/story | sampling s |"
    assert table[2] == "| dpm | 25 | 42 | 41.5 | 0.9375 | 0.5 | 8 |"
    assert table[3] == "| ddim | 250 | 42 | 40 | – | 5 | 80 |"
