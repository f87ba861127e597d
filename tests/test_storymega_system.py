"""StoryDALL-E on DALL-E Mega as a system: configs, the condition attention actually reading the source frame,
trainable sets, superconditioning, checkpoints with their tokenizer, min-dalle files + a taming checkpoint as
the pretrained source, and the train -> test -> eval -> sample tasks at the tiny size on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch

from storyexp.errors import MissingResourceError
from storyexp.models.mega.model import unconditional_ids
from storyexp.models.mega.story import story_logits, story_loss
from storyexp.tasks import build_model

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg, parity_dir, run_composed

TINY = TINY_DEMO + ["model=mega_tiny"]
RUN = TINY_DEMO + [o for o in TINY_RUN if not o.startswith("model=")] + ["model=mega_tiny"]


def build(tmp_path: Path, *overrides: str, data_dir: Path | None = None):
    cfg = compose_cfg(TINY + list(overrides), tmp_path, data_dir=data_dir)
    return cfg, hydra.utils.instantiate(cfg.model, _convert_="all")


def demo_batch(cfg):
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data_dir):
    cfg, model = build(tmp_path_factory.mktemp("mega"), data_dir=shared_data_dir)
    return cfg, model, demo_batch(cfg)


def open_gates(model, value: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.model.decoder.named_parameters():
            if name.endswith("condition_gate"):
                param.fill_(value)


# ------------------------------------------------------------------------------------------------ configs


def test_model_mega_on_demo_data_is_the_demo_size(tmp_path):
    cfg = compose_cfg(["model=mega", "data=demo"], tmp_path)
    assert cfg.model.network.source == "sizes" and cfg.model.image_size == 32
    assert cfg.model == compose_cfg(["model=mega_demo", "data=demo"], tmp_path).model


def test_published_mega_reports_missing_weights(tmp_path):
    cfg = compose_cfg(["model=mega", "data=pororo"], tmp_path)
    assert cfg.model.network.start_token == 16383 and cfg.model.sampler.supercondition_factor == 1.0
    with pytest.raises(MissingResourceError) as err:
        build_model(cfg)
    assert "encoder.pt" in str(err.value) and "kuprel/min-dalle" in str(err.value)


@pytest.mark.parametrize("dataset, lr", [("pororo", 1e-4), ("flintstones", 1e-5)])
def test_recipe_experiments(tmp_path, dataset, lr):
    cfg = compose_cfg([f"experiment=mega_{dataset}"], tmp_path)
    assert cfg.model._target_.endswith("StoryMegaSystem") and cfg.data.name == dataset
    assert cfg.model.optimizer.lr == pytest.approx(lr) and cfg.trainer.accumulate_grad_batches == 4


def test_characters_are_whole_word_tokens_with_embedding_rows(tiny):
    cfg, model, _ = tiny
    tok = model.tokenizer
    for name in cfg.data.characters:
        ids = tok.tokenize(f"{name} waves")
        assert ids[1] >= tok.vocab_size - len(cfg.data.characters)
    assert len(tok.tokenize("pipe")) > 3 or tok.tokenize("pipe")[1] != tok.tokenize("pip")[1]
    assert model.model.encoder.embed_tokens.num_embeddings == tok.vocab_size


# ------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("task, targets", [("continuation", 4), ("visualization", 5)])
def test_prepare_batch(tmp_path, shared_data_dir, task, targets):
    cfg, model = build(tmp_path, f"data.task={task}", data_dir=shared_data_dir)
    batch = demo_batch(cfg)
    inputs = model.prepare_batch(batch)
    B, T = len(batch["ids"]), model.stage1.config.num_codes
    assert inputs["texts"].shape == (B, targets, cfg.model.network.sizes.text_tokens)
    assert inputs["images"].shape == (B, targets, T) and inputs["source_codes"].shape == (B, T)
    assert int(inputs["texts"][0, 0, 0]) == model.tokenizer.bos_id


def test_source_range_switch(tmp_path, shared_data_dir):
    cfg, model = build(tmp_path, data_dir=shared_data_dir)
    _, original = build(tmp_path, "model.network.source_zero_one=true", data_dir=shared_data_dir)
    frames = demo_batch(cfg)["frames"]
    assert original.frames_zero_one and not model.frames_zero_one
    assert not torch.equal(model.encode_frames(frames), original.encode_frames(frames))


# -------------------------------------------------------------------------------- condition attention


def test_condition_attention_reads_the_source_frame(tiny):
    _, model, batch = tiny
    inputs = model.prepare_batch(batch)
    args = dict(start_token=model.start_token)
    other = inputs["source_codes"].roll(1, dims=0)
    with torch.no_grad():
        zero_a = story_logits(model.model, inputs["texts"], inputs["images"], inputs["source_codes"], **args)
        zero_b = story_logits(model.model, inputs["texts"], inputs["images"], other, **args)
        assert torch.equal(zero_a, zero_b)  # zero gate: the pretrained function, whatever the source
        open_gates(model)
        a = story_logits(model.model, inputs["texts"], inputs["images"], inputs["source_codes"], **args)
        b = story_logits(model.model, inputs["texts"], inputs["images"], other, **args)
        none = story_logits(model.model, inputs["texts"], inputs["images"], None, **args)
        open_gates(model, 0.0)
    assert not torch.allclose(a, b)  # another source frame, other predictions
    assert torch.allclose(none, zero_a, atol=1e-6)  # no source = the plain backbone
    # visualization: frame 0 never sees the source
    rows = torch.tensor([False, True, True, True])
    open_gates(model)
    with torch.no_grad():
        va = story_logits(model.model, inputs["texts"], inputs["images"], inputs["source_codes"], source_rows=rows,
                          **args)
        vb = story_logits(model.model, inputs["texts"], inputs["images"], other, source_rows=rows, **args)
    open_gates(model, 0.0)
    per_story = va.view(len(batch["ids"]), 4, *va.shape[1:]), vb.view(len(batch["ids"]), 4, *vb.shape[1:])
    assert torch.allclose(per_story[0][:, 0], per_story[1][:, 0], atol=1e-6)
    assert not torch.allclose(per_story[0][:, 1:], per_story[1][:, 1:])


def test_condition_layers_are_registered_and_learn(tiny):
    _, model, batch = tiny
    names = [n for n, _ in model.model.decoder.named_parameters() if "condition" in n]
    layers = {int(n.split(".")[1]) for n in names}
    assert layers == {i for i in range(len(model.model.decoder.layers)) if (i + 1) % 3 == 0}
    model.zero_grad()
    model.losses(batch)["loss"].backward()
    gate = dict(model.model.decoder.named_parameters())[next(n for n in names if n.endswith("condition_gate"))]
    assert gate.grad is not None and gate.grad.abs().item() > 0
    model.zero_grad()


def test_text_dropout_trains_on_the_empty_caption(tiny):
    _, model, batch = tiny
    inputs = model.prepare_batch(batch)
    with torch.no_grad():
        dropped = story_loss(model.model, **inputs, start_token=model.start_token, text_dropout=1.0)
        empty = unconditional_ids(inputs["texts"].reshape(-1, inputs["texts"].shape[-1])).view_as(inputs["texts"])
        direct = story_loss(model.model, **{**inputs, "texts": empty}, start_token=model.start_token)
    assert torch.allclose(dropped["loss"], direct["loss"])


def test_condition_only_mode(tmp_path):
    _, model = build(tmp_path, "model.train.mode=condition_only")
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert "encoder.embed_tokens.weight" in trainable
    assert all("condition" in n for n in trainable if n.startswith("decoder."))
    assert any("condition" in n for n in trainable)
    with pytest.raises(Exception, match="train.mode"):
        build(tmp_path, "model.train.mode=prompt")


# ------------------------------------------------------------------------------------------- sampling


def test_generation_is_seeded_and_superconditioning_changes_it(tiny):
    _, model, batch = tiny
    a, b = model.generate(batch), model.generate(batch)
    assert a.shape == (len(batch["ids"]), 4, model.image_size, model.image_size, 3) and torch.equal(a, b)
    assert not torch.equal(a, model.generate(batch, supercondition_factor=4.0))
    cands = model.generate_candidates(batch, num_candidates=2, chain=True)
    assert cands.shape[1] == 2 and not torch.equal(cands[:, 0], cands[:, 1])


def test_factor_one_skips_the_unconditional_half_and_draws_the_same_codes(tiny, tmp_path, monkeypatch):
    """At supercondition factor 1 the unconditional half is multiplied by 0: skipping it (the default) gives the
    same codes as running both halves (the original's cost), with the decoder stepping B rows instead of 2B."""
    _, model, batch = tiny
    rows: list[int] = []
    step = model.model.decoder.step

    def counting_step(prev, *args, **kwargs):
        rows.append(prev.shape[0])
        return step(prev, *args, **kwargs)

    monkeypatch.setattr(model.model.decoder, "step", counting_step)
    both = model.generate_candidates(batch, num_candidates=2, skip_unconditional=False)
    rows_both, rows[:] = list(rows), []
    skipped = model.generate_candidates(batch, num_candidates=2)
    assert torch.equal(both, skipped)
    n = len(batch["ids"]) * 2 * model.num_targets  # stories x candidates x target frames, drawn together
    assert set(rows) == {n} and set(rows_both) == {2 * n}
    cfg = compose_cfg(TINY + ["model.sampler.skip_unconditional=false"], tmp_path)
    assert cfg.model.sampler.skip_unconditional is False and cfg.model.sampler.supercondition_factor == 1.0


# --------------------------------------------------------------------------------- pretrained sources


def test_min_dalle_files_and_a_taming_checkpoint_build_the_pretrained_model(tmp_path, shared_data_dir):
    """The pretrained path on the parity set's min-dalle files (float16, non-contiguous views) and a taming
    `last.ckpt` written here (with `loss.*` keys, as the real one), its code grid matching the decoder's."""
    folder = parity_dir() / "mega"
    from storyexp.models.vqgan import VQGAN, VQGANConfig

    meta = torch.load(folder / "cases.pt", weights_only=True)["meta"]["sizes"]
    side = int(meta["image_token_count"] ** 0.5)
    hp = {"resolution": side * 4, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [side],
          "z_channels": 8}
    vq_cfg = VQGANConfig.from_dict({"embed_dim": 8, "n_embed": 64, "hparams": hp})
    state = {f"{k}": v for k, v in VQGAN(vq_cfg).state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    # the demo data makes model=mega the demo size (storyexp/conf/model_data); switch back to the pretrained source
    cfg = compose_cfg(TINY_DEMO + [
        "model=mega", "model.network.source=pretrained", "model.network.min_dalle=" + str(folder), f"model.network.attention_heads={meta['attention_head_count']}",
        f"model.network.vqgan_encoder={tmp_path / 'last.ckpt'}", f"model.image_size={side * 4}",
        f"+model.network.vqgan_config={{embed_dim: 8, n_embed: 64, hparams: {json.dumps(hp).replace(chr(34), '')}}}",
    ], tmp_path, data_dir=shared_data_dir)
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert model.start_token == 16383 and model.model.detokenizer is not None
    assert model.model.encoder.embed_tokens.num_embeddings >= model.tokenizer.vocab_size
    out = model.losses(demo_batch(cfg))
    assert torch.isfinite(out["loss"])


# --------------------------------------------------------------------------------------------- tasks


def run(tmp_path: Path, data_dir: Path, *overrides: str, name: str = "run") -> tuple[dict, Path]:
    return run_composed(RUN + list(overrides), tmp_path / name, data_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data_dir):
    tmp = tmp_path_factory.mktemp("mega_trained")
    metrics, out = run(tmp, shared_data_dir, "trainer.limit_train_batches=2", "trainer.max_steps=-1")
    return metrics, out, tmp


def test_train_tests_with_demo_metrics_and_eval_reproduces(trained, shared_data_dir):
    from storyexp.systems.story_tokens import TOKENIZER_KEY
    from storyexp.systems.storymega import StoryMegaSystem

    metrics, out, tmp = trained
    for key in ("val/loss", "test/loss", "test/char_f1_demo", "test/frame_acc_demo", "test/fid_demo", "baseline/frame_acc_demo"):
        assert key in metrics, key
    best = json.loads((out / "summary.json").read_text())["checkpoints"]["best"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert '"pip"' in ckpt[TOKENIZER_KEY]
    restored = StoryMegaSystem.load_from_checkpoint(best, map_location="cpu")
    assert restored.tokenizer.tokenize("pip waves") == restored.tokenizer.tokenize("pip waves")
    assert "pip" in restored.tokenizer.added
    evaluated, _ = run(tmp, shared_data_dir, "task=eval", f"ckpt_path={best}", name="eval")
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


def test_sample_task_and_visualization(trained, shared_data_dir, tmp_path):
    _, out, tmp = trained
    _, sample_out = run(tmp, shared_data_dir, "task=sample", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                        "sample.num_stories=2", "model.sampler.num_candidates=2", name="sample")
    assert len(list((sample_out / "samples" / "story_000" / "candidate_1").glob("frame_*.png"))) == 4
    metrics, _ = run(tmp_path, shared_data_dir, "data.task=visualization", "model.sampler.chain=true",
                     "model.sampler.supercondition_factor=2.0", "model.train.text_dropout=0.5",
                     "trainer.limit_train_batches=2", "trainer.max_steps=-1")
    assert "test/frame_acc_demo" in metrics
