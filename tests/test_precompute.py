"""Precomputed frozen inputs (data.precompute, task=precompute, benchmark.precompute): training on cached stage-1
codes / VAE moments / wholly frozen CLIP and BLIP states equals training on live ones; the file is written once and
reused; its key follows the weights, the data and the resolution; a randomly chosen frame finds its own cached
candidate."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from storyexp.data import StoryDataModule
from storyexp.data.precomputed import PrecomputedArrays, write_precomputed
from storyexp.data.story import StoryDataError
from storyexp.errors import ConfigurationError
from storyexp.systems.frozen_inputs import ensure_precomputed, precompute_path, precompute_record

from .conftest import TINY_DEMO, compose_cfg, fixtures_dir, run_composed

# arldm_tiny's pixel autoencoder has std 0; a tiny KL VAE makes the cached std * eps matter
KL_VAE = {"kind": "kl", "block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
          "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "norm_num_groups": 4, "layers_per_block": 1}
MODELS = {"mindalle_tiny": {}, "mega_tiny": {}, "arldm_tiny": {"model__network__vae": KL_VAE}}


def build(tmp_path: Path, data_dir: Path, *overrides: str):
    """(cfg, data module set up for fit, model) for the tiny demo set."""
    return build_from(compose_cfg(TINY_DEMO + list(overrides), tmp_path, data_dir=data_dir))


def variant(cfg, **updates):
    """A copy of a composed config with dotted keys (``__`` for ``.``) set (a mapping replaces the node): composing
    is the slow part."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in updates.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False, force_add=False)
    return cfg


def build_from(cfg):
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return cfg, dm, hydra.utils.instantiate(cfg.model, _convert_="all")


def train_steps(model, dm, n: int = 2, epoch_start: bool = False) -> list[float]:
    """`n` optimizer steps of the system's own training_step on the data module's training batches. Plain SGD: the
    update is linear in the gradient, so float-level differences between a batched and a per-batch encoder pass stay
    float-level (Adam's normalised step would magnify them on near-zero gradients). `epoch_start`: run the system's
    on_train_epoch_start after train() as Lightning does (AR-LDM: frozen encoders back in eval mode)."""
    model.train()
    if epoch_start:
        model.on_train_epoch_start()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for i, batch in zip(range(n), dm.train_dataloader()):
        loss = model.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def forbid_encoder(model, monkeypatch) -> None:
    """The frozen encoder must not run: precomputed inputs replace it."""
    def fail(*args, **kwargs):
        raise AssertionError("the frozen encoder ran although precomputed inputs were attached")

    if hasattr(model, "encode_frames"):
        monkeypatch.setattr(model, "encode_frames", fail)
    else:
        monkeypatch.setattr(model.net.vae, "encode", fail)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", MODELS)
