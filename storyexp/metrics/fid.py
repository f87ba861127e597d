"""Inception FID as the field computes it, in two protocols, on pytorch-fid's network and Fréchet distance.

* ``fid64`` -- the legacy protocol of StoryDALL-E and AR-LDM: every generated and ground-truth frame is resized to
  64x64 with PIL bilinear (uint8 RGB), then pytorch-fid's ``InceptionV3`` upsamples it bilinearly to 299
  (``resize_input=True``) and its pool3 features (2048-d) are taken;
* ``fid`` (protocol ``native``) -- the same without the 64x64 pre-resize.

The network is ``pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)``. The distance is pytorch-fid's formula, ``||mu1 - mu2||^2 + tr(S1) + tr(S2) -
2 tr((S1 S2)^1/2)``, with the trace of the matrix square root taken from symmetric eigendecompositions
(``tr((S1^1/2 S2 S1^1/2)^1/2)``, the same number, as torchmetrics also avoids ``sqrtm``) instead of
``scipy.linalg.sqrtm``: about 2 s instead of 12-17 s for 2048-d statistics on 2 CPU cores (FID runs at every
validation), equal to ``pytorch_fid.fid_score.calculate_frechet_distance`` within 1e-7 relative even for the
singular covariances of a few frames (5e-15 with full-rank ones; ``tests/test_fid.py`` compares the two). What this
module adds: the weights look-up without downloads, float64 streaming
statistics (running sums of x and x x^T, summed across DDP processes), :class:`StoryFID` (a
:class:`~storyexp.metrics.base.StoryMetric`), and the folder command::

    python -m storyexp.metrics.fid PATH_A PATH_B --protocol fid64|native [--weights FILE]
           [--batch-size N] [--device cpu|cuda] [--save-stats OUT.npz]

Weights ``pt_inception-2015-12-05-6726825d.pth`` are looked up in this order: the explicit ``weights`` argument
(config ``eval.fid.weights``) or ``$STORYEXP_FID_WEIGHTS``; ``<weights_dir>/fid/<file>``; the torch hub cache
``torch.hub.get_dir()/checkpoints/<file>``. They are never downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence
from unittest import mock

import numpy as np
import torch
from PIL import Image
from pytorch_fid import inception as _pfid_inception
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torch import Tensor
from torchmetrics import Metric

from storyexp.errors import ConfigurationError, MissingResourceError, StoryexpError
from storyexp.metrics._io import as_uint8_nhwc
from storyexp.metrics.registry import FID_PROTOCOLS, fid_protocol
from storyexp.utils.io import atomic_write
from storyexp.utils.loading import load_file

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "PROTOCOLS",
    "WEIGHTS_ENV",
    "StoryFID",
    "build_inception",
    "find_weights",
    "frechet_distance",
    "inception_features",
    "load_stats",
    "main",
    "prepare_frames",
    "save_stats",
    "stream_stats",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "STORYEXP_FID_WEIGHTS"
PROTOCOLS = FID_PROTOCOLS  # protocol name (command line / config) -> metric key
FEATURE_DIM = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _protocol_key(protocol: str) -> str:
    return PROTOCOLS[fid_protocol(protocol)]


# ------------------------------------------------------------------------------------------------ weights


def find_weights(weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file, by the documented look-up order; one-line error when there is none."""
    explicit = weights if weights not in (None, "") else os.environ.get(WEIGHTS_ENV) or None
    how = (f"It is published by pytorch-fid at {FID_WEIGHTS_URL}; download it and pass its path "
           f"(--weights FILE, eval.fid.weights=FILE or ${WEIGHTS_ENV}) or put it in <paths.weights_dir>/fid/.")
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        source = "weights argument" if weights not in (None, "") else f"${WEIGHTS_ENV}"
        raise MissingResourceError(f"FID Inception weights {FID_WEIGHTS_FILE} not found at '{path}' (from the "
                                   f"{source}). {how}")
    places: list[Path] = []
    if weights_dir not in (None, ""):
        places.append(Path(weights_dir).expanduser() / "fid" / FID_WEIGHTS_FILE)
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE)
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(f"'{p}'" for p in places)
    raise MissingResourceError(f"FID Inception weights {FID_WEIGHTS_FILE} not found (no weights argument or "
                               f"${WEIGHTS_ENV}; looked in {looked}). {how}")


