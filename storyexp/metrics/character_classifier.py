"""A small multi-label character classifier, trained by the project itself.

Published character classifiers (StoryDALL-E's Inception-v3 for PororoSV / FlintstonesSV) cannot be downloaded
here, and the synthetic ``demo`` dataset has characters of its own, so the demo trains this small CNN on its
training frames and uses it

* to score generated frames (:class:`storyexp.metrics.CharacterScores`: character F1 and frame accuracy), and
* as the feature extractor of ``fid_demo`` (:class:`storyexp.metrics.DemoFID`). That number is *not* an FID in the
  Inception sense and must never be reported as one.

Input conventions (checked, with a clear error otherwise):

* ``torch.uint8`` tensors are images in **NHWC** layout ``[N, H, W, 3]`` with values in ``[0, 255]`` (the layout of
  ``Story`` records and of generated samples);
* floating tensors are images in **NCHW** layout ``[N, 3, H, W]`` with values in ``[0, 1]`` (torchmetrics'
  ``normalize=True`` convention).

Any other dtype or layout is refused. Images of any size are resized internally to ``input_size × input_size``
with antialiased bilinear interpolation (non-square frames are squashed, not cropped).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storyexp.metrics._io import as_label_tensor, as_uint8_nhwc
from storyexp.utils.io import atomic_write

__all__ = [
    "CharacterClassifier",
    "train_character_classifier",
    "save_classifier",
    "load_classifier",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "storyexp.character_classifier"
CHECKPOINT_VERSION = 1


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CharacterClassifier(nn.Module):
    """Small CNN: 2×2 patch stem -> conv stages -> global average + max pooling -> linear.

    Args:
        num_classes: number of characters ``C`` (multi-label: one logit per character).
        input_size: side of the square the input is resized to (antialiased bilinear).
        channels: channels of the stages. A 2×2 stride-2 "patch" conv maps the image to ``channels[0]`` at half
            resolution; stage 0 is one 3×3 conv, every further stage a stride-2 3×3 conv followed by a 3×3 conv
            (each BatchNorm + ReLU). The default ``(24, 48, 96)`` has about 160k parameters and sees a 32×32
            input as 16×16 -> 8×8 -> 4×4.
        class_names: optional names of the ``C`` characters, kept in the checkpoint.

    ``forward(x)`` returns logits ``[N, C]``; ``features(x)`` the penultimate features ``[N, num_features]``
    (concatenated global average and global max pooling of the last stage), which is the feature-extractor
    contract of torchmetrics' custom FID (``num_features`` is an ``int`` attribute).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        input_size: int = 32,
        channels: Sequence[int] = (24, 48, 96),
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        channels = [int(c) for c in channels]
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if input_size < 2 ** len(channels):
            raise ValueError(f"input_size {input_size} is too small for {len(channels)} stages")
        if class_names is not None:
            class_names = [str(n) for n in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"got {len(class_names)} class_names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.channels = channels
        self.class_names = class_names

        stem = nn.Sequential(
            nn.Conv2d(3, channels[0], kernel_size=2, stride=2, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(True)
        )
        stages: list[nn.Module] = [stem, _conv_bn_relu(channels[0], channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            stages.append(nn.Sequential(_conv_bn_relu(c_in, c_out, stride=2), _conv_bn_relu(c_out, c_out)))
        self.stages = nn.Sequential(*stages)
        self.num_features = 2 * channels[-1]
        self.head = nn.Linear(self.num_features, self.num_classes)

    # ------------------------------------------------------------------ config / io
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python types), enough to rebuild the network."""
        return {
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "channels": list(self.channels),
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Same as :func:`save_classifier` ``(self, path)``."""
        return save_classifier(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "CharacterClassifier":
        """Same as :func:`load_classifier`."""
        return load_classifier(path, map_location=map_location)

    # ------------------------------------------------------------------ forward
    def preprocess(self, x: Tensor | np.ndarray) -> Tensor:
        """Check the input convention, convert to float NCHW in [0, 1] and resize to ``input_size``."""
        param = next(self.parameters())
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, Tensor):
            raise TypeError(f"CharacterClassifier: expected a tensor, got {type(x).__name__}")
        if x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(
                    f"CharacterClassifier: uint8 input must be NHWC [N, H, W, 3], got shape {tuple(x.shape)}"
                )
            x = x.to(param.device).permute(0, 3, 1, 2).to(param.dtype).div_(255.0)
        elif x.is_floating_point():
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(
                    "CharacterClassifier: float input must be NCHW [N, 3, H, W] in [0, 1], "
                    f"got shape {tuple(x.shape)}"
                )
            if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1.0 + 1e-3):
                raise ValueError(
                    "CharacterClassifier: float input must have values in [0, 1] "
                    f"(got min {float(x.min()):.3g}, max {float(x.max()):.3g}); pass uint8 NHWC for [0, 255] images"
                )
            x = x.to(device=param.device, dtype=param.dtype)
        else:
            raise TypeError(
                f"CharacterClassifier: expected uint8 NHWC or float NCHW in [0, 1], got dtype {x.dtype}"
            )
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return x

    def _features_from_prepared(self, x: Tensor) -> Tensor:
        h = self.stages((x - 0.5) / 0.25)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def features(self, x: Tensor | np.ndarray) -> Tensor:
        """Penultimate features ``[N, num_features]``."""
        return self._features_from_prepared(self.preprocess(x))

    def forward(self, x: Tensor | np.ndarray) -> Tensor:
        """Logits ``[N, num_classes]`` (apply a sigmoid for per-character probabilities)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict_logits(self, frames: Tensor | np.ndarray, batch_size: int = 256) -> Tensor:
        """Logits for many frames, in eval mode and in batches (the module's train/eval mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            n = frames.shape[0]
            if n == 0:
                return torch.zeros(0, self.num_classes, device=next(self.parameters()).device)
            return torch.cat([self(frames[i : i + batch_size]) for i in range(0, n, batch_size)])
        finally:
            self.train(was_training)


# ---------------------------------------------------------------------- training


def _resize_uint8_nchw(frames: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """uint8 NHWC [N,H,W,3] -> uint8 NCHW [N,3,size,size] (antialiased bilinear), in chunks to bound memory."""
    out = torch.empty(frames.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, frames.shape[0], chunk):
        x = frames[i : i + chunk].permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _augment(x: Tensor, generator: torch.Generator, max_shift: int, hflip: bool) -> Tensor:
    """Random per-sample translation by up to ``max_shift`` px (edge-replicate padding) and horizontal flip."""
    b, _, h, w = x.shape
    if max_shift > 0:
        s = max_shift
        xp = F.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        iy = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # [B, h, 1]
        ix = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # [B, 1, w]
        x = xp[torch.arange(b)[:, None, None], :, iy, ix].permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def _evaluate(model: CharacterClassifier, frames: Tensor, labels: Tensor, batch_size: int) -> dict[str, float]:
    """Scores on original-size frames through the model's own preprocessing, exactly as at inference."""
    from storyexp.metrics.characters import CharacterScores

    # local scores: training may run on one process of a DDP job, where a cross-process sync would hang
    scores = CharacterScores(num_classes=model.num_classes, input_format="logits", sync_on_compute=False)
    scores.update(model.predict_logits(frames, batch_size=batch_size), labels)
    return {k: float(v) for k, v in scores.compute().items()}


def train_character_classifier(
    frames: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    val_frames: Tensor | np.ndarray | None = None,
    val_labels: Tensor | np.ndarray | None = None,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    max_shift: int = 2,
    hflip: bool = True,
    input_size: int = 32,
    channels: Sequence[int] = (24, 48, 96),
    class_names: Sequence[str] | None = None,
    weight_decay: float = 1e-4,
    num_threads: int | None = None,
) -> tuple[CharacterClassifier, dict[str, Any]]:
    """Train a :class:`CharacterClassifier` on single frames with multi-hot character labels.

    Args:
        frames: uint8 ``[N, H, W, 3]`` training frames (numpy or torch).
        labels: ``[N, C]`` multi-hot labels (0/1; any numeric or bool dtype).
        val_frames, val_labels: optional held-out set; when given, the weights of the epoch with the best
            validation frame accuracy are kept (StoryDALL-E's selection rule) and the scores are in the report.
        epochs, batch_size, lr: Adam (peak learning rate ``lr``, linear warm-up over the first 20% of the
            steps, then cosine decay), BCE-with-logits loss.
        seed: seeds initialisation, shuffling and augmentation; the global torch RNG is left untouched, and
            the same seed on the same machine and thread count gives the same weights.
        augment: random translation by up to ``max_shift`` pixels (at ``input_size`` resolution, edge padding)
            and, if ``hflip``, horizontal flips. Turn ``hflip`` off when a character's identity depends on its
            left/right orientation.
        input_size, channels, class_names: passed to :class:`CharacterClassifier`.
        weight_decay: Adam's (L2) weight decay.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` during training (restored afterwards).
            On a small CPU shared with other processes, 1 thread is often several times faster than 2, because
            OpenMP threads wait on each other when a core is taken away.

    Returns:
        ``(classifier, report)``: the classifier on CPU in eval mode, and a report with per-epoch
        ``train_loss`` (and ``val_frame_acc`` / ``val_char_f1``), ``best_epoch``, ``train_time_s``,
        ``num_params``, ``num_train_frames``.
    """
    x_train = as_uint8_nhwc(frames, "frames")
    y_train = as_label_tensor(labels, "labels")
    if x_train.shape[0] != y_train.shape[0]:
        raise ValueError(f"frames ({x_train.shape[0]}) and labels ({y_train.shape[0]}) differ in length")
    if x_train.shape[0] == 0:
        raise ValueError("train_character_classifier: no training frames")
    num_classes = y_train.shape[1]
    x_val_raw = y_val = None
    if val_frames is not None or val_labels is not None:
        if val_frames is None or val_labels is None:
            raise ValueError("give both val_frames and val_labels, or neither")
        x_val_raw = as_uint8_nhwc(val_frames, "val_frames")
        y_val = as_label_tensor(val_labels, "val_labels", num_classes=num_classes)
        if x_val_raw.shape[0] != y_val.shape[0]:
            raise ValueError(f"val_frames ({x_val_raw.shape[0]}) and val_labels ({y_val.shape[0]}) differ in length")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")

    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _train(
            x_train, y_train, x_val_raw, y_val,
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment, max_shift=max_shift,
            hflip=hflip, input_size=input_size, channels=channels, class_names=class_names,
            weight_decay=weight_decay,
        )  # fmt: skip
    finally:
        if num_threads is not None:
            torch.set_num_threads(threads_before)


def _train(
    x_train: Tensor,
    y_train: Tensor,
    x_val_raw: Tensor | None,
    y_val: Tensor | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    augment: bool,
    max_shift: int,
    hflip: bool,
    input_size: int,
    channels: Sequence[int],
    class_names: Sequence[str] | None,
    weight_decay: float,
) -> tuple[CharacterClassifier, dict[str, Any]]:
    num_classes = y_train.shape[1]
    has_val = x_val_raw is not None
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharacterClassifier(num_classes, input_size=input_size, channels=channels, class_names=class_names)
    # channels_last is faster for these small convs on CPU (oneDNN); converted back at the end.
    model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)

    # Resize the training frames once (kept as uint8 to bound memory; the rounding is far below the
    # augmentation's effect); the augmentation works on the small images. Validation frames go through the
    # model's own preprocessing, so the reported scores are exactly those of the returned classifier.
    x_small = _resize_uint8_nchw(x_train, input_size)

    n = x_small.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 5)

    def lr_factor(step: int) -> float:  # linear warm-up over 20% of the steps, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_fn = nn.BCEWithLogitsLoss()

    report: dict[str, Any] = {"train_loss": [], "val_frame_acc": [], "val_char_f1": []}
    best_state: dict[str, Tensor] | None = None
    best_acc = -1.0
    best_epoch = epochs - 1
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            xb = x_small[idx].float().div_(255.0)
            if augment:
                xb = _augment(xb, generator, max_shift=max_shift, hflip=hflip)
            xb = xb.contiguous(memory_format=torch.channels_last)
            logits = model.head(model._features_from_prepared(xb))
            loss = loss_fn(logits, y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        report["train_loss"].append(total / count)
        if has_val:
            scores = _evaluate(model, x_val_raw, y_val, batch_size=512)
            report["val_frame_acc"].append(scores["frame_acc"])
            report["val_char_f1"].append(scores["char_f1"])
            if scores["frame_acc"] > best_acc:
                best_acc = scores["frame_acc"]
                best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()
    report.update(
        best_epoch=best_epoch,
        epochs=epochs,
        seed=seed,
        num_params=sum(p.numel() for p in model.parameters()),
        num_train_frames=n,
        num_threads=torch.get_num_threads(),
        train_time_s=time.perf_counter() - start,
    )
    if has_val:
        report["best_val_frame_acc"] = report["val_frame_acc"][best_epoch]
        report["best_val_char_f1"] = report["val_char_f1"][best_epoch]
    else:
        del report["val_frame_acc"], report["val_char_f1"]
    return model, report


# ---------------------------------------------------------------------- save / load


def save_classifier(classifier: CharacterClassifier, path: str | os.PathLike) -> Path:
    """Write config + weights atomically.

    ``*.safetensors`` paths are written with safetensors (config in the metadata); any other suffix
    (conventionally ``.pt``) as a ``torch.save`` dict of plain types and tensors, loadable with
    ``torch.load(weights_only=True)``.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        import json

        from safetensors.torch import save_file

        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": str(CHECKPOINT_VERSION),
            "config": json.dumps(classifier.config),
        }
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": classifier.config,
        "state_dict": state,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CharacterClassifier:
    """Load a classifier written by :func:`save_classifier` (in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"character classifier checkpoint not found: {path}. It is not downloadable: train one with "
            "storyexp.metrics.train_character_classifier on the dataset's training frames and write it with "
            "storyexp.metrics.save_classifier."
        )
    try:
        if path.suffix == ".safetensors":
            import json

            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"metadata 'format' is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            config = json.loads(meta["config"])
            state = load_file(str(path), device=str(map_location))
        else:
            payload = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (missing or wrong 'format' field)")
            if int(payload.get("version", -1)) > CHECKPOINT_VERSION:
                raise ValueError(
                    f"checkpoint version {payload['version']} is newer than this code ({CHECKPOINT_VERSION})"
                )
            config, state = payload["config"], payload["state_dict"]
        model = CharacterClassifier(
            config["num_classes"],
            input_size=config["input_size"],
            channels=config["channels"],
            class_names=config.get("class_names"),
        )
        model.load_state_dict(state)
    except Exception as err:  # one message that names the file
        raise ValueError(f"cannot load character classifier from {path}: {err}") from err
    return model.to(map_location).eval()
