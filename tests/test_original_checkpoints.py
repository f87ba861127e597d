"""The originals' checkpoints as `ckpt_path`: an original AR-LDM Lightning `last.ckpt` and a released StoryDALL-E
`{epoch}.pth`, written in the original trainers' layouts (optimizer, loop, scheduler and callback entries included),
are recognised by task=eval / task=sample and give exactly what `model.network.init_from_*` gives; a model of another
family and task=train are one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storyexp.tasks import run_task
from storyexp.tasks.original_checkpoints import ARLDM, STORYDALLE, classify
from storyexp.utils.loading import load_file

from .conftest import TINY_DEMO, TINY_RUN, compose_cfg
from .data_paths import parity_dir

ARLDM_DIR = parity_dir() / "arldm"
NO_MODEL = [o for o in TINY_RUN if not o.startswith("model=")]
SAMPLE = ["task=sample", "sample.num_stories=1", "data.batch_size=1"]


def _adamw_state(state_dict: dict, **kwargs) -> dict:
    """A real AdamW state after one step over the float tensors of `state_dict` (what the originals saved)."""
    params = [torch.nn.Parameter(v.detach().clone().float()) for v in state_dict.values() if v.is_floating_point()]
    optimizer = torch.optim.AdamW(params, **kwargs)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return optimizer, optimizer.state_dict()


def _progress(n: int) -> dict:
    return {"ready": n, "started": n, "processed": n, "completed": n}


def write_arldm_last_ckpt(path: Path) -> Path:
    """The parity AR-LDM weights (`arldm_tiny.ckpt`, written by the original code) in the layout of the original
    Trainer's `last.ckpt` (pytorch_lightning 1.6: ModelCheckpoint(save_last=True), AdamW + bolts warm-up/cosine)."""
    state_dict = torch.load(ARLDM_DIR / "arldm_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    optimizer, optimizer_state = _adamw_state(state_dict, lr=1e-5, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    scheduler_state.update(warmup_epochs=100, max_epochs=5000, warmup_start_lr=0.0, eta_min=0.0)  # bolts' fields
    steps = 3
    checkpoint_key = ("ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
                      "'train_time_interval': None, 'save_on_train_epoch_end': True}")
    torch.save({
        "epoch": 0,
        "global_step": steps,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": state_dict,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": steps},
                "epoch_loop.batch_progress": {"total": _progress(steps), "current": _progress(steps),
                                              "is_last_batch": False},
                "epoch_loop.scheduler_progress": {"total": {"ready": steps, "completed": steps},
                                                  "current": {"ready": steps, "completed": steps}},
                "epoch_loop.batch_loop.optimizer_loop.optim_progress": {
                    "optimizer": {"step": {"total": {"ready": steps, "completed": steps}},
                                  "zero_grad": {"total": _progress(steps)}},
                    "optimizer_position": 1},
                "epoch_progress": {"total": _progress(0), "current": _progress(0)},
            },
            "validate_loop": {"state_dict": {}, "dataloader_progress": {"total": {"ready": 0, "completed": 0}}},
            "test_loop": {"state_dict": {}},
            "predict_loop": {"state_dict": {}},
        },
        "callbacks": {checkpoint_key: {
            "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
            "dirpath": "/ckpt/arldm_run", "best_k_models": {}, "kth_best_model_path": "",
            "kth_value": torch.tensor(float("inf")), "last_model_path": "/ckpt/arldm_run/last.ckpt"}},
        "optimizer_states": [optimizer_state],
        "lr_schedulers": [scheduler_state],
    }, path)
    return path


def arldm_cfg(tmp_path: Path, data_dir: Path, *overrides: str, name: str = "run"):
    """The tiny AR-LDM the parity checkpoint was trained as: the stand-in pretrained folders of the parity set (the
    tokenizers and configurations the original checkpoint does not hold), its characters and caption length."""
    # no logger: Lightning refuses model and data hyper-parameters that disagree (the characters differ from the demo's)
    cfg = compose_cfg(TINY_DEMO + NO_MODEL + ["model=arldm_tiny", "eval=loss_only", "model.sampler.num_inference_steps=2",
                                              "model.image_size=32", "logger=none", *overrides], tmp_path / name,
                      data_dir=data_dir)
    meta = json.loads((ARLDM_DIR / "meta.json").read_text())
    cfg.model.characters = list(meta["sizes"]["new_tokens"])
    cfg.model.max_length = int(meta["sizes"]["S"])
    cfg.model.network = {
        "source": "pretrained",
        "stable_diffusion": str(ARLDM_DIR / "pretrained"),
        "blip_checkpoint": str(ARLDM_DIR / "blip" / "model_large_tiny.pth"),
        "bert_tokenizer": str(ARLDM_DIR / "blip" / "bert_tokenizer"),
        "blip_med_config": str(ARLDM_DIR / "blip" / "med_config.json"),
        "blip_vision": json.loads((ARLDM_DIR / "blip" / "vit_config.json").read_text()),
        "noise_scheduler_config": meta["noise_scheduler_config"],
        "local_files_only": True,
        "init_from_original": cfg.model.network.get("init_from_original"),
    }
    return cfg


def run(cfg) -> tuple[dict, Path]:
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return metrics, out


def frames(out: Path) -> list[np.ndarray]:
    files = sorted((out / "samples").glob("story_*/**/frame_*.png"))
    assert files, f"no frames under {out / 'samples'}"
    return [np.asarray(Image.open(f)) for f in files]


def one_line_error(cfg) -> str:
    from storyexp.tasks import UserError

    with pytest.raises(UserError) as err:
        run_task(cfg)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def arldm_ckpt(tmp_path_factory) -> Path:
    return write_arldm_last_ckpt(tmp_path_factory.mktemp("arldm_original") / "last.ckpt")


