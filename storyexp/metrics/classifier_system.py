"""Training the character classifiers through Lightning: the systems and their driver.

``train_character_classifier(frames, labels, arch=...)`` trains either architecture and keeps the weights of the
epoch with the best validation frame accuracy (StoryDALL-E's selection rule; Lightning's `ModelCheckpoint` on
``val/frame_acc``, the first best epoch on ties). Validation frames go through the classifier's own
preprocessing, so the validation scores are exactly those of the returned classifier at inference.

``arch="small_cnn"`` (`CharacterClassifierSystem`, the project's small CNN, at the demo's size):

* multi-label BCE-with-logits on single frames with multi-hot character labels;
* Adam (peak learning rate ``lr``, L2 ``weight_decay``), linear warm-up over the first 20% of the training
  steps, then cosine decay to 0 (the learning rate is updated after every batch);
* augmentation at ``input_size`` resolution: a random per-frame translation by up to ``max_shift`` pixels
  (edge-replicate padding) and, with ``hflip``, horizontal flips;
* training frames are resized once to ``input_size`` (kept as uint8 to bound memory; the rounding is far below
  the augmentation's effect).

``arch="inception_v3"`` (`InceptionClassifierSystem`, StoryDALL-E's classifier; ``reference/storydalle.md`` §6.2):

* BCE-with-logits on the main logits + ``aux_weight`` (0.4) x BCE-with-logits on the auxiliary logits;
* Adam at a constant ``lr`` (the original has no schedule), optionally from local ImageNet weights
  (``init_weights``; the original's ``pretrained=True``), else torchvision's random initialisation;
* train transform ``Resize(input_size)`` (shorter side, no crop) + random horizontal flip + ImageNet
  normalisation, per batch on the training device; validation ``Resize + CenterCrop`` (the classifier's own).

Deterministic: the weights are initialised from ``seed`` in a forked RNG, and the shuffling and augmentation draw
from one private generator seeded with ``seed`` (Inception's dropout draws from the global RNG, seeded with
``seed`` in a forked RNG during training), so the same seed on the same machine and thread count gives the same
weights. Training runs on a `lightning.Trainer` (`storyexp.utils.cache.single_device_trainer`: one device, no
logger, best-epoch checkpoints in a temporary folder only).
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from storyexp.metrics._io import as_label_tensor, as_uint8_nhwc
from storyexp.metrics.character_classifier import ARCHS, CharacterClassifier, CharacterClassifierBase
from storyexp.metrics.characters import CharacterScores
from storyexp.utils.cache import quiet_lightning, single_device_trainer

__all__ = [
    "CharacterClassifierSystem",
    "InceptionClassifierSystem",
    "train_character_classifier",
    "train_inception_classifier",
    "train_small_cnn_classifier",
]

MONITOR = "val/frame_acc"


# ------------------------------------------------------------------------------------------------ data


def _resize_uint8_nchw(frames: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """uint8 NHWC [N,H,W,3] -> uint8 NCHW [N,3,size,size] (antialiased bilinear), in chunks to bound memory."""
    out = torch.empty(frames.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, frames.shape[0], chunk):
        x = frames[i : i + chunk].permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def augment(x: Tensor, generator: torch.Generator, max_shift: int, hflip: bool) -> Tensor:
    """Random per-sample translation by up to ``max_shift`` px (edge-replicate padding) and horizontal flip.

    ``x`` [B, C, h, w] float (any device); the random draws come from ``generator`` (a CPU generator).
    """
    b, _, h, w = x.shape
    if max_shift > 0:
        s = max_shift
        xp = F.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        iy = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].to(x.device)  # [B, h, 1]
        ix = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].to(x.device)  # [B, 1, w]
        rows = torch.arange(b, device=x.device)[:, None, None]
        x = xp[rows, :, iy, ix].permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class _Batches(Dataset):
    """``dataset[index_tensor]`` -> ``(x[index], y[index])``: whole batches, no per-item collation."""

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[idx], self.y[idx]


class _Shuffled(Sampler):
    """Index batches of a new permutation every epoch (the last batch may be smaller), drawn from ``generator``."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = int(n), int(batch_size), generator

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size]


class _InOrder(Sampler):
    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = int(n), int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        for i in range(0, self.n, self.batch_size):
            yield torch.arange(i, min(i + self.batch_size, self.n))


