"""A small multi-label character classifier, trained by the project itself.

Published character classifiers (StoryDALL-E's Inception-v3 for PororoSV / FlintstonesSV) cannot be downloaded
here, and the synthetic ``demo`` dataset has characters of its own, so the demo trains this small CNN on its
training frames (through Lightning: :mod:`storyexp.metrics.classifier_system`, ``python launch.py
task=train_classifier``) and uses it

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

Files (:func:`save_classifier` / :func:`load_classifier`) hold the network's config, its weights and, for a cache,
the record of what produced it (:mod:`storyexp.utils.cache`: training settings, data fingerprint, quality). The
config's ``arch`` names the network: ``inception_v3`` (:class:`storyexp.metrics.inception_classifier.
InceptionCharacterClassifier`, StoryDALL-E's architecture); files without it (every file written before it existed)
are this small CNN.

:class:`CharacterClassifierBase` is the interface evaluation uses (``num_classes``, ``num_features``,
``class_names``, ``config``, ``published``, ``preprocess``, ``features``, ``forward``, ``predict_logits``); both
architectures implement it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storyexp.utils.io import atomic_write

__all__ = [
    "ARCHS",
    "CharacterClassifier",
    "CharacterClassifierBase",
    "save_classifier",
    "check_image_input",
    "classifier_from_config",
    "load_classifier",
    "load_classifier_with_record",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "storyexp.character_classifier"
CHECKPOINT_VERSION = 2  # 2: optional "record" (what produced the file); version-1 files load, without a record

# eval.classifier.arch values; the one a file's config names (no "arch": small_cnn)
ARCHS = ("small_cnn", "inception_v3")

HOW_TO_GET = ("It is not downloadable: train it on the dataset's training frames with "
              "`python launch.py task=train_classifier data=<dataset>`.")


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CharacterClassifierBase(nn.Module):
    """The interface every character classifier offers to evaluation (scores, ``fid_demo`` features, files).

    Subclasses set ``num_classes``, ``num_features`` (the size of ``features``), ``class_names`` and implement
    ``config`` (constructor arguments, with ``arch`` unless it is the small CNN), ``preprocess``, ``features`` and
    ``forward`` (logits ``[N, num_classes]``). ``published`` is True for a classifier read from a published
    checkpoint (`eval.classifier.checkpoint`), False for one the project trained.
    """

    arch: str = "small_cnn"
    num_classes: int
    num_features: int
    class_names: list[str] | None
    published: bool = False

    @property
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def preprocess(self, x: Tensor | np.ndarray) -> Tensor:
        raise NotImplementedError

    def features(self, x: Tensor | np.ndarray) -> Tensor:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Same as :func:`save_classifier` ``(self, path)``."""
        return save_classifier(self, path)

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


