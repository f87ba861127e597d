"""Training a taming VQGAN (stage 1 of StoryDALL-E) from scratch: losses, dead-code restart, a plain fit loop,
and a cached export that `VQGAN.from_ckpt` loads.

Pretrained VQGANs cannot be downloaded here, so the demo builds its own small stage 1. The objective is
the VQ-VAE one (reconstruction + codebook + beta * commitment), without taming's perceptual and adversarial
terms: those need pretrained LPIPS weights and many more steps, and flat synthetic frames do not need them.
Codebooks trained from scratch collapse onto a few entries; codes unused for a while are re-initialised to
encoder outputs of the current batch (dead-code restart), which keeps the codebook in use.

Used two ways: `fit_vqgan` / `load_or_fit_vqgan` (a deterministic plain torch loop, e.g. for a system that
needs a stage 1 on first use), and `storyexp.systems.vqgan.VQGANSystem` (the same loss and restart inside
Lightning: `python launch.py model=vqgan_demo`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from storyexp.errors import ConfigurationError
from storyexp.models.vqgan import VQGAN, VQGANConfig
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
    "to_uint8",
    "to_unit",
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
    `storyexp.systems.arldm.resize_uint8`), in chunks to bound memory. Map to [-1, 1] with `to_unit`."""
    from storyexp.systems.arldm import resize_uint8  # lazy: keeps AR-LDM's imports off this module's path

    x = torch.as_tensor(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    if len(x) == 0:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    x = x.cpu()
    return torch.cat([resize_uint8(x[i : i + chunk], image_size) for i in range(0, len(x), chunk)])


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [.., 3, R, R] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output [N, 3, R, R] in [-1, 1] (unclamped) -> uint8 [N, R, R, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def reconstruct(vqgan: VQGAN, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> reconstructed uint8 [N, R, R, 3] (encode, quantise, decode)."""
    device = next(vqgan.parameters()).device
    outs = [to_uint8(vqgan(to_unit(inputs[i : i + batch_size].to(device)))).cpu()
            for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, *inputs.shape[2:], 3, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------- fit


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
) -> tuple[VQGAN, dict[str, Any]]:
    """Train a VQGAN from scratch on uint8 frames [N, H, W, 3]; returns (model in eval mode, report).

    Deterministic for a given seed (model init from ``seed`` inside a forked RNG, batches from a private
    generator; the global RNGs are left alone). Frames are resized once to ``image_size`` (default and only
    allowed value: ``config.hparams.resolution``, so the code grid is ``latent_dim`` x ``latent_dim``) and
    mapped to [-1, 1]; no augmentation. Adam with taming's betas (0.5, 0.9); ``lr_schedule`` ``cosine``
    (to 0 over ``steps``) or ``constant``. Every ``restart_every`` steps, codes unused over the last
    ``restart_every`` steps are restarted (0 disables it).

    Report: ``rec`` (mean over the last ``log_every`` steps), ``loss``, ``codebook``, ``history`` (the
    step's losses every ``log_every`` steps), ``usage`` /
    ``perplexity`` (codebook use over the training frames, or ``val_frames`` when given), ``steps``,
    ``seconds``, ``restarted`` (codes restarted in all), and with ``val_frames``: ``val_mae`` (mean absolute
    per-pixel error of the reconstructions on the [0, 255] scale, at ``image_size``) and ``val_rec``.
    """
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

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vqgan = VQGAN(config)
    vqgan.to(device).train()
    optimizer = torch.optim.Adam(vqgan.parameters(), lr=lr, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if lr_schedule == "cosine" else (lambda s: 1.0)
    )
    gen = torch.Generator().manual_seed(seed)
    restart_gen = torch.Generator(device=device).manual_seed(seed + 1)
    usage = CodeUsage(config.n_embed)
    order, pos = torch.randperm(len(data), generator=gen), 0
    recent: list[dict[str, float]] = []
    history: list[dict[str, float]] = []
    restarted, start = 0, time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > len(order):  # a new pass over the data; batches never straddle two passes
            order, pos = torch.randperm(len(data), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        images = to_unit(data[idx].to(device))
        out = vqgan_losses(vqgan, images, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        scheduler.step()
        usage.update(out["codes"], step)
        if restart_every and step % restart_every == 0 and step < steps:
            restarted += restart_dead_codes(vqgan, usage, out["z"], step, restart_every, generator=restart_gen)
        recent = (recent + [{k: out[k].item() for k in ("loss", "rec", "codebook")}])[-max(log_every, 1):]
        if log_every and step % log_every == 0:
            history.append({"step": step, **recent[-1]})
            log.info("vqgan step %d/%d: loss %.4f rec %.4f codebook %.4f alive %.3f", step, steps,
                     recent[-1]["loss"], recent[-1]["rec"], recent[-1]["codebook"],
                     usage.fraction_alive(step, max(restart_every, 1)))

    vqgan.eval()
    report: dict[str, Any] = {k: float(np.mean([r[k] for r in recent])) for k in ("loss", "rec", "codebook")}
    report.update(steps=steps, seconds=time.perf_counter() - start, restarted=restarted, history=history)
    eval_data = data if val_frames is None else frames_to_inputs(val_frames, image_size)
    codes, abs_err, recs = [], 0.0, []
    with torch.no_grad():
        for i in range(0, len(eval_data), 256):
            chunk = eval_data[i : i + 256].to(device)
            out = vqgan_losses(vqgan, to_unit(chunk), beta=beta)
            codes.append(out["codes"].cpu())
            recs.append(float(out["rec"]) * len(chunk))
            abs_err += float((to_uint8(out["reconstruction"]).float() - chunk.permute(0, 2, 3, 1).float()).abs().sum())
    report.update(codebook_usage(torch.cat(codes), config.n_embed))
    if val_frames is not None:
        report["val_rec"] = sum(recs) / len(eval_data)
        report["val_mae"] = abs_err / eval_data.numel()
    return vqgan, report


# ------------------------------------------------------------------------------------------ save / load


def save_vqgan(vqgan: VQGAN, path: str | os.PathLike) -> Path:
    """Write ``{"state_dict", "stage1_config"}`` atomically; `VQGAN.from_ckpt(path, config)` loads it."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().clone() for k, v in vqgan.state_dict().items()}
    torch.save({"state_dict": state, "stage1_config": vqgan.config.to_dict()}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_or_fit_vqgan(
    path: str | os.PathLike,
    config: VQGANConfig,
    frames_fn: Callable[[], torch.Tensor | np.ndarray],
    **fit_kwargs: Any,
) -> tuple[VQGAN, dict[str, Any] | None]:
    """The cached stage 1 at ``path`` when it was trained with ``config``; otherwise train one with
    `fit_vqgan(config, frames_fn(), **fit_kwargs)` (a ``val_frames`` entry may be a callable too, read only
    then) and cache it. ``frames_fn`` is only called when fitting. Returns (VQGAN in eval mode, fit report or
    None when loaded). An unreadable cache or one trained with another config is replaced, with a log line.

    Only the network config is compared, not the fit settings: change ``path`` to retrain with other steps.
    """
    path = Path(path)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            cached = stored.get("stage1_config")
            if cached is not None and VQGANConfig.from_dict(cached) == config:
                return VQGAN.from_ckpt(path, config), None
            log.warning("Cached VQGAN %s was trained with another config (%s); training a new one", path, cached)
        except Exception as err:  # an unreadable cache is rebuilt, not trusted
            log.warning("Ignoring unreadable cached VQGAN %s (%s); training a new one", path, err)
    kwargs = dict(fit_kwargs)
    if callable(kwargs.get("val_frames")):
        kwargs["val_frames"] = kwargs["val_frames"]()
    log.info("Training a VQGAN stage 1 (cached at %s)", path)
    vqgan, report = fit_vqgan(config, frames_fn(), **kwargs)
    save_vqgan(vqgan, path)
    return vqgan, report
