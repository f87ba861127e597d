"""Training a taming VQGAN (stage 1 of StoryDALL-E) from scratch: losses, dead-code restart, a plain fit loop,
and a cached export that `VQGAN.from_ckpt` loads.

Pretrained VQGANs cannot be downloaded here, so the demo builds its own small stage 1. The objective is
the VQ-VAE one (reconstruction + codebook + beta * commitment), without taming's perceptual and adversarial
terms: those need pretrained LPIPS weights and many more steps, and flat synthetic frames do not need them.
Codebooks trained from scratch collapse onto a few entries; codes unused for a while are re-initialised to
encoder outputs of the current batch (dead-code restart), which keeps the codebook in use.

One way to train it: `storyexp.systems.vqgan.VQGANSystem` under a `lightning.Trainer`, either as a run of its
own (`python launch.py model=vqgan_demo`) or through `fit_vqgan` / `load_or_fit_vqgan` (the same system fitted
on an array of frames, deterministic, e.g. for a system that needs a stage 1 on first use). `load_or_fit_vqgan`
caches the result with a record of what produced it (`storyexp.utils.cache`: sizes and fit settings, data
fingerprint, reconstruction MAE and codebook usage) and refits when the record does not match.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from storyexp.errors import ConfigurationError
from storyexp.models.vqgan import VQGAN, VQGANConfig
from storyexp.utils.cache import (
    cache_path,
    check_quality,
    data_fingerprint,
    frames_fingerprint,
    make_record,
    matches,
    quiet_lightning,
    single_device_trainer,
)
from storyexp.utils.images import minus_one_one, resize_uint8, uint8_from_minus_one_one
from storyexp.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "CodeUsage",
    "codebook_usage",
    "fit_vqgan",
    "frames_to_inputs",
    "load_or_fit_vqgan",
    "pick_candidates",
    "reconstruct",
    "restart_dead_codes",
    "save_vqgan",
    "stage1_cache",
    "stage1_record_config",
    "vqgan_losses",
]


# ---------------------------------------------------------------------------------------------- losses


def vqgan_losses(vqgan: VQGAN, images: torch.Tensor, beta: float = 0.25) -> dict[str, torch.Tensor]:
    """VQ-VAE objective on images [B, 3, R, R] in [-1, 1].

    Returns ``loss`` = ``rec`` + ``codebook``, where ``rec`` = L1 + MSE of the reconstruction and
    ``codebook`` = ||sg[z] - z_q||^2 + beta * ||z - sg[z_q]||^2 (codebook term, then commitment term, as in
    the VQ-VAE paper; taming's `legacy` quantiser puts beta on the other term). The decoder sees z_q with a
    straight-through gradient to the encoder. Also returned: ``codes`` [B, h, w], ``z`` [B, C, h, w] (the
    pre-quantisation latents, for dead-code restart) and ``reconstruction`` (raw decoder output).
    """
    z = vqgan._pre_quant(images)
    codes = vqgan.quantize.codes(z)
    z_q = vqgan.quantize.lookup(codes)  # no straight-through here: the codebook term needs dL/d(codebook)
    codebook = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())
    reconstruction = vqgan.decode(z + (z_q - z).detach())
    rec = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
    return {"loss": rec + codebook, "rec": rec, "codebook": codebook, "codes": codes, "z": z,
            "reconstruction": reconstruction}


# ------------------------------------------------------------------------------------- codebook usage


def codebook_usage(codes: torch.Tensor, n_embed: int) -> dict[str, float]:
    """``usage``: fraction of the codebook present in ``codes``; ``perplexity``: exp(entropy) of the code
    histogram (n_embed when all codes are equally frequent, 1 when one code is used)."""
    counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=n_embed).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


class CodeUsage:
    """When each code was last used (in steps), to find the dead ones.

    Plain tensors, so a LightningModule can keep ``last_used`` as a buffer (it then lives in checkpoints).
    """

    def __init__(self, n_embed: int, last_used: torch.Tensor | None = None):
        self.n_embed = int(n_embed)
        self.last_used = torch.zeros(self.n_embed, dtype=torch.long) if last_used is None else last_used

    def update(self, codes: torch.Tensor, step: int) -> None:
        self.last_used[codes.reshape(-1).unique().to(self.last_used.device)] = int(step)

    def dead(self, step: int, window: int) -> torch.Tensor:
        """Indices of codes not used in the last ``window`` steps (up to and including ``step``)."""
        return torch.nonzero(int(step) - self.last_used >= int(window)).flatten()

    def fraction_alive(self, step: int, window: int) -> float:
        return float((int(step) - self.last_used < int(window)).double().mean())


@torch.no_grad()
def restart_dead_codes(vqgan: VQGAN, usage: CodeUsage, z: torch.Tensor, step: int, window: int,
                       generator: torch.Generator | None = None, candidates: torch.Tensor | None = None) -> int:
    """Re-initialise the codes unused over the last ``window`` steps to random encoder outputs.

    ``z`` [B, C, h, w] are the current batch's pre-quantisation latents; each dead code becomes one of its
    vectors, drawn without replacement while enough exist (``generator`` on z's device makes the draw
    deterministic). Pass ``candidates`` [K, C] instead to use given vectors (e.g. the same ones on every DDP
    process). Restarted codes count as used at ``step``, so they get ``window`` steps to be picked.
    Returns how many codes were restarted.
    """
    dead = usage.dead(step, window)
    if dead.numel() == 0:
        return 0
    if candidates is None:
        candidates = pick_candidates(z, dead.numel(), generator)
    weight = vqgan.quantize.embedding.weight
    weight[dead.to(weight.device)] = candidates[: dead.numel()].to(weight)
    usage.last_used[dead] = int(step)
    return int(dead.numel())


def pick_candidates(z: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random latent vectors [n, C] from ``z`` [B, C, h, w] (without replacement when possible)."""
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if flat.shape[0] >= n:
        idx = torch.randperm(flat.shape[0], generator=generator, device=generator.device if generator else "cpu")[:n]
    else:
        idx = torch.randint(flat.shape[0], (n,), generator=generator,
                            device=generator.device if generator else "cpu")
    return flat[idx.to(flat.device)]


# ----------------------------------------------------------------------------------------------- inputs


def frames_to_inputs(frames: torch.Tensor | np.ndarray, image_size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] -> uint8 [N, 3, image_size, image_size] (antialiased bilinear, as
    `storyexp.utils.images.resize_uint8`), in chunks to bound memory. Map to [-1, 1] with `minus_one_one`."""
    x = torch.as_tensor(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    if len(x) == 0:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    x = x.cpu()
    return torch.cat([resize_uint8(x[i : i + chunk], image_size) for i in range(0, len(x), chunk)])


@torch.no_grad()
def reconstruct(vqgan: VQGAN, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> reconstructed uint8 [N, R, R, 3] (encode, quantise, decode)."""
    device = next(vqgan.parameters()).device
    outs = [uint8_from_minus_one_one(vqgan(minus_one_one(inputs[i : i + batch_size].to(device)))).cpu()
            for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, *inputs.shape[2:], 3, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------- fit


class _FrameBatches(Dataset):
    """``dataset[index_tensor]`` -> ``{"frames": uint8 [B, 1, R, R, 3]}``: one-frame "stories", a whole batch."""

    def __init__(self, frames_nhwc: torch.Tensor):
        self.frames = frames_nhwc

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"frames": self.frames[idx][:, None]}


class _Passes(Sampler):
    """``steps`` index batches of ``batch_size`` from passes over a shuffled order (a private generator seeded
    with ``seed``); a batch never straddles two passes: when the rest of a pass is too short, a new pass starts."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int):
        self.n, self.batch_size, self.steps, self.seed = int(n), int(batch_size), int(steps), int(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        order, pos = torch.randperm(self.n, generator=gen), 0
        for _ in range(self.steps):
            if pos + self.batch_size > len(order):
                order, pos = torch.randperm(self.n, generator=gen), 0
            yield order[pos : pos + self.batch_size]
            pos += self.batch_size


class _FitRecorder(L.Callback):
    """The step losses of a fit (the last ``window`` steps, and every ``log_every`` steps for the history)."""

    def __init__(self, steps: int, log_every: int):
        self.steps, self.log_every = int(steps), int(log_every)
        self.recent: list[dict[str, float]] = []
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        losses = {k: float(v) for k, v in pl_module.last_losses.items()}
        self.recent = (self.recent + [losses])[-max(self.log_every, 1):]
        if self.log_every and step % self.log_every == 0:
            self.history.append({"step": step, **losses})
            log.info("vqgan step %d/%d: loss %.4f rec %.4f codebook %.4f", step, self.steps, losses["loss"],
                     losses["rec"], losses["codebook"])


def fit_vqgan(
    config: VQGANConfig,
    frames: torch.Tensor | np.ndarray,
    *,
    image_size: int | None = None,
    steps: int = 350,
    batch_size: int = 40,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.5, 0.9),
    beta: float = 0.25,
    seed: int = 0,
    restart_every: int = 20,
    log_every: int = 50,
    val_frames: torch.Tensor | np.ndarray | None = None,
    lr_schedule: str = "cosine",
    device: str | torch.device = "cpu",
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[VQGAN, dict[str, Any]]:
    """Train a VQGAN from scratch on uint8 frames [N, H, W, 3]; returns (model in eval mode, report).

    Fits `storyexp.systems.vqgan.VQGANSystem` (the loss, schedule and dead-code restart of ``model=vqgan_demo``)
    with a `lightning.Trainer` (`storyexp.utils.cache.single_device_trainer`: one device, no logger, no
    checkpoints; ``trainer_kwargs`` override its arguments). Deterministic for a given seed (model init from
    ``seed`` inside a forked RNG, batches from a private generator, restarts from per-step generators; the global
    RNGs are left alone). Frames are resized once to ``image_size`` (default and only allowed value:
    ``config.hparams.resolution``, so the code grid is ``latent_dim`` x ``latent_dim``) and mapped to [-1, 1];
    no augmentation. Batches of ``batch_size`` frames come from passes over a shuffled order. Adam with taming's
    betas (0.5, 0.9); ``lr_schedule`` ``cosine`` (to 0 over ``steps``) or ``constant``. Every ``restart_every``
    steps, codes unused over the last ``restart_every`` steps are restarted (0 disables it).

    Report: ``rec`` (mean over the last ``log_every`` steps), ``loss``, ``codebook``, ``history`` (the
    step's losses every ``log_every`` steps), ``usage`` / ``perplexity`` / ``mae`` (codebook use and mean
    absolute per-pixel reconstruction error on the [0, 255] scale, over the training frames, or ``val_frames``
    when given; ``eval_split`` says which), ``steps``, ``seconds``, ``restarted`` (codes restarted in all), and
    with ``val_frames``: ``val_mae`` (= ``mae``) and ``val_rec``.
    """
    from storyexp.systems.vqgan import VQGANSystem  # the system imports this module's losses

    resolution = config.hparams.resolution
    image_size = resolution if image_size is None else int(image_size)
    if image_size != resolution:
        raise ConfigurationError(
            f"image_size {image_size} differs from the VQGAN's resolution {resolution}: the code grid would not "
            f"be {config.latent_dim}x{config.latent_dim}"
        )
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0 (got {steps}, {batch_size}, {lr})")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    device = torch.device(device)
    data = frames_to_inputs(frames, image_size)
    if len(data) == 0:
        raise ValueError("fit_vqgan got no frames")

    system = VQGANSystem(image_size=image_size, network=config.to_dict(),
                         loss={"beta": float(beta), "restart_every": int(restart_every)},
                         optimizer={"lr": float(lr), "betas": [float(b) for b in betas], "schedule": lr_schedule},
                         seed=int(seed))
    loader = DataLoader(_FrameBatches(data.permute(0, 2, 3, 1).contiguous()), batch_size=None,
                        sampler=_Passes(len(data), batch_size, steps, seed))
    recorder = _FitRecorder(steps, log_every)
    accelerator = {"cuda": "gpu"}.get(device.type, device.type)
    devices = [device.index] if device.type == "cuda" and device.index is not None else 1
    start = time.perf_counter()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with tempfile.TemporaryDirectory(prefix="storyexp-vqgan-") as tmp, torch.random.fork_rng(devices=rng_devices):
        kwargs: dict[str, Any] = {
            "accelerator": accelerator, "devices": devices, "max_epochs": 1, "max_steps": int(steps),
            "limit_val_batches": 0, "enable_checkpointing": False, "default_root_dir": tmp,
            "callbacks": [recorder], "gradient_clip_val": None,
        }
        kwargs.update(trainer_kwargs or {})
        with quiet_lightning():
            trainer = single_device_trainer(**kwargs)
            trainer.fit(system, train_dataloaders=loader)
    vqgan = system.vqgan.to(device).eval()
    recent = recorder.recent
    report: dict[str, Any] = {k: float(np.mean([r[k] for r in recent])) for k in ("loss", "rec", "codebook")}
    report.update(steps=int(trainer.global_step), seconds=time.perf_counter() - start,
                  restarted=int(system.restarted_codes), history=recorder.history)
    eval_data = data if val_frames is None else frames_to_inputs(val_frames, image_size)
    codes, abs_err, recs = [], 0.0, []
    with torch.no_grad():
        for i in range(0, len(eval_data), 256):
            chunk = eval_data[i : i + 256].to(device)
            out = vqgan_losses(vqgan, minus_one_one(chunk), beta=beta)
            codes.append(out["codes"].cpu())
            recs.append(float(out["rec"]) * len(chunk))
            abs_err += float((uint8_from_minus_one_one(out["reconstruction"]).float() - chunk.permute(0, 2, 3, 1).float()).abs().sum())
    report.update(codebook_usage(torch.cat(codes), config.n_embed))
    report["mae"] = abs_err / eval_data.numel()
    report["eval_split"] = "train" if val_frames is None else "val"
    if val_frames is not None:
        report["val_rec"] = sum(recs) / len(eval_data)
        report["val_mae"] = report["mae"]
    return vqgan, report


# ------------------------------------------------------------------------------------------ save / load

KIND = "stage1_vqgan"
FIT_SETTINGS = ("image_size", "steps", "batch_size", "lr", "betas", "beta", "seed", "restart_every", "lr_schedule")


def save_vqgan(vqgan: VQGAN, path: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write ``{"state_dict", "stage1_config"}`` (+ ``record``, a `storyexp.utils.cache` record) atomically;
    `VQGAN.from_ckpt(path, config)` loads it."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().clone() for k, v in vqgan.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": state, "stage1_config": vqgan.config.to_dict()}
    if record is not None:
        payload["record"] = record
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def stage1_record_config(config: VQGANConfig, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a fitted stage 1 is recorded (and compared) by: the VQGAN sizes and the fit settings, defaults filled
    in from `fit_vqgan`'s signature (``log_every``, ``device``, ``val_frames`` do not define the result)."""
    defaults = {name: p.default for name, p in inspect.signature(fit_vqgan).parameters.items()
                if p.default is not inspect.Parameter.empty}
    fit = {key: fit_kwargs.get(key, defaults.get(key)) for key in FIT_SETTINGS}
    if fit["image_size"] is None:
        fit["image_size"] = config.hparams.resolution
    fit["betas"] = [float(b) for b in fit["betas"]]
    return {"network": config.to_dict(), "fit": fit}


def stage1_cache(shared: str | os.PathLike, datamodule, output_dir: str | os.PathLike | None,
                 split: str = "train") -> tuple[Path, dict[str, Any]]:
    """``(cache path, data fingerprint)`` of a stage 1 fitted on ``datamodule``'s ``split``: the ``shared`` path,
    or, when that split is limited (``data.limit_train``), ``output_dir / <file name>`` (a limited run never
    reads or writes the shared cache). Pass both to `load_or_fit_vqgan` (``fingerprint=``)."""
    fingerprint = data_fingerprint(datamodule, splits=(split,))
    return cache_path(shared, fingerprint, output_dir), fingerprint


def load_or_fit_vqgan(
    path: str | os.PathLike,
    config: VQGANConfig,
    frames_fn: Callable[[], torch.Tensor | np.ndarray],
    *,
    fingerprint: dict[str, Any] | None = None,
    max_mae: float | None = None,
    min_usage: float | None = None,
    **fit_kwargs: Any,
) -> tuple[VQGAN, dict[str, Any] | None]:
    """The cached stage 1 at ``path`` when its record matches this fit; otherwise fit one with
    `fit_vqgan(config, frames_fn(), **fit_kwargs)` (a ``val_frames`` entry may be a callable too, read only
    then) and cache it with its record. Returns (VQGAN in eval mode, fit report or None when loaded).

    The record (`storyexp.utils.cache`): ``config`` = `stage1_record_config` (VQGAN sizes + fit settings),
    ``data`` = ``fingerprint`` (e.g. from `stage1_cache`, which reads a few stories only) or, when None, the
    `frames_fingerprint` of ``frames_fn()`` (then the frames are read on every call), ``quality`` = ``mae``,
    ``usage``, ``perplexity`` (see `fit_vqgan`), ``rec``, ``restarted``. A cache without a record, unreadable, or
    whose config or data fingerprint differs is refitted and replaced (one log line says why). A cache (or a new
    fit, after it is written) whose ``mae`` is above ``max_mae`` or whose ``usage`` is below ``min_usage`` is
    refused with one `ConfigurationError` line (``None``: not checked).

    The caller chooses ``path``: with a limited training split, the run's own file (`stage1_cache`).
    """
    from storyexp.utils.loading import load_file

    path = Path(path)
    frames = None
    if fingerprint is None:
        frames = frames_fn()
        fingerprint = frames_fingerprint(frames)
    expected = {"kind": KIND, "config": stage1_record_config(config, fit_kwargs), "data": fingerprint}
    floors = {"mae": ("model.network.stage1_fit.max_mae", max_mae, "max"),
              "usage": ("model.network.stage1_fit.min_usage", min_usage, "min")}
    fix = ("fit it longer (model.network.stage1_fit.steps; the cache is then refitted) or relax the floor.")
    if path.is_file():
        try:
            stored = load_file(path, "Cached VQGAN stage 1")
            ok, reason = matches(stored.get("record") if isinstance(stored, dict) else None, expected)
        except Exception as err:  # noqa: BLE001 (an unreadable cache is rebuilt, not trusted)
            ok, reason = False, f"it is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        if ok:
            check_quality(stored["record"], path, floors, what="Cached VQGAN stage 1", fix=fix)
            return VQGAN.from_ckpt(path, config), None
        log.warning("Refitting the cached VQGAN stage 1 %s: %s.", path, reason)
    kwargs = dict(fit_kwargs)
    if callable(kwargs.get("val_frames")):
        kwargs["val_frames"] = kwargs["val_frames"]()
    log.info("Training a VQGAN stage 1 (cached at %s)", path)
    vqgan, report = fit_vqgan(config, frames_fn() if frames is None else frames, **kwargs)
    quality = {k: report[k] for k in ("mae", "usage", "perplexity", "rec", "restarted", "eval_split")}
    record = make_record(KIND, expected["config"], fingerprint, quality)
    save_vqgan(vqgan, path, record=record)
    log.info("VQGAN stage 1 written to %s in %.1f s: %s", path, report["seconds"], quality)
    check_quality(record, path, floors, what="Cached VQGAN stage 1", fix=fix)
    return vqgan, report