_BUILD_LOCK = threading.Lock()


def build_inception(weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None,
                    device: Any = "cpu") -> InceptionV3:
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``,
    loaded from the local weights file (never downloaded), in eval mode, frozen.

    How the local file gets in: ``InceptionV3(use_fid_inception=True)`` builds its network in
    ``pytorch_fid.inception.fid_inception_v3``, which ends with ``load_state_dict_from_url(FID_WEIGHTS_URL)``
    followed by a strict ``inception.load_state_dict(state_dict)``. That name is a module global of
    ``pytorch_fid.inception``; for the duration of the constructor it is replaced by a function that returns the
    state dict read from the local file with the project's safe loader. This keeps pytorch-fid's own
    architecture code and its own strict load untouched (replicating ``fid_inception_v3``'s body would copy the
    architecture and could drift from the package); the replacement refuses any URL other than
    ``FID_WEIGHTS_URL``, so nothing else can be loaded by it, and a lock keeps concurrent builds apart.
    """
    path = find_weights(weights, weights_dir)
    state_dict = load_file(path, "FID Inception weights", how_to_get=f"It is published at {FID_WEIGHTS_URL}.")
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]

    def _local_state_dict(url: str, *args: Any, **kwargs: Any) -> Any:
        if url != FID_WEIGHTS_URL:
            raise RuntimeError(f"storyexp.metrics.fid: unexpected weights URL {url!r}")
        return state_dict

    with _BUILD_LOCK, mock.patch.object(_pfid_inception, "load_state_dict_from_url", _local_state_dict):
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                normalize_input=True, use_fid_inception=True)
        except RuntimeError as err:  # strict load_state_dict: wrong keys / shapes
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StoryexpError(f"FID Inception weights '{path}' do not fit pytorch-fid's FID InceptionV3: "
                                f"{first}") from None
    return model.eval().requires_grad_(False).to(device)


# ------------------------------------------------------------------------------------------------ features


def prepare_frames(frames: Any, protocol: str) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> the uint8 frames the protocol feeds Inception (``fid64``: PIL bilinear 64x64)."""
    key = _protocol_key(protocol)
    x = as_uint8_nhwc(frames, "FID frames")
    if key == "fid64" and tuple(x.shape[1:3]) != (64, 64):
        arr = x.cpu().numpy()
        x = torch.from_numpy(np.stack([np.asarray(Image.fromarray(f).resize((64, 64), Image.BILINEAR))
                                       for f in arr])) if len(arr) else torch.zeros(0, 64, 64, 3, dtype=torch.uint8)
    return x


@torch.no_grad()
def inception_features(model: InceptionV3, frames: Tensor) -> Tensor:
    """Pool3 features ``[N, 2048]`` (float64) of uint8 NHWC frames already prepared for the protocol.

    The input is what pytorch-fid feeds its network: ``ToTensor()`` of the RGB image, i.e. float32 in [0, 1].
    """
    param = next(model.parameters())
    x = frames.to(param.device).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    pred = model(x)[0]
    if pred.shape[2] != 1 or pred.shape[3] != 1:  # as pytorch-fid's get_activations
        pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
    return pred.flatten(1).to(torch.float64)


