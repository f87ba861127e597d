"""StoryDALL-E's character classifier: a multi-label torchvision Inception-v3, and its published checkpoints.

The network is torchvision's ``inception_v3`` (``aux_logits=True``) with ``fc`` and ``AuxLogits.fc`` replaced by
``nn.Linear(in_features, num_classes)``, one logit per character (PororoSV 9, FlintstonesSV 7;
``reference/storydalle.md`` §6). Evaluation follows ``story-dalle/eval_char_clf.py``:

* input: the frame through ``Resize(299) + CenterCrop(299)`` (torchvision's transforms, bilinear with antialias),
  then ImageNet mean / std;
* ``transform_input=False``: the eval script builds ``models.inception_v3(pretrained=False)``, which leaves it off.
  The original *training* used ``pretrained=True``, which turns it on, so the published classifiers saw differently
  scaled inputs in training than in evaluation. That mismatch is the original's; we evaluate as it evaluated (and
  train with it off, so our own classifiers are consistent);
* eval mode returns the main logits only; a character is present when ``sigmoid(logit) > 0.5`` (the original's
  ``round``, see :class:`storyexp.metrics.CharacterScores`).

Published checkpoints are plain ``state_dict`` files of that torchvision model (``torch.save(model.state_dict())``);
``module.``-prefixed keys (DataParallel) and a dict wrapping them under ``state_dict`` are accepted too
(:func:`load_published_classifier`). They carry no record: ``eval.classifier.checkpoint`` selects one.

Width: ``width_divisor`` k divides every channel count of the network (torchvision's own blocks, given a
``conv_block`` that divides its channels), so tests can write tiny checkpoints in the published layout; k = 1 is
torchvision's standard ``inception_v3``. The channel counts of Inception-v3 are all divisible by 1, 2, 4, 8 and 16
(not 32: the 80-channel stem conv). A checkpoint's k is read from ``Conv2d_1a_3x3`` (32 / its output channels).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import inception as tv_inception
from torchvision.transforms.v2 import functional as TF

from storyexp.errors import ConfigurationError
from storyexp.metrics.character_classifier import CharacterClassifierBase, check_image_input

__all__ = [
    "ARCH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WIDTH_DIVISORS",
    "InceptionCharacterClassifier",
    "build_inception_v3",
    "load_imagenet_weights",
    "load_published_classifier",
    "published_source",
    "published_state_dict",
]

ARCH = "inception_v3"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WIDTH_DIVISORS = (1, 2, 4, 8, 16)
STEM_CHANNELS = 32  # Conv2d_1a_3x3's output channels at full width
POOL_FEATURES = 2048  # fc.in_features at full width
AUX_FEATURES = 768  # AuxLogits.fc.in_features at full width

PUBLISHED = {
    "pororo": ("StoryDALL-E's PororoSV classifier is published in the StoryViz README (Google Drive id "
               "1xK6JOgQn_INQ3mBrA338BC2KoeM0TagR)"),
    "flintstones": ("StoryDALL-E did not release its FlintstonesSV classifier; one is published by StoryGPT-V at "
                    "storygpt-v.s3.amazonaws.com/checkpoints/flintstones/eval/classifier_char.pt"),
}


def published_source(dataset: str | None) -> str:
    """Where a dataset's published classifier can be downloaded, and how to train one instead (one sentence)."""
    train = (f"train one with `python launch.py task=train_classifier data={dataset or '<name>'} "
             "eval/classifier=inception_v3`.")
    where = PUBLISHED.get(str(dataset))
    if where is None:
        return f"StoryDALL-E publishes classifiers only for PororoSV and FlintstonesSV; {train}"
    return f"{where}; download it, or {train}"


# ------------------------------------------------------------------------------------------------ network