def test_training_on_cached_inputs_equals_live(tmp_path, shared_data_dir, monkeypatch, name):
    cfg = variant(compose_cfg(TINY_DEMO + [f"model={name}", f"data.precompute_dir={tmp_path / 'pre'}"], tmp_path,
                              data_dir=shared_data_dir), **MODELS[name])
    _, dm, live = build_from(cfg)
    cached = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert all(torch.equal(a, b) for a, b in zip(live.state_dict().values(), cached.state_dict().values()))
    initial = {k: v.clone() for k, v in live.state_dict().items()}
    if name == "arldm_tiny":
        assert type(live.net.vae).__name__ == "AutoencoderKL"
    live_losses = train_steps(live, dm)

    path, computed = ensure_precomputed(cached, dm, tmp_path / "out")
    assert computed and path.parent == tmp_path / "pre"
    dm.attach_precomputed(path)
    forbid_encoder(cached, monkeypatch)
    cached_losses = train_steps(cached, dm)

    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(initial[k], v) for k, v in live.state_dict().items())  # the steps did train
    for (key, a), b in zip(live.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_precompute_task_writes_once_and_training_reuses_it(tmp_path, shared_data_dir, monkeypatch):
    from storyexp.systems.storydalle import StoryDalleSystem
    from storyexp.tasks.common import build_all

    pre = tmp_path / "pre"
    task = TINY_DEMO + ["model=mindalle_tiny", "task=precompute", "precompute.device=cpu", "print_config=false",
                        "logger=none", f"data.precompute_dir={pre}"]
    first = run_composed(task, tmp_path / "a", shared_data_dir)[1]
    report = json.loads((first / "precompute.json").read_text())
    assert report["results"]["precompute/computed"] == 1.0 and report["results"]["precompute/stories"] == 48.0
    assert report["results"]["precompute/rows"] == 48 * 5 and Path(report["file"]).parent == pre

    # training with data.precompute=true finds that file: no encoder pass at all (no validation here)
    encoded = []
    encode_frames = StoryDalleSystem.encode_frames
    monkeypatch.setattr(StoryDalleSystem, "encode_frames", lambda self, frames: encoded.append(1) / 0)
    cfg = compose_cfg(TINY_DEMO + ["model=mindalle_tiny", "trainer=cpu", "trainer.max_steps=2",
                                   "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "logger=none",
                                   "callbacks=none", "data.precompute=true", f"data.precompute_dir={pre}"],
                      tmp_path / "fit", data_dir=shared_data_dir)
    datamodule, model, trainer = build_all(cfg)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2 and not encoded
    assert datamodule.datasets["train"].precomputed.path == Path(report["file"])

    # precompute.force=true encodes again, into the same keyed file
    monkeypatch.setattr(StoryDalleSystem, "encode_frames", lambda self, frames: encoded.append(1) or
                        encode_frames(self, frames))
    forced = json.loads((run_composed(task + ["precompute.force=true"], tmp_path / "c", shared_data_dir)[1]
                         / "precompute.json").read_text())
    assert forced["results"]["precompute/computed"] == 1.0 and forced["file"] == report["file"] and encoded


def test_key_follows_weights_data_and_resolution(tmp_path, shared_data_dir):
    pre = tmp_path / "pre"
    base = compose_cfg(TINY_DEMO + ["model=mega_tiny", f"data.precompute_dir={pre}"], tmp_path,
                       data_dir=shared_data_dir)
    variants = {
        "base": {},
        "weights": {"model__network__seed": 1},
        "data": {"data__demo__seed": 1},
        "image_size": {"model__image_size": 32},
        "frame_size": {"data__frame_size": 16},
    }
    paths = {}
    for key, updates in variants.items():
        _, dm, model = build_from(variant(base, **updates))
        paths[key] = precompute_path(precompute_record(model, dm), dm, tmp_path / "out")[0]
    assert len(set(paths.values())) == len(paths) and all(p.parent == pre for p in paths.values())

    # a limited training split keys its own file in the run's output folder, never the shared folder
    _, dm, model = build_from(variant(base, data__limit_train=8))
    assert precompute_path(precompute_record(model, dm), dm, tmp_path / "run")[0].parent == tmp_path / "run"

    # an explicit file made for other weights is refused in one line, and kept
    explicit = tmp_path / "mine.h5"
    _, dm, model = build_from(variant(base, data__precompute_path=str(explicit)))
    assert ensure_precomputed(model, dm, None) == (explicit, True)
    _, dm, other = build_from(variant(base, data__precompute_path=str(explicit), model__network__seed=1))
    with pytest.raises(ConfigurationError) as err:
        ensure_precomputed(other, dm, None)
    message = str(err.value)
    assert "\n" not in message and str(explicit) in message and "stage1_sha256" in message
    assert explicit.exists()


def test_benchmark_reports_the_speedup(tmp_path, shared_data_dir):
    metrics_overrides = TINY_DEMO + ["model=mega_tiny", "task=benchmark", "benchmark.steps=1", "benchmark.warmup=0",
                                     "benchmark.sample_batches=0", "benchmark.device=cpu", "benchmark.precompute=true",
                                     "print_config=false", "logger=none", f"data.precompute_dir={tmp_path / 'pre'}"]
    out = run_composed(metrics_overrides, tmp_path, shared_data_dir)[1]
    results = json.loads((out / "benchmark.json").read_text())["results"]
    assert results["benchmark/precompute_speedup"] == pytest.approx(
        results["benchmark/train_step_live_s"] / results["benchmark/train_step_cached_s"])
    assert results["benchmark/precompute_s"] > 0 and list((tmp_path / "pre").glob("StoryMegaSystem_*.h5"))


def test_bad_precompute_options_are_one_line(tmp_path):
    from storyexp.tasks.validate import validate_config

    cfg = compose_cfg([], tmp_path)
    validate_config(cfg)
    for updates, key in (({"data__precompute": "maybe"}, "data.precompute"),
                         ({"precompute__device": "tpu"}, "precompute.device"),
                         ({"data__precompute_path": "/x/codes.npy"}, "data.precompute_path"),
                         ({"benchmark__precompute": 1}, "benchmark.precompute")):
        with pytest.raises(ConfigurationError) as err:
            validate_config(variant(cfg, **updates))
        assert key in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------- AR-LDM: wholly frozen CLIP and BLIP

FROZEN_ENCODERS = ["model=arldm_tiny", "model.train.freeze_clip=true", "model.train.freeze_blip=true",
                   "model.train.freeze_embeddings=true"]


def count_encoder_rows(model, monkeypatch) -> dict[str, list[int]]:
    """Rows each of CLIP and BLIP is run on from now on (their forward passes, whatever calls them)."""
    rows = {"clip": [], "blip": []}
    for name, module, arg in (("clip", model.net.text_encoder, "input_ids"), ("blip", model.net.mm_encoder, None)):
        def forward(*args, _forward=module.forward, _name=name, _arg=arg, **kwargs):
            first = kwargs[_arg] if _arg in kwargs else args[0]
            rows[_name].append(int(first.shape[0]))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)
    return rows


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_arldm_training_on_cached_clip_blip_equals_live(tmp_path, shared_data_dir, monkeypatch):
    cfg = variant(compose_cfg(TINY_DEMO + FROZEN_ENCODERS + [f"data.precompute_dir={tmp_path / 'pre'}"], tmp_path,
                              data_dir=shared_data_dir), model__network__vae=KL_VAE)
    assert cfg.model.train.freeze_embeddings is True
    _, dm, live = build_from(cfg)
    cached = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert live.wholly_frozen() == {"clip": True, "blip": True}
    assert not any(n.startswith(("net.text_encoder.", "net.mm_encoder.")) for n, p in live.named_parameters()
                   if p.requires_grad)
    initial = {k: v.clone() for k, v in live.state_dict().items()}
    live_losses = train_steps(live, dm, epoch_start=True)  # live: no null cache (outside a fit), all encoders run

    path, computed = ensure_precomputed(cached, dm, tmp_path / "out")
    assert computed
    record = precompute_record(cached, dm)["config"]
    assert set(record["arrays"]) == {"vae_mean", "vae_std", "caption_sha256", "clip_hidden", "blip_hidden"}
    arrays = dm.attach_precomputed(path)
    row = arrays.arrays(0, dm.candidate_frames("train", 0)[0], (0,) * 5)
    S, D = cfg.data.max_length, cached.net.width
    assert row["clip_hidden"].shape == row["blip_hidden"].shape == (5, S, D) and row["clip_hidden"].dtype == np.float32
    forbid_encoder(cached, monkeypatch)
    rows = count_encoder_rows(cached, monkeypatch)
    cached._null_cache = {}  # what on_fit_start does
    cached_losses = train_steps(cached, dm, epoch_start=True)
    assert rows == {"clip": [1], "blip": [1]}  # only the null embeddings, once

    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(initial[k], v) for k, v in live.state_dict().items())  # the steps did train
    for (key, a), b in zip(live.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")

    # cached states of other captions are refused in one line
    batch = next(iter(dm.train_dataloader()))
    batch["captions"][0][2] = "a caption the file was not computed from"
    with pytest.raises(ConfigurationError) as err:
        cached.losses(batch, None)
    assert "\n" not in str(err.value) and "task=precompute" in str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_arldm_fit_with_frozen_encoders_runs_them_only_for_the_nulls(tmp_path, shared_data_dir, monkeypatch):
    from storyexp.tasks.common import build_all

    fit = ["trainer=cpu", "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
           "logger=none", "callbacks=none", "data.precompute=true", f"data.precompute_dir={tmp_path / 'pre'}"]
    cfg = compose_cfg(TINY_DEMO + FROZEN_ENCODERS + fit, tmp_path, data_dir=shared_data_dir)
    datamodule, model, trainer = build_all(cfg)
    rows, per_step = count_encoder_rows(model, monkeypatch), []
    losses = model.losses

    def counted(batch, generators):
        before = {k: len(v) for k, v in rows.items()}
        out = losses(batch, generators)
        per_step.append({k: v[before[k]:] for k, v in rows.items()})
        return out

    monkeypatch.setattr(model, "losses", counted)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2 and len(list((tmp_path / "pre").glob("ARLDMSystem_*.h5"))) == 1
    assert per_step == [{"clip": [1], "blip": [1]}, {"clip": [], "blip": []}]  # the nulls once per fit, then nothing
    assert model._null_cache is None  # dropped at the end of the fit


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_arldm_key_follows_clip_weights_and_max_length(tmp_path, shared_data_dir):
    from storyexp.systems.arldm import ARLDMSystem

    base = compose_cfg(TINY_DEMO + FROZEN_ENCODERS, tmp_path, data_dir=shared_data_dir)
    model = hydra.utils.instantiate(base.model, _convert_="all")
    key = model.frozen_key()
    assert {"clip_sha256", "clip_tokenizer", "blip_sha256", "blip_tokenizer", "blip_fit"} <= set(key)
    assert key["max_length"] == base.data.max_length and model.frozen_key() == key  # deterministic
    with torch.no_grad():
        model.net.text_encoder.final_layer_norm.weight.add_(1.0)
    other = model.frozen_key()
    assert other["clip_sha256"] != key["clip_sha256"]
    assert {k for k in key if other[k] != key[k]} == {"clip_sha256"}
    shorter = hydra.utils.instantiate(variant(base, model__max_length=12).model, _convert_="all").frozen_key()
    assert shorter["max_length"] == 12 and shorter["clip_tokenizer"] != key["clip_tokenizer"]
    # without freeze_embeddings the encoders train: the key is the VAE's alone (files made before stay valid)
    plain = hydra.utils.instantiate(variant(base, model__train__freeze_embeddings=False).model, _convert_="all")
    assert plain.wholly_frozen() == {"clip": False, "blip": False} and not plain.frozen_inputs_need_captions()
    assert plain.frozen_key()["arrays"] == ["vae_mean", "vae_std"] and "clip_sha256" not in plain.frozen_key()

    model_cfg = OmegaConf.to_container(base.model, resolve=True)
    for updates, words in (({"freeze_clip": False, "freeze_blip": False}, "neither model.train.freeze_clip"),
                           ({"mode": "lora"}, "model.train.mode=lora"), ({"freeze_embeddings": "yes"}, "true or")):
        bad = {**model_cfg, "train": {**model_cfg["train"], **updates}}
        with pytest.raises(ConfigurationError) as err:
            ARLDMSystem.check_config(bad)
        assert "model.train.freeze_embeddings" in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ data layer


SOURCES = {  # sources storing several frames per caption: raw strips / clips, and strips kept in an HDF5 file
    "pororo raw": ("pororo", "raw/pororo"),
    "flintstones raw": ("flintstones", "raw/flintstones"),
    "pororo hdf5": ("pororo", "h5/pororo.h5"),
}


def source_module(source: str = "pororo raw") -> StoryDataModule:
    name, where = SOURCES[source]
    dm = StoryDataModule(name, fixtures_dir() / where, batch_size=2)
    dm.setup("fit")
    return dm


def write_pixels(dm: StoryDataModule, path: Path) -> Path:
    """A precomputed file whose array is each candidate frame itself (an independent check of the addressing)."""
    def rows():
        for i in range(len(dm.stories("train"))):
            story_id, candidates = dm.candidate_frames("train", i)
            yield story_id, [len(c) for c in candidates], {"pixels": np.stack([f for c in candidates for f in c])}

    return write_precomputed(path, {"kind": "test"}, rows())


@pytest.mark.parametrize("source", SOURCES)
def test_random_frame_choice_reads_the_cached_candidate_of_the_frame_drawn(tmp_path, source):
    dm = source_module(source)
    assert max(len(c) for c in dm.candidate_frames("train", 0)[1]) > 1  # strips: several candidates per caption
    dm.attach_precomputed(write_pixels(dm, tmp_path / "pixels.h5"))
    np.random.seed(0)
    choices = []
    for _ in range(3):
        for batch in dm.train_dataloader():
            assert torch.equal(batch["precomputed"]["pixels"], batch["frames"])
            choices.append(batch["frame_choice"])
    assert torch.cat(choices).unique().numel() > 1  # the frames were really drawn at random
    assert "precomputed" not in next(iter(dm.val_dataloader()))  # validation stays live


def test_precomputed_rows_of_other_stories_are_refused(tmp_path):
    dm = source_module()
    path = write_pixels(dm, tmp_path / "pixels.h5")
    arrays = PrecomputedArrays(path)
    story_id, _ = dm.candidate_frames("train", 1)
    with pytest.raises(StoryDataError) as err:
        arrays.arrays(0, story_id, (0,) * 5)
    assert str(path) in str(err.value) and "task=precompute" in str(err.value)
    with pytest.raises(StoryDataError, match="outside the stored candidates"):
        arrays.arrays(1, story_id, (99,) * 5)


@pytest.mark.parametrize("source", SOURCES)
def test_cache_fingerprints_of_a_randomly_read_split_are_stable(source):
    """The classifier and stage-1 caches fingerprint the training split (`data_fingerprint`): over every candidate
    frame, so a split read with frame_choice=random fingerprints the same on every call, and taking it leaves
    NumPy's generator (which picks the frames) where it was."""
    from storyexp.utils.cache import data_fingerprint

    dm = source_module(source)
    np.random.seed(1)
    first = data_fingerprint(dm, splits=("train", "val"))
    assert np.random.randint(1 << 30) == np.random.RandomState(1).randint(1 << 30)  # the generator did not move
    assert data_fingerprint(dm, splits=("train", "val")) == first
    story = dm.stories("train")[0]
    assert len(dm.fingerprint_stories("train")[0].frames) > len(story.frames)  # every candidate, not the drawn one