# ---------------------------------------------------------------------------------------------- systems


class _ScoredSystem(L.LightningModule):
    """What both classifier systems share: the per-epoch loss, the validation scores and ``history``."""

    classifier: CharacterClassifierBase
    generator: torch.Generator

    def _init_scores(self, num_classes: int) -> None:
        # local scores: training may run on one process of a DDP job, where a cross-process sync would hang
        self.val_scores = CharacterScores(num_classes, input_format="logits", sync_on_compute=False)
        self.history: dict[str, list[float]] = {"train_loss": [], "val_frame_acc": [], "val_char_f1": []}
        self._loss_sum, self._loss_count = 0.0, 0

    def train_inputs(self, frames: Tensor) -> Tensor:
        """The training frames as the train loader holds them (uint8 NHWC at their stored size by default)."""
        return frames

    def _log_loss(self, loss: Tensor, n: int) -> None:
        self._loss_sum += float(loss.detach()) * n
        self._loss_count += n
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_epoch_end(self) -> None:
        self.history["train_loss"].append(self._loss_sum / max(self._loss_count, 1))

    def on_validation_epoch_start(self) -> None:
        self.val_scores.reset()

    def validation_step(self, batch, batch_idx):
        frames, labels = batch
        self.val_scores.update(self.classifier(frames), labels)

    def on_validation_epoch_end(self) -> None:
        scores = {k: float(v) for k, v in self.val_scores.compute().items()}
        self.val_scores.reset()
        self.history["val_frame_acc"].append(scores["frame_acc"])
        self.history["val_char_f1"].append(scores["char_f1"])
        self.log(MONITOR, scores["frame_acc"], batch_size=1)
        self.log("val/char_f1", scores["char_f1"], batch_size=1)