def _divided_conv_block(divisor: int):
    """torchvision's ``BasicConv2d`` with every channel count divided by ``divisor`` (the 3 image channels kept)."""

    def conv_block(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        for c in (in_channels, out_channels):
            if c != 3 and c % divisor:
                raise ValueError(f"width_divisor {divisor} does not divide Inception-v3's {c} channels "
                                 f"(use one of {WIDTH_DIVISORS})")
        c_in = in_channels if in_channels == 3 else in_channels // divisor
        return tv_inception.BasicConv2d(c_in, out_channels // divisor, **kwargs)

    return conv_block


def build_inception_v3(num_classes: int, *, width_divisor: int = 1, init_weights: bool = False
                       ) -> tv_inception.Inception3:
    """torchvision's Inception-v3 (``aux_logits=True``, ``transform_input=False``) with ``fc`` and
    ``AuxLogits.fc`` replaced by ``nn.Linear(in_features, num_classes)``, every channel count divided by
    ``width_divisor`` (1: torchvision's standard layout and key names).

    ``init_weights``: torchvision's Inception initialisation (truncated normal) of the convolutions, for training
    from scratch; False leaves PyTorch's default (the weights are loaded from a file anyway). The two replaced
    linear layers always have ``nn.Linear``'s default initialisation, as in the original (replaced after loading).
    """
    k = int(width_divisor)
    if k not in WIDTH_DIVISORS:
        raise ValueError(f"width_divisor must be one of {WIDTH_DIVISORS}, got {width_divisor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    blocks = None  # torchvision's own defaults: exactly the standard network
    if k != 1:
        conv = _divided_conv_block(k)
        blocks = [conv] + [partial(block, conv_block=conv) for block in (
            tv_inception.InceptionA, tv_inception.InceptionB, tv_inception.InceptionC, tv_inception.InceptionD,
            tv_inception.InceptionE, tv_inception.InceptionAux)]
    net = tv_inception.Inception3(num_classes=num_classes, aux_logits=True, transform_input=False,
                                  inception_blocks=blocks, init_weights=bool(init_weights))
    net.fc = nn.Linear(POOL_FEATURES // k, num_classes)
    net.AuxLogits.fc = nn.Linear(AUX_FEATURES // k, num_classes)
    return net


class InceptionCharacterClassifier(CharacterClassifierBase):
    """StoryDALL-E's multi-label Inception-v3 character classifier (see the module docstring).

    Args:
        num_classes: number of characters ``C``.
        width_divisor: divides every channel count (1: the published network; 8 or 16: tiny, for tests).
        input_size: side of the centre crop the network sees (299, the published protocol).
        class_names: optional names of the ``C`` characters, kept in the project's files.
        init_weights: torchvision's Inception initialisation (for training from scratch).

    The interface is that of :class:`storyexp.metrics.CharacterClassifier`: ``preprocess`` (uint8 NHWC or float
    NCHW in [0, 1] -> the normalised 299 crop), ``forward`` (main logits ``[N, C]``, in train mode too),
    ``features`` (the pooled ``[N, 2048 / width_divisor]`` features ``fc`` reads), ``predict_logits``. The
    torchvision network is ``self.net``; its ``state_dict`` has the published key names.
    """

    arch = ARCH

    def __init__(self, num_classes: int, *, width_divisor: int = 1, input_size: int = 299,
                 class_names: Sequence[str] | None = None, init_weights: bool = False) -> None:
        super().__init__()
        if int(input_size) < 75:  # the smallest input Inception-v3's stem and reductions accept
            raise ValueError(f"input_size must be >= 75, got {input_size}")
        if class_names is not None:
            class_names = [str(n) for n in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"got {len(class_names)} class_names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.width_divisor = int(width_divisor)
        self.input_size = int(input_size)
        self.class_names = class_names
        self.net = build_inception_v3(self.num_classes, width_divisor=self.width_divisor, init_weights=init_weights)
        self.num_features = POOL_FEATURES // self.width_divisor
        self.published = False

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python types), with ``arch``: what the project's files record."""
        return {
            "arch": ARCH,
            "num_classes": self.num_classes,
            "width_divisor": self.width_divisor,
            "input_size": self.input_size,
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    # ------------------------------------------------------------------ transforms
    def normalize(self, x: Tensor) -> Tensor:
        """ImageNet mean / std of float NCHW images in [0, 1]."""
        return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))

    def preprocess(self, x: Tensor | np.ndarray) -> Tensor:
        """``Resize(input_size) + CenterCrop(input_size)`` and ImageNet normalisation, float NCHW on the network's
        device. uint8 frames are resized as uint8 (torchvision's antialiased bilinear; within one grey level of
        ``Resize`` on PIL images, on a fraction of a percent of the pixels), float ones as float."""
        param = next(self.parameters())
        x = check_image_input(x, param.device, param.dtype, "InceptionCharacterClassifier", keep_uint8=True)
        x = TF.center_crop(TF.resize(x, [self.input_size], antialias=True), [self.input_size, self.input_size])
        if x.dtype == torch.uint8:
            x = TF.to_dtype(x, param.dtype, scale=True)
        return self.normalize(x.to(param.dtype))

    # ------------------------------------------------------------------ forward
    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(logits, aux_logits)`` of a preprocessed batch; ``aux_logits`` only in train mode (torchvision)."""
        out = self.net(x)
        if isinstance(out, tv_inception.InceptionOutputs):
            return out.logits, out.aux_logits
        return out, None

    def features(self, x: Tensor | np.ndarray) -> Tensor:
        """Pooled features ``[N, num_features]`` (the input of ``fc``, before dropout)."""
        captured: list[Tensor] = []
        # torchvision's forward, read at its avgpool: no second copy of the network's sequence here
        handle = self.net.avgpool.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.net(self.preprocess(x))
        finally:
            handle.remove()
        return torch.flatten(captured[0], 1)

    def forward(self, x: Tensor | np.ndarray) -> Tensor:
        """Main logits ``[N, num_classes]`` (apply a sigmoid for per-character probabilities)."""
        return self.outputs(self.preprocess(x))[0]


# ------------------------------------------------------------------------------------------------ files


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state)
    if keys and all(str(k).startswith("module.") for k in keys):  # saved from a DataParallel model
        return {str(k)[len("module."):]: v for k, v in state.items()}
    return dict(state)


def published_state_dict(payload: Any, what: str) -> dict[str, Tensor]:
    """The torchvision state dict inside a loaded published file (plain, ``module.``-prefixed, or wrapped under
    ``state_dict``); one `ConfigurationError` line naming ``what`` when it is none of these."""
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload or \
            not all(isinstance(v, Tensor) for v in payload.values()):
        raise ConfigurationError(
            f"{what} is not a state dict of tensors (torch.save(model.state_dict())); pass the published "
            "torchvision Inception-v3 classifier file.")
    return _strip_module(payload)


def _is_batch_count(key: str) -> bool:
    # files from torch < 0.4.1 have no BatchNorm counters; they do not change evaluation
    return key.endswith("num_batches_tracked")


def load_published_classifier(path: str | os.PathLike, *, num_classes: int | None = None,
                              class_names: Sequence[str] | None = None, dataset: str | None = None,
                              map_location: str | torch.device = "cpu") -> InceptionCharacterClassifier:
    """A published Inception-v3 character classifier (``published=True``, eval mode).

    Read only through `storyexp.utils.loading.load_file` and checked by `check_state_dict`. ``num_classes`` (or
    ``len(class_names)``) is the dataset's character count; the file's (``fc.weight``) must equal it. The width is
    inferred from ``Conv2d_1a_3x3``. ``dataset`` names where a missing file is published. Every failure is one
    line naming the file: `MissingResourceError` (missing, with where to get it), `CheckpointMismatchError`
    (keys / shapes), `ConfigurationError` (not a state dict, class count).
    """
    from storyexp.utils.loading import check_state_dict, load_file

    path = Path(path)
    what = f"Character classifier checkpoint {path}"
    payload = load_file(path, "Character classifier checkpoint (eval.classifier.checkpoint)",
                        map_location="cpu", how_to_get=published_source(dataset))
    state = published_state_dict(payload, what)
    hint = "pass a torchvision inception_v3 state dict with fc / AuxLogits.fc replaced (the published layout)"
    fc, stem = state.get("fc.weight"), state.get("Conv2d_1a_3x3.conv.weight")
    if fc is None or stem is None or fc.ndim != 2 or stem.ndim != 4 or stem.shape[0] == 0 or \
            STEM_CHANNELS % stem.shape[0] or STEM_CHANNELS // stem.shape[0] not in WIDTH_DIVISORS:
        with torch.device("meta"):  # shapes only: the error lists what the published layout expects
            target = build_inception_v3(num_classes or (len(class_names) if class_names else 1)).state_dict()
        check_state_dict(target, state, what, ignore_missing=_is_batch_count, hint=hint)
        raise ConfigurationError(f"{what} has an Inception-v3 stem of {tuple(stem.shape)} channels; {hint}.")
    file_classes = int(fc.shape[0])
    wanted = num_classes if num_classes is not None else (len(class_names) if class_names is not None else None)
    if wanted is not None and file_classes != int(wanted):
        names = f" ({', '.join(class_names)})" if class_names else ""
        raise ConfigurationError(
            f"{what} classifies {file_classes} characters but the dataset{f' {dataset}' if dataset else ''} has "
            f"{wanted}{names}; use the classifier published for this dataset.")
    model = InceptionCharacterClassifier(file_classes, width_divisor=STEM_CHANNELS // int(stem.shape[0]),
                                         class_names=class_names)
    check_state_dict(model.net.state_dict(), state, what, ignore_missing=_is_batch_count, hint=hint)
    model.net.load_state_dict(state, strict=False)  # strict above, apart from missing BatchNorm counters
    model.published = True
    return model.to(map_location).eval()


def load_imagenet_weights(classifier: InceptionCharacterClassifier, path: str | os.PathLike) -> None:
    """Initialise ``classifier`` from a local torchvision ImageNet ``inception_v3`` state dict (the original's
    ``pretrained=True``), all but ``fc`` and ``AuxLogits.fc`` (which keep their fresh initialisation)."""
    from storyexp.utils.loading import check_state_dict, load_file

    path = Path(path)
    what = f"ImageNet Inception-v3 weights {path} (eval.classifier.init_weights)"
    payload = load_file(
        path, "ImageNet Inception-v3 weights (eval.classifier.init_weights)",
        how_to_get=("torchvision publishes them as Inception_V3_Weights.IMAGENET1K_V1 "
                    f"({tv_inception.Inception_V3_Weights.IMAGENET1K_V1.url}); download it, or set "
                    "eval.classifier.init_weights=null for a random initialisation."))
    heads = ("fc.", "AuxLogits.fc.")
    state = {k: v for k, v in published_state_dict(payload, what).items() if not k.startswith(heads)}
    target = {k: v for k, v in classifier.net.state_dict().items() if not k.startswith(heads)}
    check_state_dict(target, state, what, ignore_missing=_is_batch_count,
                     hint=f"pass torchvision's inception_v3 ImageNet state dict (width_divisor "
                          f"{classifier.width_divisor} needs a network of that width)")
    classifier.net.load_state_dict(state, strict=False)  # the heads are left out on purpose
