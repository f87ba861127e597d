"""`model.train.mode=lora` (peft adapters) on the three tiny systems, and `model.optimizer.impl`.

For each model: a lora checkpoint holds only the adapters, the declared fully-trained parts and the buffers, it
round-trips through Lightning's `load_from_checkpoint` (same generated frames), its keys are checked strictly, merged
sampling equals unmerged sampling, and only the trainable set gets gradients.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from storyexp.errors import ConfigurationError
from storyexp.systems.schedules import make_adamw
from storyexp.tasks import build_model
from storyexp.utils.loading import CheckpointMismatchError

from .conftest import TINY_DEMO, compose_cfg

MODELS = ("arldm_tiny", "mindalle_tiny", "mega_tiny")
# what trains fully next to the adapters (no pretrained weights, or new character-token rows)
FULLY_TRAINED = {
    "arldm_tiny": ("net.modal_type_embeddings.", "net.time_embeddings.", "net.text_encoder.embeddings.",
                   "net.mm_encoder.text.embeddings.word_embeddings."),
    "mindalle_tiny": ("net.story_linear.", "net.story_block.", "net.cross_attn.", "net.stage2.tok_emb_txt.",
                      "net.stage2.head_txt."),
    "mega_tiny": ("model.encoder.embed_tokens.",),  # + every decoder key with "condition" in it
}


def build(tmp_path: Path, model: str, *overrides: str):
    cfg = compose_cfg(TINY_DEMO + [f"model={model}", *overrides], tmp_path)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def demo_batch(demo_train_batch):
    return {k: (v[:2] if isinstance(v, (torch.Tensor, list)) else v) for k, v in demo_train_batch.items()}  # 2 stories


def nonzero_adapters(model, seed: int = 0) -> None:
    """peft starts lora_B at zero (adapter = identity); give the adapters values so that they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def eval_loss(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.losses(batch, model.story_generators(batch))["loss"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step called without a Trainer
@pytest.mark.parametrize("name", MODELS)
def test_lora_checkpoint_roundtrip_merge_and_gradients(name, tmp_path, demo_batch):
    _, model = build(tmp_path, name, "model.train.mode=lora")
    nonzero_adapters(model)

    # only adapters + the declared fully trained parts train, and only they get gradients
    trainable = set(model.trainable_parameter_names())
    assert any("lora_A" in k for k in trainable) and any("lora_B" in k for k in trainable)
    declared = lambda k: k.startswith(FULLY_TRAINED[name]) or (name == "mega_tiny" and "condition" in k)  # noqa: E731
    assert all("lora_" in k or declared(k) for k in trainable), sorted(k for k in trainable if "lora_" not in k)
    assert not any(k.endswith("base_layer.weight") for k in trainable)
    model.train()
    model.zero_grad(set_to_none=True)
    model.training_step(demo_batch, 0).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and any("lora_A" in k for k in with_grad)

    # the checkpoint holds exactly the trainable set and the buffers (the base is rebuilt from the config)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.strategy._lightning_module = model
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    saved = torch.load(path, weights_only=True)["state_dict"]
    buffers = {k for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, torch.nn.Parameter)}
    assert set(saved) == model.saved_state_keys() == trainable | buffers
    full = model.state_dict()
    assert len(saved) < len(full)

    # rebuild the base from the config, load the adapters: the same frames
    frames = model.generate(demo_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'keys missing from the checkpoint' warning for the rebuilt base
        reloaded = type(model).load_from_checkpoint(path, weights_only=True)
    assert torch.equal(reloaded.generate(demo_batch), frames)

    # merged (the default outside fitting) vs unmerged adapters: the same function within float rounding
    fresh = type(model).load_from_checkpoint(path, weights_only=True)
    fresh.lora_merge_for_sampling = False
    unmerged_frames, unmerged_loss = fresh.generate(demo_batch), eval_loss(fresh, demo_batch)
    assert not fresh._lora_merged
    fresh.set_lora_merged(True)
    assert (fresh.generate(demo_batch).int() - unmerged_frames.int()).abs().max() <= 1
    torch.testing.assert_close(eval_loss(fresh, demo_batch), unmerged_loss, rtol=1e-4, atol=1e-5)
    assert reloaded._lora_merged  # generate merged it

    # strict: a finetune checkpoint (no adapters), or a lora one missing an adapter, is one clear error; the lora
    # model's own full dump (model.train.save_frozen=true) loads
    _, finetuned = build(tmp_path, name)
    with pytest.raises(CheckpointMismatchError, match="missing keys.*lora_A.*model.train options"):
        fresh.on_load_checkpoint({"state_dict": finetuned.state_dict()})
    fresh.on_load_checkpoint({"state_dict": full})
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        fresh.on_load_checkpoint({"state_dict": {k: v for k, v in saved.items() if "lora_A" not in k}})


def test_lora_options_and_refusals(tmp_path):
    _, model = build(tmp_path, "mega_tiny", "model.train.mode=lora", "model.train.lora.r=2",
                     "model.train.lora.target_modules=[q_proj]")
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_a and all(p.shape[0] == 2 for p in lora_a)
    assert not any("k_proj.lora" in n or "condition_attn.q_proj.lora" in n for n, _ in model.named_parameters())
    with pytest.raises(ConfigurationError, match="target_modules=\\['nope'\\] matches no linear layer"):
        build(tmp_path, "mindalle_tiny", "model.train.mode=lora", "model.train.lora.target_modules=[nope]")
    with pytest.raises(ConfigurationError, match="model.train.lora.r=0"):
        build(tmp_path, "mega_tiny", "model.train.mode=lora", "model.train.lora.r=0")
    with pytest.raises(ConfigurationError, match="freeze_resnet=true does not combine"):
        build(tmp_path, "arldm_tiny", "model.train.mode=lora", "model.train.freeze_resnet=true")
    # finetune stays the default: no adapters; checkpoints are lean in every mode (tests/test_lean_checkpoints.py)
    _, plain = build(tmp_path, "mega_tiny")
    assert plain.saved_state_keys() == plain.lean_state_keys()
    assert not any("lora" in n for n, _ in plain.named_parameters())


# ----------------------------------------------------------------------------------------------- optimizer


def opt_cfg(impl: str) -> dict:
    return {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "impl": impl}


def test_optimizer_impls_on_cpu():
    torch.manual_seed(0)
    start = torch.randn(64, 128)  # >= 4096 elements: bitsandbytes keeps 8-bit states for it
    results = {}
    for impl in ("adamw", "fused", "adamw8bit"):
        param = torch.nn.Parameter(start.clone())
        opt = make_adamw([param], opt_cfg(impl), param.device)
        for _ in range(3):
            param.grad = torch.sin(param.detach() * 3)
            opt.step()
        results[impl] = (type(opt).__name__, param.detach(), opt)
    assert results["adamw"][0] == "AdamW" and results["fused"][2].defaults["fused"] is True
    assert results["adamw8bit"][0] == "AdamW8bit"
    assert results["adamw8bit"][2].state[next(iter(results["adamw8bit"][2].state))]["state1"].dtype == torch.uint8
    torch.testing.assert_close(results["fused"][1], results["adamw"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["adamw8bit"][1], results["adamw"][1], rtol=0, atol=2e-3)  # quantised states


def test_optimizer_impl_composition_and_errors(tmp_path, monkeypatch):
    cfg = compose_cfg(TINY_DEMO + ["model=mega_tiny", "model.optimizer.impl=fused"], tmp_path)
    assert cfg.model.optimizer.impl == "fused"
    assert compose_cfg(TINY_DEMO + ["model=arldm_tiny"], tmp_path).model.optimizer.impl == "adamw"
    with pytest.raises(ConfigurationError, match="model.optimizer.impl='sgd' is not valid"):
        build(tmp_path, "mega_tiny", "model.optimizer.impl=sgd")
    param = torch.nn.Parameter(torch.zeros(2))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"needs the bitsandbytes package: pip install 'storyexp\[bnb\]'"):
        make_adamw([param], opt_cfg("adamw8bit"), param.device)
    with pytest.raises(ConfigurationError, match="does not run on meta"):
        make_adamw([param], opt_cfg("fused"), torch.device("meta"))
