"""Training a VQGAN stage 1 from scratch: losses, dead-code restart, `fit_vqgan` (the Lightning system fitted on
an array of frames), the cached export with its record, and the Lightning system run end to end through the
framework's train task (tiny sizes, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from storyexp.data.demo import generate_demo_story
from storyexp.errors import ConfigurationError
from storyexp.metrics import ensure_classifier
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.systems.vqgan_training import (
    CodeUsage,
    codebook_usage,
    fit_vqgan,
    frames_to_inputs,
    load_or_fit_vqgan,
    restart_dead_codes,
    save_vqgan,
    vqgan_losses,
)
from storyexp.tasks import build_datamodule, build_model, run_task
from storyexp.utils.images import minus_one_one

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg


def tiny_config(n_embed: int = 32) -> VQGANConfig:
    return VQGANConfig.from_dict({
        "embed_dim": 8, "n_embed": n_embed,
        "hparams": {"resolution": 16, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                    "z_channels": 8},
    })


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """The first 16 training stories of the demo at 32 px: 80 frames, uint8 [80, 32, 32, 3]."""
    return np.stack([f for i in range(16) for f in generate_demo_story(0, "train", i, 32).frames])


def seeded_vqgan(config: VQGANConfig, seed: int = 0) -> VQGAN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQGAN(config)


# ------------------------------------------------------------------------------------------------ losses


def test_losses_are_the_vq_vae_terms(frames):
    vqgan = seeded_vqgan(tiny_config())
    images = minus_one_one(frames_to_inputs(frames[:4], 16))
    assert images.shape == (4, 3, 16, 16) and -1 <= images.min() and images.max() <= 1
    out = vqgan_losses(vqgan, images, beta=0.25)
    z = vqgan._pre_quant(images)
    z_q = vqgan.quantize.lookup(vqgan.quantize.codes(z))
    assert out["codebook"].item() == pytest.approx(1.25 * F.mse_loss(z, z_q).item(), rel=1e-5)
    rec = vqgan.decode(z_q)
    assert out["rec"].item() == pytest.approx((F.l1_loss(rec, images) + F.mse_loss(rec, images)).item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["rec"].item() + out["codebook"].item(), rel=1e-6)
    assert out["codes"].shape == (4, 8, 8)
    out["loss"].backward()
    # straight-through: the encoder learns from the reconstruction; only the picked codebook rows move
    assert vqgan.encoder.conv_in.weight.grad.abs().sum() > 0
    row_grad = vqgan.quantize.embedding.weight.grad.abs().sum(1)
    used = torch.zeros(32, dtype=torch.bool)
    used[out["codes"].unique()] = True
    assert (row_grad[used] > 0).all() and (row_grad[~used] == 0).all()


def test_codebook_usage_and_perplexity():
    assert codebook_usage(torch.tensor([0, 1, 2, 3]), 8) == {"usage": 0.5, "perplexity": pytest.approx(4.0)}
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8) == {"usage": 0.125, "perplexity": 1.0}


# ------------------------------------------------------------------------------------- dead-code restart


def test_restart_reinitialises_dead_codes_to_encoder_outputs(frames):
    config = tiny_config()
    vqgan = seeded_vqgan(config)
    images = minus_one_one(frames_to_inputs(frames[:8], 16))
    with torch.no_grad():
        z = vqgan._pre_quant(images)
        # a collapsed codebook: every row far from the latents, row 0 nearest to all of them
        weight = vqgan.quantize.embedding.weight
        weight.fill_(100.0)
        weight[0] = z.mean(dim=(0, 2, 3))
    codes = vqgan.quantize.codes(z)
    assert codes.unique().tolist() == [0]
    usage = CodeUsage(config.n_embed)
    usage.update(codes, step=10)
    assert usage.dead(10, window=5).tolist() == list(range(1, 32))
    kept = weight[0].clone()
    restarted = restart_dead_codes(vqgan, usage, z, step=10, window=5, generator=torch.Generator().manual_seed(0))
    assert restarted == 31
    assert torch.equal(weight[0], kept)  # the live code is untouched
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    for row in weight[1:]:  # every restarted row is one of the batch's encoder outputs
        assert (flat - row).abs().amax(1).min() < 1e-6
    assert len({tuple(r.tolist()) for r in weight[1:]}) == 31  # distinct ones (drawn without replacement)
    after = codebook_usage(vqgan.quantize.codes(z), config.n_embed)
    assert after["usage"] > 0.5 and after["perplexity"] > 10
    assert usage.dead(10, window=5).numel() == 0  # restarted codes get a new window to be picked
    assert restart_dead_codes(vqgan, usage, z, step=12, window=5) == 0


# ----------------------------------------------------------------------------------------------- fitting


def test_fit_reduces_the_loss_and_keeps_the_codebook_in_use(frames):
    config = tiny_config()
    state = torch.random.get_rng_state()
    vqgan, report = fit_vqgan(config, frames[:64], val_frames=frames[64:], steps=30, batch_size=16, lr=2e-3,
                              seed=0, restart_every=5, log_every=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    losses = [h["loss"] for h in report["history"]]
    assert [h["step"] for h in report["history"]] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < 0.6 * losses[0], losses
    assert not vqgan.training
    assert report["usage"] > 0.5 and report["restarted"] > 0
    assert 0 < report["val_mae"] < 60 and np.isfinite(report["val_rec"])
    assert report["mae"] == report["val_mae"] and report["eval_split"] == "val" and report["steps"] == 30
    with pytest.raises(ConfigurationError, match="resolution 16"):
        fit_vqgan(config, frames, image_size=32, steps=1)


def test_fit_is_deterministic(frames):
    runs = [fit_vqgan(tiny_config(), frames[:16], steps=3, batch_size=8, seed=3, restart_every=1, log_every=1)
            for _ in range(2)]
    a, b = (r[0].state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0][1]["history"] == runs[1][1]["history"]


# -------------------------------------------------------------------------------------- save / load / cache


def test_save_and_from_ckpt_round_trip(frames, tmp_path):
    config = tiny_config()
    vqgan = seeded_vqgan(config, seed=1).eval()
    path = save_vqgan(vqgan, tmp_path / "stage1" / "stage1_last.ckpt")
    assert [p.name for p in path.parent.iterdir()] == ["stage1_last.ckpt"]  # no temporary file left
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert stored["stage1_config"] == config.to_dict()
    loaded = VQGAN.from_ckpt(path, config)
    images = minus_one_one(frames_to_inputs(frames[:6], 16))
    with torch.no_grad():
        assert torch.equal(loaded.get_codes(images), vqgan.get_codes(images))
        codes = vqgan.get_codes(images).view(6, 8, 8)
        assert torch.equal(loaded.decode_code(codes), vqgan.decode_code(codes))


def test_fit_runs_the_lightning_system(frames, monkeypatch):
    """`fit_vqgan` is `VQGANSystem` under a `lightning.Trainer`, not a loop of its own."""
    import lightning as L

    from storyexp.systems.vqgan import VQGANSystem

    fitted = []
    real_fit = L.Trainer.fit

    def spy(trainer, model, *args, **kwargs):
        fitted.append((type(model), trainer.max_steps, trainer.logger, trainer.checkpoint_callback))
        return real_fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    _, report = fit_vqgan(tiny_config(), frames[:16], steps=3, batch_size=8, restart_every=1, log_every=1)
    assert fitted == [(VQGANSystem, 3, None, None)]  # no logger, no checkpoints in any run directory
    assert [h["step"] for h in report["history"]] == [1, 2, 3] and report["eval_split"] == "train"


def test_load_or_fit_uses_the_cache_only_for_the_same_config(frames, tmp_path):
    calls = []

    def frames_fn():
        calls.append(1)
        return frames[:16]

    path = tmp_path / "cache" / "stage1.ckpt"
    fit = {"steps": 2, "batch_size": 8, "restart_every": 0, "log_every": 1}
    first, report = load_or_fit_vqgan(path, tiny_config(), frames_fn, **fit)
    assert len(calls) == 1 and report is not None and path.is_file()
    written = path.stat().st_mtime_ns
    # without a data fingerprint from the caller, the frames are read to fingerprint them, but not refitted
    again, report = load_or_fit_vqgan(path, tiny_config(), frames_fn, **fit)
    assert len(calls) == 2 and report is None and not again.training and path.stat().st_mtime_ns == written
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())

    other, report = load_or_fit_vqgan(path, tiny_config(n_embed=64), frames_fn, **fit)  # another config: refit
    assert len(calls) == 3 and report is not None
    assert other.quantize.embedding.weight.shape == (64, 8)
    written = path.stat().st_mtime_ns
    _, report = load_or_fit_vqgan(path, tiny_config(n_embed=64), frames_fn, **fit)
    assert report is None and path.stat().st_mtime_ns == written

    path.write_bytes(b"not a checkpoint")  # an unreadable cache is rebuilt
    _, report = load_or_fit_vqgan(path, tiny_config(n_embed=64), frames_fn, **fit)
    assert report is not None and torch.load(path, weights_only=True)["record"]["kind"] == "stage1_vqgan"


# ------------------------------------------------------------------------------------- Lightning system


def test_system_trains_validates_tests_and_exports(shared_data_dir, tmp_path):
    # the tiny run with this model: two training steps, then validation, the test loop with the demo metrics
    overrides = [o for o in TINY_RUN if not o.startswith("model=")] + [
        "model=vqgan_tiny", "trainer.limit_train_batches=2", "trainer.max_steps=-1", "eval.baseline=null",
        # a classifier that passes the quality floor on the tiny demo set (val frame accuracy 1.0, ~1 s)
        "eval.classifier.epochs=4", "eval.classifier.batch_size=16", "eval.classifier.lr=3e-3"]
    cfg = compose_cfg(TINY_DEMO + overrides, tmp_path, data_dir=shared_data_dir)
    # the classifier the test callback loads is prepared first (what task=train_classifier does)
    assert ensure_classifier(cfg.eval, build_datamodule(cfg), output_dir=cfg.paths.output_dir) is not None
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train/loss", "train/rec", "train/codebook_usage", "val/loss", "val/rec", "val/codebook_usage",
                "test/loss", "test/rec", "test/mae", "test/char_f1_demo", "test/frame_acc_demo"):
        assert key in metrics and np.isfinite(metrics[key]), key
    # "generated" = reconstructions of all five frames, drawn for the test grids
    from PIL import Image

    grids = sorted((out / "grids" / "test").glob("story_*.png"))
    assert len(grids) == 2
    with Image.open(grids[0]) as im:
        assert im.size[0] > 5 * 16
    # the export is the final VQGAN, loadable as a StoryDALL-E stage 1
    network = OmegaConf.to_container(cfg.model.network, resolve=True)
    config = VQGANConfig.from_dict(network)
    export = Path(cfg.paths.weights_dir) / "vqgan_tiny" / "stage1_last.ckpt"
    vqgan = VQGAN.from_ckpt(export, config)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in vqgan.state_dict().items():
        assert torch.equal(value, last[f"vqgan.{key}"]), key


def test_demo_config_composes_and_instantiates(tmp_path):
    cfg = compose_cfg(["model=vqgan_demo"], tmp_path)
    assert cfg.model.export_path == str(tmp_path / "weights" / "vqgan_demo" / "stage1_last.ckpt")
    model = build_model(cfg)
    assert model.image_size == 32 and model.config.latent_dim == 8 and model.config.num_codes == 64
    assert model.num_targets == 5 and model.task == "visualization"
    frames = torch.from_numpy(np.stack(generate_demo_story(0, "train", 0, 64).frames))[None]
    generated = model.generate({"frames": frames, "ids": ["train/0"]})
    assert generated.shape == (1, 5, 32, 32, 3) and generated.dtype == torch.uint8
    with pytest.raises(ConfigurationError, match="image_size"):
        build_model(compose_cfg(["model=vqgan_demo", "model.network.hparams.resolution=64",
                                 "model.network.hparams.attn_resolutions=[16]"], tmp_path))
