"""StoryDALL-E (minDALL-E backbone) as a system: configs, batch preparation, trainable sets, sampling modes,
checkpoints with their tokenizer, and the train -> test -> eval -> sample tasks at the tiny size on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch

from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.mindalle.story import StoryDalleNet
from storyexp.tasks import build_model

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg, run_composed

TINY = TINY_DEMO + ["model=mindalle_tiny"]
RUN = TINY_DEMO + [o for o in TINY_RUN if not o.startswith("model=")] + ["model=mindalle_tiny"]


def build(tmp_path: Path, *overrides: str, data_dir: Path | None = None):
    cfg = compose_cfg(TINY + list(overrides), tmp_path, data_dir=data_dir)
    return cfg, hydra.utils.instantiate(cfg.model, _convert_="all")


def demo_batch(cfg, split: str = "train"):
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit" if split != "test" else "test")
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return next(iter(loader))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data_dir):
    tmp = tmp_path_factory.mktemp("storydalle")
    cfg, model = build(tmp, data_dir=shared_data_dir)
    return cfg, model, demo_batch(cfg)


# ------------------------------------------------------------------------------------------------ configs


def test_model_mindalle_on_demo_data_is_the_demo_size(tmp_path):
    cfg = compose_cfg(["model=mindalle", "data=demo"], tmp_path)
    assert cfg.model.network.source == "sizes" and cfg.model.image_size == 32
    assert cfg.model.network.stage1_fit.cache.endswith(".ckpt")
    same = compose_cfg(["model=mindalle_demo", "data=demo"], tmp_path)
    assert cfg.model == same.model


def test_published_mindalle_reports_missing_weights(tmp_path):
    cfg = compose_cfg(["model=mindalle", "data=pororo"], tmp_path)
    assert cfg.model.image_size == 256 and cfg.model.network.source == "pretrained"
    assert cfg.model.optimizer.betas == [0.9, 0.99] and cfg.model.optimizer.weight_decay == 0.0
    with pytest.raises(MissingResourceError) as err:
        build_model(cfg)
    message = str(err.value)
    assert "stage2_last.ckpt" in message and "1.3B.tar.gz" in message


@pytest.mark.parametrize("dataset, lr", [("pororo", 1e-4), ("flintstones", 1e-5)])
def test_released_recipe_experiments(tmp_path, dataset, lr):
    cfg = compose_cfg([f"experiment=mindalle_{dataset}"], tmp_path)
    assert cfg.model._target_.endswith("StoryDalleSystem") and cfg.data.name == dataset
    assert cfg.model.optimizer.lr == pytest.approx(lr)
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.data.batch_size == 1
    assert cfg.model.sentence_encoder.kind == "dataset" and cfg.data.sentence_embeddings is True


def test_characters_are_single_tokens_and_grow_the_text_embedding(tiny):
    cfg, model, _ = tiny
    for name in cfg.data.characters:
        ids = model.tokenizer.encode(f"{name} waves").ids
        assert ids[0] >= model.net.cfg.vocab_size_txt - len(cfg.data.characters)
    assert model.tokenizer.encode("pipe").tokens[0] != "pip"  # whole words only
    rows = model.net.stage2.tok_emb_txt.num_embeddings
    assert rows == model.tokenizer.get_vocab_size() == model.net.stage2.head_txt.out_features


# ------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("task, targets", [("continuation", 4), ("visualization", 5)])
def test_prepare_batch(tmp_path, shared_data_dir, task, targets):
    cfg, model = build(tmp_path, f"data.task={task}", data_dir=shared_data_dir)
    batch = demo_batch(cfg)
    inputs = model.prepare_batch(batch)
    B = len(batch["ids"])
    T = model.stage1.config.num_codes
    assert inputs["texts"].shape == (B, targets, cfg.model.network.stage2.ctx_len_txt)
    assert inputs["images"].shape == (B, targets, T) and inputs["source_codes"].shape == (B, T)
    assert inputs["sentence_embeds"].shape == (B, targets, cfg.model.sentence_encoder.dim)
    assert int(inputs["images"].max()) < model.stage1.config.n_embed
    if task == "visualization":
        assert inputs["source_rows"].tolist() == [False, True, True, True, True]
    else:
        assert inputs["source_rows"] is None
        assert torch.equal(inputs["source_codes"], model.encode_frames(batch["frames"][:, :1])[:, 0])


def test_dataset_sentence_embeddings_are_required_when_configured(tmp_path, shared_data_dir):
    cfg, model = build(tmp_path, "model.sentence_encoder.kind=dataset", "model.sentence_encoder.dim=16",
                       data_dir=shared_data_dir)
    batch = demo_batch(cfg)
    with pytest.raises(ConfigurationError, match="data.sentence_embeddings=true"):
        model.prepare_batch(batch)
    batch["sentence_embeds"] = torch.randn(len(batch["ids"]), 5, 16)
    inputs = model.prepare_batch(batch)
    assert torch.equal(inputs["sentence_embeds"], batch["sentence_embeds"][:, 1:])


def test_over_long_caption_is_truncated_with_a_warning(tiny):
    _, model, _ = tiny
    with pytest.warns(UserWarning, match="truncated"):
        ids = model.tokenize(["pip " * 40])
    assert ids.shape == (1, model.net.cfg.ctx_len_txt)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(Exception, match="train.mode"):
        build(tmp_path, "model.train.mode=qlora")
    with pytest.raises(Exception, match="sentence_encoder.kind"):
        build(tmp_path, "model.sentence_encoder.kind=use")
    with pytest.raises(Exception, match="autocast"):
        build(tmp_path, "model.sampler.autocast=fp8")
    with pytest.raises(Exception, match="model.task='captioning' is not valid"):
        build(tmp_path, "model.task=captioning")


# -------------------------------------------------------------------------------------- trainable sets


def test_finetune_trains_stage2_and_story_parts_never_stage1(tiny):
    _, model, batch = tiny
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("stage1.") for n in trainable)
    assert "net.stage2.blocks.0.attn.query.weight" in trainable
    assert any(n.startswith("net.cross_attn.") for n in trainable)
    assert any(n.startswith("net.story_block.") for n in trainable)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in model.stage1.parameters())
    gate = model.net.cross_attn[0].gate
    assert gate.grad is not None and gate.grad.abs().item() > 0


def test_prompt_mode_freezes_stage2_but_its_embeddings_and_text_head(tmp_path):
    _, model = build(tmp_path, "model.train.mode=prompt", "model.story.preseqlen=3")
    assert model.net.prompt and model.net.prompt_len == 4
    trainable = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert "stage2.blocks.0.attn.query.weight" not in trainable and "stage2.head_img.weight" not in trainable
    for name in ("stage2.tok_emb_txt.weight", "stage2.tok_emb_img.weight", "stage2.pos_emb_img.weight",
                 "stage2.head_txt.weight", "wte.weight", "control_trans.0.weight", "story_linear.weight"):
        assert name in trainable, name
    assert any(n.startswith("cross_attn.") for n in trainable)


def test_original_unmasked_text_loss_switch(tmp_path, shared_data_dir):
    cfg, masked = build(tmp_path, data_dir=shared_data_dir)
    _, unmasked = build(tmp_path, "model.train.mask_text_padding=false", data_dir=shared_data_dir)
    batch = demo_batch(cfg)
    a, b = masked.losses(batch), unmasked.losses(batch)
    assert torch.allclose(a["loss_img"], b["loss_img"])  # same weights (same seed), only the text loss differs
    assert not torch.allclose(a["loss_txt"], b["loss_txt"])


@pytest.mark.parametrize("decay", ["cosine", "constant"])
def test_lr_schedule_warms_up_then_decays_or_stays(tmp_path, decay):
    import lightning as L

    _, model = build(tmp_path, "model.lr_schedule.warmup_steps=2", f"model.lr_schedule.decay={decay}")
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False)
    model.trainer = trainer
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert opt.defaults["betas"] == (0.9, 0.99)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = float(model.hparams.optimizer["lr"])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(peak)
    if decay == "cosine":
        assert lrs[-1] < 0.2 * peak
    else:
        assert lrs[-1] == pytest.approx(peak)


# ------------------------------------------------------------------------------------------- sampling


def test_generate_is_seeded_per_story_and_in_range(tiny):
    _, model, batch = tiny
    a = model.generate(batch)
    b = model.generate(batch)
    assert a.shape == (len(batch["ids"]), 4, model.image_size, model.image_size, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(batch, seed=123))


def test_candidates_are_independent_stories(tiny):
    _, model, batch = tiny
    cands = model.generate_candidates(batch, num_candidates=3)
    assert cands.shape[:3] == (len(batch["ids"]), 3, 4)
    assert not torch.equal(cands[:, 0], cands[:, 1])


def test_chain_conditions_each_frame_on_the_previous_generated_one(tiny, monkeypatch):
    _, model, batch = tiny
    seen = []
    original = StoryDalleNet.source_embeddings

    def spy(self, source_codes, n_frames):
        seen.append(source_codes.clone())
        return original(self, source_codes, n_frames)

    monkeypatch.setattr(StoryDalleNet, "source_embeddings", spy)
    inputs = model.prepare_batch(batch)
    codes = model.net.sample(inputs["texts"], inputs["sentence_embeds"], inputs["source_codes"], top_k=8,
                             top_p=None, generator=torch.Generator().manual_seed(0), chain=True, num_codes=4)
    assert len(seen) == 4
    assert torch.equal(seen[0], inputs["source_codes"])
    for i in range(1, 4):
        assert torch.equal(seen[i], codes[:, i - 1])


def test_visualization_draws_frame_zero_from_text_then_uses_it_as_source(tiny, monkeypatch):
    _, model, batch = tiny
    seen = []
    original = StoryDalleNet.source_embeddings
    monkeypatch.setattr(StoryDalleNet, "source_embeddings",
                        lambda self, s, n: seen.append((s.clone(), n)) or original(self, s, n))
    inputs = model.prepare_batch(batch)
    codes = model.net.sample(inputs["texts"], inputs["sentence_embeds"], None, top_k=8, top_p=None,
                             generator=torch.Generator().manual_seed(0), num_codes=4)
    assert len(seen) == 1 and seen[0][1] == 3 and torch.equal(seen[0][0], codes[:, 0])


def test_autocast_sampling_runs(tiny):
    _, model, batch = tiny
    out = model.generate(batch, autocast="bf16")
    assert out.dtype == torch.uint8 and out.shape[1] == 4


# --------------------------------------------------------------------------------------------- tasks


def run(tmp_path: Path, data_dir: Path, *overrides: str, name: str = "run") -> tuple[dict, Path]:
    return run_composed(RUN + list(overrides), tmp_path / name, data_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data_dir):
    tmp = tmp_path_factory.mktemp("storydalle_trained")
    metrics, out = run(tmp, shared_data_dir, "trainer.limit_train_batches=2", "trainer.max_steps=-1")
    return metrics, out, tmp


def test_train_tests_with_demo_metrics(trained):
    metrics, out, _ = trained
    for key in ("val/loss", "test/loss", "test/loss_img", "test/loss_txt", "test/char_f1_demo", "test/frame_acc_demo",
                "test/fid_demo", "baseline/frame_acc_demo"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/frame_acc_demo"] <= 1.0
    assert len(list((out / "grids" / "test").glob("story_*.png"))) == 2


def test_checkpoint_carries_the_grown_tokenizer_and_eval_reproduces_the_loss(trained, shared_data_dir):
    from storyexp.systems.storydalle import TOKENIZER_KEY, StoryDalleSystem

    metrics, out, tmp = trained
    best = json.loads((out / "summary.json").read_text())["checkpoints"]["best"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert TOKENIZER_KEY in ckpt and '"pip"' in ckpt[TOKENIZER_KEY]
    assert any(k.startswith("net.cross_attn.") for k in ckpt["state_dict"])
    restored = StoryDalleSystem.load_from_checkpoint(best, map_location="cpu")
    assert restored.tokenizer.encode("pip waves").ids == restored.tokenizer.encode("pip waves").ids
    assert restored.tokenizer.token_to_id("pip") is not None
    evaluated, _ = run(tmp, shared_data_dir, "task=eval", f"ckpt_path={best}", name="eval")
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


def test_sample_task_writes_candidates(trained, shared_data_dir):
    _, out, tmp = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    _, sample_out = run(tmp, shared_data_dir, "task=sample", f"ckpt_path={ckpt}", "sample.num_stories=2",
                        "model.sampler.num_candidates=2", name="sample")
    assert len(list((sample_out / "samples").glob("story_*.png"))) == 2
    cands = sorted((sample_out / "samples" / "story_000").glob("candidate_*"))
    assert [c.name for c in cands] == ["candidate_1"]
    assert len(list(cands[0].glob("frame_*.png"))) == 4


def test_visualization_task_trains_and_samples(shared_data_dir, tmp_path):
    metrics, out = run(tmp_path, shared_data_dir, "data.task=visualization", "model.sampler.chain=true",
                       "trainer.limit_train_batches=2", "trainer.max_steps=-1")
    assert "test/frame_acc_demo" in metrics and "val/loss" in metrics


def test_stage1_is_fitted_on_first_use_cached_and_saved_with_the_model(shared_data_dir, tmp_path):
    from storyexp.models.vqgan import VQGAN, VQGANConfig

    cache = tmp_path / "stage1.ckpt"
    fit = f"model.network.stage1_fit={{cache:{cache},image_size:16,steps:3,batch_size:8,lr:2e-3,seed:0}}"
    _, out = run(tmp_path, shared_data_dir, fit, "trainer.max_steps=1", "eval=loss_only")
    assert cache.is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cached = torch.load(cache, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in cached.items():  # stage 1 is frozen: the trained model carries the fitted weights
        assert torch.equal(ckpt["state_dict"][f"stage1.{key}"], value), key
    stamp = cache.stat().st_mtime_ns
    run(tmp_path, shared_data_dir, fit, "trainer.max_steps=1", "eval=loss_only", name="again")
    assert cache.stat().st_mtime_ns == stamp  # reused, not refitted
    config = VQGANConfig.from_dict(ckpt["hyper_parameters"]["network"]["stage1"])
    assert VQGAN.from_ckpt(cache, config).config == config


def _released_file(tmp_path: Path):
    """A `{epoch}.pth` in the released layout (stage1.*, stage2.* with the grown text rows, story_*; no
    cross-attention keys) written from a freshly built model."""
    _, source = build(tmp_path, "model.network.seed=1")
    state = {f"stage1.{k}": v for k, v in source.stage1.state_dict().items()}
    state.update({k: v for k, v in source.net.state_dict().items() if not k.startswith("cross_attn.")})
    path = tmp_path / "12.pth"
    torch.save({"epoch": 12, "model_state_dict": state, "optimizer_state_dict": {}}, path)
    return source, path


def test_released_checkpoint_layout_initialises_the_system(tmp_path):
    """The released layout, written from one model, initialises another built with init_from_storydalle."""
    source, path = _released_file(tmp_path)

    _, model = build(tmp_path, f"model.network.init_from_storydalle={path}")
    for key, value in source.net.state_dict().items():
        if not key.startswith("cross_attn."):
            assert torch.equal(model.net.state_dict()[key], value), key
    for key, value in source.stage1.state_dict().items():
        assert torch.equal(model.stage1.state_dict()[key], value), key
    assert all(float(layer.gate) == 0.0 for layer in model.net.cross_attn)  # absent in the file: inert

    with pytest.raises(Exception, match="init_from_storydalle"):
        build(tmp_path, f"model.network.init_from_storydalle={tmp_path / 'missing.pth'}")


def test_eval_tests_a_released_checkpoint_without_ckpt_path(tmp_path, shared_data_dir):
    """How a released checkpoint's published numbers are reproduced: task=eval builds the model from it."""
    _, path = _released_file(tmp_path)
    metrics, out = run(tmp_path, shared_data_dir, "task=eval", f"model.network.init_from_storydalle={path}",
                       "eval=loss_only")
    assert np.isfinite(metrics["test/loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"]["evaluated"] == f"model.network.init_from_storydalle={path}"


def test_story_switches_compose(tmp_path):
    _, ungated = build(tmp_path, "model.story.gate_init=none", "model.story.cross_every=1")
    assert len(ungated.net.cross_attn) == ungated.net.cfg.n_layers
    assert all(layer.gate is None for layer in ungated.net.cross_attn)
    _, plain = build(tmp_path, "model.story.condition=false")
    assert len(plain.net.cross_attn) == 0
