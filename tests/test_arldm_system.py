"""The AR-LDM LightningModule on the tiny configuration: batch preparation, freezing, LR schedule,
over-long captions, sampling settings."""

from __future__ import annotations

import types

import hydra
import pytest
import torch

from storyexp.errors import ConfigurationError
from storyexp.systems.samplers import make_scheduler

from .conftest import TINY_DEMO, compose_cfg


def build(tmp_path, *overrides):
    cfg = compose_cfg(TINY_DEMO + ["model=arldm_tiny", *overrides], tmp_path)
    return hydra.utils.instantiate(cfg.model, _convert_="all"), cfg


def fake_batch(B: int, captions=None, size: int = 32):
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (B, 5, size, size, 3), generator=g, dtype=torch.uint8)
    captions = captions or [[f"pip walks in the park .", "bo jumps .", "gus sleeps .", "mo dances .", "kiki sits ."]] * B
    return {"frames": frames, "captions": captions, "labels": None, "ids": [f"s{i}" for i in range(B)],
            "index": torch.arange(B)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("task,targets", [("continuation", 4), ("visualization", 5)])
def test_prepare_batch_shapes(tmp_path, task, targets):
    model, cfg = build(tmp_path, f"data.task={task}")
    inputs = model.prepare_batch(fake_batch(2, size=40))
    S, size = cfg.data.max_length, cfg.model.image_size
    assert inputs["images"].shape == (2, targets, 3, size, size)
    assert -1.0 <= float(inputs["images"].min()) and float(inputs["images"].max()) <= 1.0
    assert inputs["captions"].shape == (2, targets, S) and inputs["source_caption"].shape == (2, 5, S)
    blip = model.net.mm_encoder.image_size
    assert inputs["source_images"].shape == (2, 5, 3, blip, blip)
    loss = model.net.training_loss(**inputs).loss
    assert torch.isfinite(loss)
    generated = model.generate(fake_batch(2))
    assert generated.shape == (2, targets, size, size, 3) and generated.dtype == torch.uint8


def test_over_long_caption_is_truncated_with_a_warning(tiny):
    model, cfg = tiny
    long = " ".join(["pip chases bo in the park"] * 20)
    with pytest.warns(UserWarning, match=r"truncated.*data.max_length"):
        tokens = model.tokenize([long])
        ids, mask = tokens["clip_ids"], tokens["clip_mask"]
    assert ids.shape == (1, cfg.data.max_length) and int(mask.sum()) == cfg.data.max_length
    assert int(ids[0, -1]) == model.clip_tokenizer.eos_token_id  # still a well-formed caption


@pytest.mark.parametrize("switch", ["freeze_clip", "freeze_blip", "freeze_resnet"])
def test_freeze_switches(tmp_path, switch):
    model, _ = build(tmp_path, f"model.train.{switch}=true")
    net = model.net
    assert not any(p.requires_grad for p in net.vae.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if switch == "freeze_clip":
        clip = {n for n in trainable if n.startswith("net.text_encoder.")}
        assert clip == {"net.text_encoder." + n for n, _ in net.text_encoder.named_parameters()
                        if "token_embedding" in n}
    elif switch == "freeze_blip":
        blip = {n for n in trainable if n.startswith("net.mm_encoder.")}
        assert blip and all("word_embeddings" in n for n in blip)
    else:
        unet = {n for n in trainable if n.startswith("net.unet.")}
        assert unet and all("attentions" in n for n in unet)
    assert any(n.startswith("net.time_embeddings") for n in trainable)


def test_lr_schedule_is_sized_from_the_real_number_of_steps(tiny):
    model, _ = tiny
    model.hparams.lr_schedule = {"warmup_steps": None, "warmup_epochs": 1}
    # 4 epochs of 25 optimizer steps each (after DDP sharding): warm-up = 25 steps, cosine to 0 at 100
    model.trainer = None
    fake = types.SimpleNamespace(estimated_stepping_batches=100, max_epochs=4)
    model.__dict__["_fake_trainer"] = fake
    type(model).trainer = property(lambda self: self.__dict__.get("_fake_trainer"))
    try:
        conf = model.configure_optimizers()
    finally:
        del type(model).trainer
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    peak = model.hparams.optimizer["lr"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[25] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert lrs[99] < 0.001 * peak and conf["lr_scheduler"]["interval"] == "step"


def test_schedulers_by_name(tiny):
    model, _ = tiny
    training = model.net.noise_scheduler.config
    ddim = make_scheduler("ddim", training)
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is True and ddim.config.beta_schedule == training.beta_schedule
    assert type(make_scheduler("pndm", training)).__name__ == "PNDMScheduler"
    assert type(make_scheduler("EulerDiscreteScheduler", training)).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ConfigurationError, match="Unknown sampling scheduler"):
        make_scheduler("nope", training)
    for name in ("pndm", "dpm", "euler"):
        out = model.generate(fake_batch(1), scheduler=name, num_inference_steps=2)
        assert out.shape[1] == model.num_targets


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(Exception, match="model.task=.nope. is not valid"):
        build(tmp_path, "data.task=nope")
