"""Shared loading for the AR-LDM parity tests (vectors produced by the original AR-LDM code).

The parity root comes from ``STORYEXP_PARITY_DIR`` (default ``tests/data/parity``); the tests read its
``arldm/`` folder. Every size, case, scheduler setting and tolerance basis is taken from the files there, so the
same tests run unchanged on another set produced the same way. Expensive objects are cached per process
(``functools.cache``) so that all test modules share one built model.

Not a conftest.py on purpose: other model families may own tests/parity/conftest.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import torch

from tests.data_paths import parity_dir

PARITY_ROOT = parity_dir()
ARLDM_DIR = PARITY_ROOT / "arldm"

# README section 5.
ATOL = 1e-5  # single modules, deterministic assembly, loss, one scheduler step
TRAJECTORY_ATOL = 1e-4  # whole multi-step trajectories


@functools.cache
def meta() -> dict:
    return json.loads((ARLDM_DIR / "meta.json").read_text())


def dataset_args() -> dict:
    """The dataset block of the ARLDM arguments (max_length, new_tokens, embedding counts)."""
    args = meta()["arldm_args"]
    return args[args["dataset"]]


def max_length() -> int:
    return int(dataset_args()["max_length"])


def new_tokens() -> list[str]:
    return list(dataset_args()["new_tokens"])


@functools.cache
def npz(relpath: str) -> dict[str, np.ndarray]:
    with np.load(ARLDM_DIR / relpath) as data:
        return {k: data[k] for k in data.files}


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def max_abs(a, b) -> float:
    a = a.detach().float().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a).float()
    b = b.detach().float().cpu() if isinstance(b, torch.Tensor) else torch.as_tensor(b).float()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_close(actual, expected, atol: float, what: str) -> None:
    err = max_abs(actual, expected)
    assert err <= atol, f"{what}: max abs diff {err:.3e} > atol {atol:.1e}"


def assert_equal(actual, expected, what: str) -> None:
    a = actual.detach().cpu() if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
    e = torch.as_tensor(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = int((a.to(e.dtype) != e).sum())
    assert diff == 0, f"{what}: {diff} of {e.numel()} entries differ"


def checkpoint_state_dict() -> dict:
    return _checkpoint()["state_dict"]


@functools.cache
def _checkpoint() -> dict:
    return torch.load(ARLDM_DIR / "arldm_tiny.ckpt", map_location="cpu", weights_only=True)


def build_from_pretrained():
    """AR-LDM built by the project's pretrained builder from ``pretrained/`` + ``blip/`` (fresh each call)."""
    from storyexp.models.arldm import build_arldm_from_pretrained

    return build_arldm_from_pretrained(
        ARLDM_DIR / "pretrained",
        ARLDM_DIR / "blip" / "model_large_tiny.pth",
        ARLDM_DIR / "blip" / "bert_tokenizer",
        max_length=max_length(),
        new_tokens=new_tokens(),
        blip_med_config=ARLDM_DIR / "blip" / "med_config.json",
        blip_vision=json.loads((ARLDM_DIR / "blip" / "vit_config.json").read_text()),
        n_frames=checkpoint_state_dict()["time_embeddings.weight"].shape[0],
        noise_scheduler_config=meta()["noise_scheduler_config"],
        generator=torch.Generator().manual_seed(0),
        local_files_only=True,
    )


@functools.cache
def parity_model():
    """The pretrained-built model with ``arldm_tiny.ckpt`` loaded strictly, in eval mode (shared, read-only)."""
    from storyexp.models.arldm import load_original_arldm_checkpoint

    components = build_from_pretrained()
    load_original_arldm_checkpoint(components.model, ARLDM_DIR / "arldm_tiny.ckpt")
    components.model.eval()
    return components


def build_scheduler(config: dict):
    """A diffusers scheduler from a recorded configuration (class named by ``_class_name``)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def step_kwargs(scheduler, eta: float) -> dict:
    import inspect

    return {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}


