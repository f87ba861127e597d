"""Lean checkpoints: what trains, plus the record of where the frozen rest comes from (`StorySystem`, base.py).

For each tiny model: a checkpoint holds exactly the trainable parameters, the buffers and the declared prefixes, and a
record whose tensor hash equals one computed here; it reloads to the same frames and loss as a full dump
(`model.train.save_frozen=true`, every key); rebuilding other frozen weights (another `network.seed`, a modified
pretrained file) is one ConfigurationError line naming the checkpoint, the recorded source and the fix; a 1-step fit's
checkpoint holds optimizer state for the trainable parameters only and resumes.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from storyexp.errors import ConfigurationError
from storyexp.tasks import build_model
from storyexp.tasks.common import check_resume_model

from .conftest import TINY_DEMO, compose_cfg

# arldm_tiny trains every weight in finetune (its pixel "VAE" has none): freeze CLIP so that it has a frozen part
MODELS = {"arldm_tiny": ("model.train.freeze_clip=true",), "mindalle_tiny": (), "mega_tiny": ()}
QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


def build(tmp_path: Path, model: str, *overrides: str):
    return build_model(compose_cfg(TINY_DEMO + [f"model={model}", *MODELS.get(model, ()), *overrides], tmp_path))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model of a name, composed once per module (composing costs more than building)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(tmp_path_factory.mktemp(name), name)
        return rebuild(cache[name])
    return get


def rebuild(model, **changes):
    """The same system built again from its hyper-parameters (all of its constructor's arguments), `changes` applied."""
    return type(model)(**{**copy.deepcopy(dict(model.hparams)), **changes})


@pytest.fixture(scope="module")
def batch(demo_train_batch):
    return {k: (v[:1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in demo_train_batch.items()}  # 1 story


def save(model, path: Path) -> dict:
    """`trainer.save_checkpoint` as the tasks' trainers write it, without a fit."""
    trainer = L.Trainer(**QUIET)
    trainer.strategy.connect(model)
    trainer.strategy._lightning_module = model
    trainer.save_checkpoint(path, weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def moved(model, seed: int = 1) -> None:
    """Trained weights differ from the built ones, so that a reload shows they came from the checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def expected_keys(model) -> set[str]:
    state = model.state_dict(keep_vars=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers() if name in state}
    declared = {k for k in state if model.saved_frozen_prefixes() and k.startswith(model.saved_frozen_prefixes())}
    return trainable | buffers | declared


def frozen_sha256(model, saved: set[str]) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key not in saved:
            h.update(f"{key}\0{value.dtype}\0{list(value.shape)}\n".encode())
            h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        loss = model.losses(batch, model.story_generators(batch))["loss"]
    return loss, model.generate(batch)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lean_checkpoint_holds_what_trains_and_reloads_as_the_full_dump(name, tmp_path, batch, built):
    model = built(name)
    moved(model)
    lean = save(model, tmp_path / "lean.ckpt")
    keys = expected_keys(model)
    assert set(lean["state_dict"]) == keys and len(keys) < len(model.state_dict())
    record = lean["storyexp"]["frozen"]
    assert record == {"saved": "lean", "sha256": frozen_sha256(model, keys), "sources": {}, "network_seed": 0}

    model.hparams.train["save_frozen"] = True  # model.train.save_frozen=true (composed in the next test)
    full = save(model, tmp_path / "full.ckpt")
    assert set(full["state_dict"]) == set(model.state_dict()) and full["storyexp"]["frozen"] == {"saved": "full"}

    want_loss, want_frames = outputs(model, batch)
    for path in ("lean.ckpt", "full.ckpt"):
        reloaded = type(model).load_from_checkpoint(tmp_path / path, weights_only=True)
        loss, frames = outputs(reloaded, batch)
        assert torch.equal(loss, want_loss) and torch.equal(frames, want_frames), path


def test_save_frozen_switch_composes_and_is_checked(tmp_path):
    model = build(tmp_path, "mega_tiny", "model.train.save_frozen=true")
    assert model.saved_state_keys() is None
    ckpt = save(model, tmp_path / "full.ckpt")
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    with pytest.raises(ConfigurationError, match=r"^model.train.save_frozen='yes' is not valid: it must be true"):
        rebuild(model, train=dict(model.hparams.train, save_frozen="yes"))


def test_other_seeded_frozen_weights_are_one_line(tmp_path, built):
    model = built("mindalle_tiny")
    save(model, tmp_path / "lean.ckpt")
    network = dict(model.hparams.network, seed=1)
    with pytest.raises(ConfigurationError) as err:
        type(model).load_from_checkpoint(tmp_path / "lean.ckpt", weights_only=True, network=network)
    line = str(err.value)
    assert "\n" not in line and line.startswith("The checkpoint holds only what trains")
    assert "seeded random init (model.network.seed=0)" in line and "full-dump checkpoint" in line


def test_a_modified_pretrained_file_is_one_line_naming_it(tmp_path, built):
    from storyexp.systems.vqgan_training import save_vqgan

    base, stage1 = built("mindalle_tiny"), tmp_path / "stage1.ckpt"
    save_vqgan(rebuild(base, network=dict(base.hparams.network, seed=3)).stage1, stage1)
    model = rebuild(base, network=dict(base.hparams.network, stage1_checkpoint=str(stage1)))
    ckpt = save(model, tmp_path / "lean.ckpt")
    digest = hashlib.sha256(stage1.read_bytes()).hexdigest()
    assert ckpt["storyexp"]["frozen"]["sources"] == {
        "network.stage1_checkpoint": [{"path": str(stage1), "bytes": stage1.stat().st_size, "sha256": digest}]}
    assert type(model).load_from_checkpoint(tmp_path / "lean.ckpt", weights_only=True)  # the same file: it loads

    payload = torch.load(stage1, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith(".weight"))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, stage1)
    with pytest.raises(ConfigurationError) as err:
        type(model).load_from_checkpoint(tmp_path / "lean.ckpt", weights_only=True)
    line = str(err.value)
    assert "\n" not in line and f"model.network.stage1_checkpoint: {stage1} (sha256 {digest[:12]})" in line
    assert "point model.network.stage1_checkpoint at the files recorded" in line


def test_fit_checkpoint_has_optimizer_state_for_what_trains_and_resumes(tmp_path, batch, built):
    model = built("mindalle_tiny")
    loader = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **QUIET)
    trainer.fit(model, train_dataloaders=loader)
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    (optimizer,) = ckpt["optimizer_states"]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trainable) == len(optimizer["state"])
    assert sorted(s["exp_avg"].numel() for s in optimizer["state"].values()) == sorted(p.numel() for p in trainable)
    assert set(ckpt["state_dict"]) == expected_keys(model)

    check_resume_model(OmegaConf.create({}), str(path))  # a training state: resumable
    weights = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(weights, weights_only=True)
    with pytest.raises(ConfigurationError, match=rf"^ckpt_path {weights} holds weights only .*checkpoints/last.ckpt"):
        check_resume_model(OmegaConf.create({}), str(weights))

    resumed = rebuild(model)
    again = L.Trainer(max_steps=2, limit_val_batches=0, **QUIET)
    again.fit(resumed, train_dataloaders=loader, ckpt_path=path, weights_only=True)
    assert again.global_step == 2

    other = rebuild(model, network=dict(model.hparams.network, seed=5))
    with pytest.raises(ConfigurationError, match=rf"^Checkpoint \(ckpt_path\) {path} holds only what trains"):
        L.Trainer(max_steps=2, limit_val_batches=0, **QUIET).fit(other, train_dataloaders=loader, ckpt_path=path,
                                                                 weights_only=True)