def _moments_to_stats(total: Tensor, outer: Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``'s) from float64 sums of x and x x^T."""
    total, outer = total.detach().cpu().to(torch.float64), outer.detach().cpu().to(torch.float64)
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians (pytorch-fid's value; see the module docstring), in float64.

    S1^1/2 from S1's eigendecomposition (eigenvalues clipped at 0: covariances are PSD, rounding makes a few
    slightly negative), then tr((S1^1/2 S2 S1^1/2)^1/2) = the sum of the square roots of that symmetric PSD
    matrix's eigenvalues, which are those of S1 S2. No ``eps`` offset is needed (pytorch-fid adds one only when
    ``sqrtm`` of a singular product fails)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(middle, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ------------------------------------------------------------------------------------------------ metric


class StoryFID(Metric):
    """Inception FID between generated and ground-truth frames, a :class:`StoryMetric`.

    ``update(generated, real)`` takes aligned uint8 ``[N, H, W, 3]`` frames (numpy or torch); ``labels`` and
    ``captions`` are ignored. ``compute()`` returns ``{"fid64": x}`` (protocol ``fid64``) or ``{"fid": x}``
    (protocol ``native``). ``reference=(mu, sigma)`` or an ``.npz`` path gives fixed reference statistics
    instead, and ``real`` may then be ``None``.

    States are float64 running sums (``sum x``, ``sum x x^T``) and counts with ``dist_reduce_fx="sum"``: nothing
    per image is kept, and under DDP the sums add up over processes. The Inception network is not a submodule
    (it is never in ``state_dict()`` / a checkpoint); it follows the metric's device at the next ``update``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, protocol: str = "fid64", *, weights: str | os.PathLike | None = None,
                 weights_dir: str | os.PathLike | None = None, inception: InceptionV3 | None = None,
                 reference: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = _protocol_key(protocol)
        self.protocol = "fid64" if self.key == "fid64" else "native"
        model = inception if inception is not None else build_inception(weights, weights_dir)
        self._inception = [model.eval().requires_grad_(False)]  # a list: kept out of the module tree
        if isinstance(reference, (str, os.PathLike)):
            reference = load_stats(reference)
        self._reference = None if reference is None else (np.asarray(reference[0], np.float64),
                                                          np.asarray(reference[1], np.float64))
        for side in ("fake", "real"):
            self.add_state(f"{side}_sum", torch.zeros(FEATURE_DIM, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def inception(self) -> InceptionV3:
        model = self._inception[0]
        if next(model.parameters()).device != self.device:
            self._inception[0] = model = model.to(self.device)
        return model

    def _add(self, side: str, frames: Any) -> None:
        x = prepare_frames(frames, self.protocol)
        if x.shape[0] == 0:
            return
        feats = inception_features(self.inception, x).to(self.device)
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])

    def update(self, generated: Any, real: Any | None = None, labels: Any | None = None, *,  # type: ignore[override]
               captions: Sequence[str] | None = None, stories: Sequence[str] | None = None) -> None:
        if real is None and self._reference is None:
            raise ValueError(f"{self.key}: update() needs the real frames (or reference statistics)")
        self._add("fake", generated)
        if real is not None:
            self._add("real", real)

    def stats(self, side: str = "fake") -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of the generated (``"fake"``) or real frames seen so far (all processes)."""
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            raise RuntimeError(f"{self.key} needs at least 2 frames on each side; got {n} {side} frames")
        return _moments_to_stats(getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"), n)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        mu1, sigma1 = self.stats("fake")
        mu2, sigma2 = self._reference if self._reference is not None else self.stats("real")
        return {self.key: _on_rank_zero(lambda: frechet_distance(mu1, sigma1, mu2, sigma2))}


def _on_rank_zero(fn) -> float:
    """``fn()`` on global rank 0, its value broadcast to every process: the 2048x2048 matrix square root (~20 s of
    CPU) runs once per job instead of once per process on CPUs the processes share. Every process holds the same
    summed statistics, so the value is the one each would have computed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


# ------------------------------------------------------------------------------------------------ files


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a pytorch-fid ``.npz`` (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError("FID statistics", path)
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except KeyError:
        raise ConfigurationError(f"FID statistics '{path}' must hold arrays 'mu' and 'sigma'") from None
    except Exception as err:  # not a zip / corrupt
        raise ConfigurationError(f"cannot read FID statistics '{path}': {err}") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ConfigurationError(f"FID statistics '{path}': expected mu [{FEATURE_DIM}] and sigma "
                                 f"[{FEATURE_DIM}, {FEATURE_DIM}], got {mu.shape} and {sigma.shape}")
    return mu, sigma


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu`` / ``sigma`` as a pytorch-fid ``.npz``, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, mu=mu, sigma=sigma)

    return atomic_write(path, write)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except Exception as err:
        raise ConfigurationError(f"cannot read image '{path}': {err}") from None


def stream_stats(frames: Iterable[np.ndarray], model: InceptionV3, protocol: str, batch_size: int = 50
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` of uint8 ``[H, W, 3]`` frames of any sizes, streamed: consecutive frames of one size (after
    the protocol's resize) share a batch of up to ``batch_size``, so nothing per frame is kept."""
    total = torch.zeros(FEATURE_DIM, dtype=torch.float64)
    outer = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64)
    batch: list[np.ndarray] = []
    n = 0

    def flush() -> None:
        nonlocal total, outer
        if batch:
            feats = inception_features(model, torch.from_numpy(np.stack(batch))).cpu()
            total += feats.sum(0)
            outer += feats.T @ feats
            batch.clear()

    for frame in frames:
        frame = prepare_frames(np.asarray(frame)[None], protocol)[0].numpy()
        if batch and (frame.shape != batch[0].shape or len(batch) >= batch_size):
            flush()
        batch.append(frame)
        n += 1
    flush()
    if n < 2:
        raise ConfigurationError(f"FID needs at least 2 frames; got {n}")
    mu, sigma = _moments_to_stats(total, outer, n)
    return mu, sigma, n


def folder_stats(folder: str | os.PathLike, model: InceptionV3, protocol: str, batch_size: int = 50
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` of a folder of images (png/jpg/jpeg, recursive, any sizes), streamed."""
    files = list_images(folder)
    if len(files) < 2:
        raise ConfigurationError(f"'{folder}' holds {len(files)} images (png/jpg/jpeg); FID needs at least 2")
    return stream_stats((_read_rgb(path) for path in files), model, protocol, batch_size)


def _path_stats(path: str, model_fn, protocol: str, batch_size: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    p = Path(path)
    if p.is_dir():
        return folder_stats(p, model_fn(), protocol, batch_size)
    if p.suffix.lower() == ".npz":
        mu, sigma = load_stats(p)
        return mu, sigma, None
    if not p.exists():
        raise ConfigurationError(f"'{path}' does not exist (expected a folder of images or an .npz)")
    raise ConfigurationError(f"'{path}' is neither a folder of images nor an .npz of FID statistics")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 1, like every other user error
        print(f"storyexp: error: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="python -m storyexp.metrics.fid",
                             description="Inception FID between two folders of images or .npz statistics.")
    parser.add_argument("path_a", help="folder of images (png/jpg, recursive) or .npz with mu, sigma")
    parser.add_argument("path_b", help="folder of images (png/jpg, recursive) or .npz with mu, sigma")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="fid64",
                        help="fid64: PIL bilinear 64x64 first (StoryDALL-E / AR-LDM); native: no pre-resize")
    parser.add_argument("--weights", default=None, help=f"{FID_WEIGHTS_FILE} (default: ${WEIGHTS_ENV}, "
                                                        "then the torch hub cache)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz", help="write PATH_A's statistics")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigurationError("--batch-size must be at least 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError("--device cuda: no CUDA device is available")
        for path in (args.path_a, args.path_b):
            if not (Path(path).is_dir() or Path(path).suffix.lower() == ".npz"):
                raise ConfigurationError(
                    f"'{path}' " + ("does not exist" if not Path(path).exists() else "is neither a folder nor an .npz")
                    + " (expected a folder of images or an .npz of FID statistics)")
        models: list[InceptionV3] = []

        def model_fn() -> InceptionV3:
            if not models:
                models.append(build_inception(args.weights, device=args.device))
            return models[0]

        mu1, sigma1, n1 = _path_stats(args.path_a, model_fn, args.protocol, args.batch_size)
        mu2, sigma2, n2 = _path_stats(args.path_b, model_fn, args.protocol, args.batch_size)
        if args.save_stats:
            save_stats(args.save_stats, mu1, sigma1)
        value = frechet_distance(mu1, sigma1, mu2, sigma2)
    except (StoryexpError, FileNotFoundError) as err:
        print(f"storyexp: error: {err}", file=sys.stderr)
        return 1
    if args.save_stats:
        print(f"wrote {args.save_stats}")
    counts = "/".join("npz" if n is None else str(n) for n in (n1, n2))
    print(f"{PROTOCOLS[args.protocol]} ({counts} images): {value:.10g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