class CharacterClassifierSystem(_ScoredSystem):
    """Trains a :class:`CharacterClassifier` (see the module docstring for the objective and schedule).

    Batches: training ``(x, y)`` with ``x`` uint8 [B, 3, input_size, input_size] (pre-resized frames) and ``y``
    [B, C] multi-hot; validation ``(frames, labels)`` with frames uint8 [B, H, W, 3] at their stored size.
    Logs ``train/loss`` (per epoch), ``val/frame_acc`` and ``val/char_f1``; ``history`` keeps the per-epoch
    ``train_loss``, ``val_frame_acc`` and ``val_char_f1`` for the training report.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        input_size: int = 32,
        channels: Sequence[int] = (24, 48, 96),
        class_names: Sequence[str] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        max_shift: int = 2,
        hflip: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters({
            "num_classes": int(num_classes), "input_size": int(input_size), "channels": [int(c) for c in channels],
            "class_names": None if class_names is None else [str(c) for c in class_names], "lr": float(lr),
            "weight_decay": float(weight_decay), "augment": bool(augment), "max_shift": int(max_shift),
            "hflip": bool(hflip), "seed": int(seed),
        }, logger=False)  # kept in the checkpoint; a run's logger holds the composed config only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            classifier = CharacterClassifier(num_classes, input_size=input_size, channels=channels,
                                             class_names=class_names)
        # channels_last is faster for these small convs on CPU (oneDNN); `classifier()` converts back.
        self.classifier = classifier.to(memory_format=torch.channels_last)
        # shuffling (the train sampler is given this generator) and augmentation draw from it, in that order
        self.generator = torch.Generator().manual_seed(int(seed))
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._init_scores(num_classes)

    def trained_classifier(self) -> CharacterClassifier:
        """The network on CPU, contiguous memory format, eval mode."""
        return self.classifier.to(memory_format=torch.contiguous_format).cpu().eval()

    def train_inputs(self, frames: Tensor) -> Tensor:
        return _resize_uint8_nchw(frames, self.hparams.input_size)

    # ------------------------------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        hp = self.hparams
        xb = x.float().div_(255.0)
        if hp.augment:
            xb = augment(xb, self.generator, max_shift=hp.max_shift, hflip=hp.hflip)
        xb = xb.contiguous(memory_format=torch.channels_last)
        logits = self.classifier.head(self.classifier._features_from_prepared(xb))
        loss = self.loss_fn(logits, y)
        self._log_loss(loss, int(y.shape[0]))
        return loss

    # ------------------------------------------------------------------------------------ optimizers

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.classifier.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(1, total_steps // 5)

        def lr_factor(step: int) -> float:  # linear warm-up over 20% of the steps, then cosine decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class InceptionClassifierSystem(_ScoredSystem):
    """Trains an :class:`~storyexp.metrics.inception_classifier.InceptionCharacterClassifier` with StoryDALL-E's
    recipe (see the module docstring).

    Batches: training ``(frames, y)`` and validation ``(frames, labels)``, frames uint8 [B, H, W, 3] at their
    stored size (resized per batch: 299-pixel copies of a whole training split would not fit in memory).
    ``init_weights``: a local torchvision ImageNet ``inception_v3`` state dict, or None for torchvision's random
    initialisation. Logs and ``history`` as :class:`CharacterClassifierSystem`.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        width_divisor: int = 1,
        input_size: int = 299,
        class_names: Sequence[str] | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        hflip: bool = True,
        aux_weight: float = 0.4,
        init_weights: str | None = None,
        seed: int = 0,
    ):
        from storyexp.metrics.inception_classifier import InceptionCharacterClassifier, load_imagenet_weights

        super().__init__()
        if int(input_size) < 299:  # Inception's auxiliary head needs a 17x17 map at Mixed_6e
            raise ValueError(f"Inception-v3 trains on inputs of 299 px or more (its auxiliary head), got {input_size}")
        self.save_hyperparameters({
            "num_classes": int(num_classes), "width_divisor": int(width_divisor), "input_size": int(input_size),
            "class_names": None if class_names is None else [str(c) for c in class_names], "lr": float(lr),
            "weight_decay": float(weight_decay), "hflip": bool(hflip), "aux_weight": float(aux_weight),
            "init_weights": None if init_weights is None else str(init_weights), "seed": int(seed),
        }, logger=False)  # kept in the checkpoint; a run's logger holds the composed config only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            classifier = InceptionCharacterClassifier(num_classes, width_divisor=width_divisor,
                                                      input_size=input_size, class_names=class_names,
                                                      init_weights=init_weights is None)
        if init_weights is not None:
            load_imagenet_weights(classifier, init_weights)
        self.classifier = classifier
        self.generator = torch.Generator().manual_seed(int(seed))  # shuffling, then the flips
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._init_scores(num_classes)

    def trained_classifier(self):
        """The network on CPU, eval mode."""
        return self.classifier.cpu().eval()

    def train_transform(self, frames: Tensor) -> Tensor:
        """uint8 [B, H, W, 3] -> ``Resize(input_size)`` (uint8, antialiased bilinear), random horizontal flip
        (``hflip``, drawn from the system's generator), ImageNet normalisation: float NCHW."""
        from torchvision.transforms.v2 import functional as TF

        x = frames.permute(0, 3, 1, 2)
        x = TF.to_dtype(TF.resize(x, [self.hparams.input_size], antialias=True), torch.float32, scale=True)
        if self.hparams.hflip:
            x = augment(x, self.generator, max_shift=0, hflip=True)
        return self.classifier.normalize(x)

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``{"loss", "main", "aux"}`` of a transformed batch in train mode: main + ``aux_weight`` x aux."""
        logits, aux = self.classifier.outputs(x)
        if aux is None:
            raise RuntimeError("InceptionClassifierSystem.losses needs the network in train mode (aux logits)")
        main, aux_loss = self.loss_fn(logits, y), self.loss_fn(aux, y)
        return {"loss": main + self.hparams.aux_weight * aux_loss, "main": main, "aux": aux_loss}

    def training_step(self, batch, batch_idx):
        frames, y = batch
        loss = self.losses(self.train_transform(frames), y)["loss"]
        self._log_loss(loss, int(y.shape[0]))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.Adam(self.classifier.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


# ---------------------------------------------------------------------------------------------- driver


def _check_data(frames, labels, val_frames, val_labels, epochs: int, batch_size: int, lr: float):
    x_train = as_uint8_nhwc(frames, "frames")
    y_train = as_label_tensor(labels, "labels")
    if x_train.shape[0] != y_train.shape[0]:
        raise ValueError(f"frames ({x_train.shape[0]}) and labels ({y_train.shape[0]}) differ in length")
    if x_train.shape[0] == 0:
        raise ValueError("train_character_classifier: no training frames")
    num_classes = y_train.shape[1]
    x_val = y_val = None
    if val_frames is not None or val_labels is not None:
        if val_frames is None or val_labels is None:
            raise ValueError("give both val_frames and val_labels, or neither")
        x_val = as_uint8_nhwc(val_frames, "val_frames")
        y_val = as_label_tensor(val_labels, "val_labels", num_classes=num_classes)
        if x_val.shape[0] != y_val.shape[0]:
            raise ValueError(f"val_frames ({x_val.shape[0]}) and val_labels ({y_val.shape[0]}) differ in length")
        if x_val.shape[0] == 0:
            x_val = y_val = None
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    return x_train, y_train, x_val, y_val, num_classes


def train_character_classifier(frames: Tensor | np.ndarray, labels: Tensor | np.ndarray, *,
                               arch: str = "small_cnn", **settings: Any) -> tuple[CharacterClassifierBase, dict]:
    """Train a character classifier of architecture ``arch`` on uint8 ``frames`` [N, H, W, 3] with multi-hot
    ``labels`` [N, C]: ``small_cnn`` -> :func:`train_small_cnn_classifier`, ``inception_v3`` ->
    :func:`train_inception_classifier` (``settings`` are that function's keyword arguments).

    Returns ``(classifier, report)`` (see :func:`train_small_cnn_classifier`).
    """
    if arch == "small_cnn":
        return train_small_cnn_classifier(frames, labels, **settings)
    if arch == "inception_v3":
        return train_inception_classifier(frames, labels, **settings)
    raise ValueError(f"unknown classifier arch {arch!r} (known: {', '.join(ARCHS)})")


def train_small_cnn_classifier(
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
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[CharacterClassifier, dict[str, Any]]:
    """Train a :class:`CharacterClassifier` with :class:`CharacterClassifierSystem` and a `lightning.Trainer`.

    Args:
        frames: uint8 ``[N, H, W, 3]`` training frames (numpy or torch).
        labels: ``[N, C]`` multi-hot labels (0/1; any numeric or bool dtype).
        val_frames, val_labels: optional held-out set; when given, the weights of the epoch with the best
            validation frame accuracy are kept and the scores are in the report.
        epochs, batch_size, lr, weight_decay, augment, max_shift, hflip, seed: see the module docstring. Turn
            ``hflip`` off when a character's identity depends on its left/right orientation.
        input_size, channels, class_names: passed to :class:`CharacterClassifier`.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` during training (restored afterwards).
            On a small CPU shared with other processes, 1 thread is often several times faster than 2.
        trainer_kwargs: overrides of the `lightning.Trainer` arguments (default: CPU, one device, no logger,
            no progress bar).

    Returns:
        ``(classifier, report)``: the classifier on CPU in eval mode, and a report with per-epoch
        ``train_loss`` (and ``val_frame_acc`` / ``val_char_f1``), ``best_epoch``, ``train_time_s``,
        ``num_params``, ``num_train_frames`` (and ``best_val_frame_acc`` / ``best_val_char_f1``).
    """
    x_train, y_train, x_val, y_val, num_classes = _check_data(frames, labels, val_frames, val_labels, epochs,
                                                              batch_size, lr)
    system = CharacterClassifierSystem(
        num_classes, input_size=input_size, channels=channels, class_names=class_names, lr=lr,
        weight_decay=weight_decay, augment=augment, max_shift=max_shift, hflip=hflip, seed=seed,
    )
    with _isolated(num_threads):  # DataLoader iterators draw a base seed from the global RNG
        return _fit(system, x_train, y_train, x_val, y_val, epochs=epochs, batch_size=batch_size,
                    val_batch_size=512, trainer_kwargs=trainer_kwargs)


def train_inception_classifier(
    frames: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    val_frames: Tensor | np.ndarray | None = None,
    val_labels: Tensor | np.ndarray | None = None,
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-5,
    seed: int = 0,
    hflip: bool = True,
    input_size: int = 299,
    aux_weight: float = 0.4,
    init_weights: str | None = None,
    width_divisor: int = 1,
    class_names: Sequence[str] | None = None,
    weight_decay: float = 0.0,
    num_threads: int | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
):
    """Train StoryDALL-E's Inception-v3 character classifier with :class:`InceptionClassifierSystem`.

    Defaults are the published recipe (``reference/storydalle.md`` §6.2: batch 32, lr 1e-5, 50 epochs, Adam,
    aux weight 0.4, flips). ``init_weights``: a local torchvision ImageNet ``inception_v3`` state dict (None:
    random initialisation); ``width_divisor`` > 1 trains a narrower network (tests). Other arguments, and the
    returned ``(classifier, report)``, as in :func:`train_small_cnn_classifier`; validation runs in batches of
    ``batch_size``.
    """
    x_train, y_train, x_val, y_val, num_classes = _check_data(frames, labels, val_frames, val_labels, epochs,
                                                              batch_size, lr)
    system = InceptionClassifierSystem(
        num_classes, width_divisor=width_divisor, input_size=input_size, class_names=class_names, lr=lr,
        weight_decay=weight_decay, hflip=hflip, aux_weight=aux_weight, init_weights=init_weights, seed=seed,
    )
    with _isolated(num_threads, seed=seed):  # dropout draws from the global RNGs: seeded, then restored
        return _fit(system, x_train, y_train, x_val, y_val, epochs=epochs, batch_size=batch_size,
                    val_batch_size=batch_size, trainer_kwargs=trainer_kwargs)


@contextmanager
def _isolated(num_threads: int | None, seed: int | None = None) -> Iterator[None]:
    """Training leaves the caller's thread count and global RNGs as they were (``seed``: seeds them inside)."""
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(int(seed))
            yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(threads_before)


def _fit(system: _ScoredSystem, x_train: Tensor, y_train: Tensor, x_val: Tensor | None,
         y_val: Tensor | None, *, epochs: int, batch_size: int, val_batch_size: int,
         trainer_kwargs: dict[str, Any] | None) -> tuple[CharacterClassifierBase, dict[str, Any]]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from storyexp.utils.loading import load_file

    start = time.perf_counter()
    has_val = x_val is not None
    x_small = system.train_inputs(x_train)
    train_loader = DataLoader(_Batches(x_small, y_train), batch_size=None,
                              sampler=_Shuffled(len(x_small), batch_size, system.generator))
    val_loader = DataLoader(_Batches(x_val, y_val), batch_size=None,
                            sampler=_InOrder(len(x_val), val_batch_size)) if has_val else None
    with tempfile.TemporaryDirectory(prefix="storyexp-classifier-") as tmp:
        checkpoint = ModelCheckpoint(dirpath=tmp, filename="best", monitor=MONITOR, mode="max", save_top_k=1,
                                     save_last=False, save_weights_only=True, auto_insert_metric_name=False)
        kwargs: dict[str, Any] = {
            "max_epochs": int(epochs), "default_root_dir": tmp, "enable_checkpointing": has_val,
            "callbacks": [checkpoint] if has_val else [], "limit_val_batches": None if has_val else 0,
        }
        kwargs.update(trainer_kwargs or {})
        with quiet_lightning():
            trainer = single_device_trainer(**kwargs)
            trainer.fit(system, train_dataloaders=train_loader, val_dataloaders=val_loader)
        best_epoch = int(epochs) - 1
        if has_val and checkpoint.best_model_path:
            stored = load_file(checkpoint.best_model_path, "Character classifier checkpoint")
            best_epoch = int(stored["epoch"])
            system.load_state_dict(stored["state_dict"])
    model = system.trained_classifier()
    history = system.history
    report: dict[str, Any] = {"train_loss": list(history["train_loss"])}
    if has_val:
        report["val_frame_acc"] = list(history["val_frame_acc"])
        report["val_char_f1"] = list(history["val_char_f1"])
    report.update(
        best_epoch=best_epoch,
        epochs=int(epochs),
        seed=int(system.hparams.seed),
        num_params=sum(p.numel() for p in model.parameters()),
        num_train_frames=int(x_train.shape[0]),
        num_threads=torch.get_num_threads(),
        train_time_s=time.perf_counter() - start,
    )
    if has_val:
        report["best_val_frame_acc"] = report["val_frame_acc"][best_epoch]
        report["best_val_char_f1"] = report["val_char_f1"][best_epoch]
        report["num_val_frames"] = int(x_val.shape[0])
    return model, report