def check_image_input(x: Tensor | np.ndarray, device: torch.device, dtype: torch.dtype,
                      who: str = "CharacterClassifier", keep_uint8: bool = False) -> Tensor:
    """uint8 NHWC ``[N, H, W, 3]`` in [0, 255] or float NCHW ``[N, 3, H, W]`` in [0, 1] -> float NCHW in [0, 1] on
    ``device`` (clear errors otherwise); with ``keep_uint8``, uint8 input stays uint8 (NCHW)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{who}: uint8 input must be NHWC [N, H, W, 3], got shape {tuple(x.shape)}")
        x = x.to(device).permute(0, 3, 1, 2)
        return x if keep_uint8 else x.to(dtype).div_(255.0)
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{who}: float input must be NCHW [N, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1.0 + 1e-3):
            raise ValueError(
                f"{who}: float input must have values in [0, 1] "
                f"(got min {float(x.min()):.3g}, max {float(x.max()):.3g}); pass uint8 NHWC for [0, 255] images"
            )
        return x.to(device=device, dtype=dtype)
    raise TypeError(f"{who}: expected uint8 NHWC or float NCHW in [0, 1], got dtype {x.dtype}")


class CharacterClassifier(CharacterClassifierBase):
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

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CharacterClassifierBase:
        """Same as :func:`load_classifier`."""
        return load_classifier(path, map_location=map_location)

    # ------------------------------------------------------------------ forward
    def preprocess(self, x: Tensor | np.ndarray) -> Tensor:
        """Check the input convention, convert to float NCHW in [0, 1] and resize to ``input_size``."""
        param = next(self.parameters())
        x = check_image_input(x, param.device, param.dtype)
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


# ---------------------------------------------------------------------- save / load


def save_classifier(classifier: CharacterClassifierBase, path: str | os.PathLike,
                    record: dict[str, Any] | None = None) -> Path:
    """Write config + weights (+ ``record``, a :mod:`storyexp.utils.cache` record of plain types) atomically.

    ``*.safetensors`` paths are written with safetensors (config and record as JSON in the metadata); any other
    suffix (conventionally ``.pt``) as a ``torch.save`` dict of plain types and tensors, loadable with
    ``torch.load(weights_only=True)``.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": str(CHECKPOINT_VERSION),
            "config": json.dumps(classifier.config),
        }
        if record is not None:
            meta["record"] = json.dumps(record)
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": classifier.config,
        "state_dict": state,
    }
    if record is not None:
        payload["record"] = record
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def classifier_from_config(config: dict[str, Any]) -> CharacterClassifierBase:
    """A new classifier (random weights) from the ``config`` a file holds (``arch`` absent: the small CNN)."""
    arch = config.get("arch", "small_cnn")
    if arch == "small_cnn":
        return CharacterClassifier(
            config["num_classes"],
            input_size=config["input_size"],
            channels=config["channels"],
            class_names=config.get("class_names"),
        )
    if arch == "inception_v3":
        from storyexp.metrics.inception_classifier import InceptionCharacterClassifier

        return InceptionCharacterClassifier(
            config["num_classes"],
            width_divisor=config.get("width_divisor", 1),
            input_size=config.get("input_size", 299),
            class_names=config.get("class_names"),
        )
    raise ValueError(f"unknown classifier arch {arch!r} (known: {', '.join(ARCHS)})")


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CharacterClassifierBase:
    """Load a classifier written by :func:`save_classifier` (in eval mode; the arch its config names)."""
    return load_classifier_with_record(path, map_location=map_location)[0]


def load_classifier_with_record(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[CharacterClassifierBase, dict[str, Any] | None]:
    """``(classifier in eval mode, its record or None)``, read through the one safe loader
    (`storyexp.utils.loading.load_file`: ``weights_only=True`` / safetensors). A missing file is a
    `MissingResourceError` (a ``FileNotFoundError``), anything else wrong one ``ValueError`` naming the file."""
    from storyexp.utils.loading import check_state_dict, load_file

    path = Path(path)
    payload = load_file(path, "Character classifier", map_location=map_location, how_to_get=HOW_TO_GET)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"metadata 'format' is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            version = int(meta.get("version", -1))
            config, state = json.loads(meta["config"]), payload
            record = json.loads(meta["record"]) if "record" in meta else None
        else:
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                published = isinstance(payload, dict) and any(str(k).endswith("fc.weight") for k in
                                                              [*payload, *(payload.get("state_dict") or {})])
                hint = (" (it looks like a published Inception-v3 state dict: select it with "
                        "eval/classifier=inception_v3 eval.classifier.checkpoint=<file>)") if published else ""
                raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (missing or wrong 'format' field){hint}")
            version = int(payload.get("version", -1))
            config, state, record = payload["config"], payload["state_dict"], payload.get("record")
        if version > CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {version} is newer than this code ({CHECKPOINT_VERSION})")
        model = classifier_from_config(config)
        target = model.state_dict()
        check_state_dict(target, state, "the state dict", hint="the file is damaged or was written by other code")
        model.load_state_dict(state)
    except Exception as err:  # one message that names the file
        raise ValueError(f"cannot load character classifier from {path}: {err}") from err
    return model.to(map_location).eval(), record