@pytest.fixture(scope="module")
def storydalle_pth(tmp_path_factory, shared_data_dir) -> Path:
    """A `{epoch}.pth` in the released layout (SD train_t2i.py: epoch, model_state_dict, optimizer_state_dict,
    iteration, scheduler, loss) from a freshly built tiny StoryDALL-E (stage1.*, stage2.* with the grown text rows,
    story_*; no cross-attention keys, as in the released file)."""
    import hydra

    tmp = tmp_path_factory.mktemp("storydalle_original")
    cfg = compose_cfg(TINY_DEMO + ["model=mindalle_tiny", "model.network.seed=1"], tmp, data_dir=shared_data_dir)
    source = hydra.utils.instantiate(cfg.model, _convert_="all")
    state = {f"stage1.{k}": v for k, v in source.stage1.state_dict().items()}
    state.update({k: v for k, v in source.net.state_dict().items() if not k.startswith("cross_attn.")})
    optimizer, optimizer_state = _adamw_state(state, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=1.0)
    path = tmp / "pororo" / "Model" / "12.pth"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 12, "model_state_dict": state, "optimizer_state_dict": optimizer_state, "iteration": 480,
                "scheduler": scheduler.state_dict(), "loss": torch.tensor(3.25)}, path)
    return path


def test_the_safe_loader_reads_and_recognises_both_layouts(arldm_ckpt, storydalle_pth):
    arldm = load_file(arldm_ckpt)
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks", "pytorch-lightning_version"} <= set(arldm)
    assert classify(arldm) is ARLDM
    released = load_file(storydalle_pth)
    assert {"optimizer_state_dict", "scheduler", "iteration", "loss"} <= set(released)
    assert classify(released) is STORYDALLE
    assert classify({"state_dict": {"net.unet.conv_in.weight": torch.zeros(1)}}) is None  # storyexp's naming


def test_arldm_last_ckpt_as_ckpt_path_evaluates_and_samples_like_init_from_original(tmp_path, shared_data_dir,
                                                                                     arldm_ckpt):
    imported, out = run(arldm_cfg(tmp_path, shared_data_dir, "task=eval", f"ckpt_path={arldm_ckpt}", name="eval_ckpt"))
    reference, _ = run(arldm_cfg(tmp_path, shared_data_dir, "task=eval",
                                 f"model.network.init_from_original={arldm_ckpt}", name="eval_init"))
    assert np.isfinite(imported["test/loss"]) and imported["test/loss"] == reference["test/loss"]
    assert json.loads((out / "summary.json").read_text())["checkpoints"]["evaluated"] == str(arldm_ckpt)

    _, out = run(arldm_cfg(tmp_path, shared_data_dir, *SAMPLE, f"ckpt_path={arldm_ckpt}", name="sample_ckpt"))
    _, ref = run(arldm_cfg(tmp_path, shared_data_dir, *SAMPLE, f"model.network.init_from_original={arldm_ckpt}",
                           name="sample_init"))
    got, want = frames(out), frames(ref)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_storydalle_pth_as_ckpt_path_evaluates_and_samples_like_init_from_storydalle(tmp_path, shared_data_dir,
                                                                                    storydalle_pth):
    def cfg(name, *overrides):
        return compose_cfg(TINY_DEMO + NO_MODEL + ["model=mindalle_tiny", "eval=loss_only", *overrides],
                           tmp_path / name, data_dir=shared_data_dir)

    imported, _ = run(cfg("eval_ckpt", "task=eval", f"ckpt_path={storydalle_pth}"))
    reference, _ = run(cfg("eval_init", "task=eval", f"model.network.init_from_storydalle={storydalle_pth}"))
    assert np.isfinite(imported["test/loss"]) and imported["test/loss"] == reference["test/loss"]
    _, out = run(cfg("sample_ckpt", *SAMPLE, f"ckpt_path={storydalle_pth}"))
    _, ref = run(cfg("sample_init", *SAMPLE, f"model.network.init_from_storydalle={storydalle_pth}"))
    got, want = frames(out), frames(ref)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_another_model_family_is_one_line_naming_both(tmp_path, shared_data_dir, arldm_ckpt, storydalle_pth):
    line = one_line_error(compose_cfg(TINY_DEMO + NO_MODEL + ["model=mindalle_tiny", "task=eval",
                                                              f"ckpt_path={arldm_ckpt}"], tmp_path / "a",
                                      data_dir=shared_data_dir))
    assert "AR-LDM" in line and "model=arldm" in line and "model=mindalle_tiny" in line
    line = one_line_error(compose_cfg(TINY_DEMO + NO_MODEL + ["model=arldm_tiny", "task=sample",
                                                              f"ckpt_path={storydalle_pth}"], tmp_path / "b",
                                      data_dir=shared_data_dir))
    assert "StoryDALL-E" in line and "model=mindalle" in line and "model=arldm_tiny" in line


def test_train_from_an_original_checkpoint_is_one_line_naming_init_from(tmp_path, shared_data_dir, arldm_ckpt,
                                                                        storydalle_pth):
    line = one_line_error(compose_cfg(TINY_DEMO + NO_MODEL + ["model=arldm_tiny", "task=train",
                                                              f"ckpt_path={arldm_ckpt}"], tmp_path / "a",
                                      data_dir=shared_data_dir))
    assert f"model.network.init_from_original={arldm_ckpt}" in line
    line = one_line_error(compose_cfg(TINY_DEMO + NO_MODEL + ["model=mindalle_tiny", "task=train",
                                                              f"ckpt_path={storydalle_pth}"], tmp_path / "b",
                                      data_dir=shared_data_dir))
    assert f"model.network.init_from_storydalle={storydalle_pth}" in line
