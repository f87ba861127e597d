"""The built-in demo story set: synthetic 5-frame stories the project generates itself, deterministically.

Design
------
* **Cast** (:data:`DEMO_CHARACTERS`, label order): ``pip`` red circle, ``bo`` blue square, ``gus`` green
  triangle, ``yaz`` orange diamond, ``mo`` magenta plus, ``kiki`` cyan ring. Saturated colours, far apart from
  each other and from the pastel backgrounds; every character also has its own shape.
* **Scenes**: "in the park" (light green), "at the beach" (light sand), "in the snow" (near-white), each a
  two-tone background (a lighter upper part, a slightly darker ground band).
* **A story** has one scene and 2-4 characters from the cast, every one of which appears at least once.
  Each frame shows 1 or 2 of them. Every character does a random walk across frames (its position
  changes by at most a fifth of its range from one frame to the next). When two are shown, one is in the
  left half and one in the right half (they never overlap), and the caption names the left one first.
* **Captions** name every visible character, an action and the scene: ``"gus jumps at the beach."`` (single:
  walks, jumps, sleeps, waves, dances, sits) or ``"pip chases bo in the park."`` (pair: chases, plays with,
  talks to, hugs, follows, waves at).
* **Labels**: ``[5, 6]`` float32 multi-hot of the visible characters per frame.
* **Rendering**: every character is a sprite of side ``round(0.4 * resolution)`` px, drawn with PIL at 4x and
  reduced with area averaging (anti-aliased alpha mask), alpha-composited onto the background with integer
  arithmetic. Clear at 32 px, crisp at 64 px.

Determinism: story ``i`` of split ``s`` depends only on ``(seed, s, i, resolution)`` through its own
``numpy.random.Generator`` (PCG64, seeded with ``[seed, split_no, i]``) and integer-only geometry, so the same
parameters give identical stories on every machine, and a larger ``n_train`` only appends stories. The global
RNGs (``random``, ``numpy.random``, torch) are never touched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from .hdf5 import write_stories_hdf5
from .registry import DatasetSpec, Generator, register
from .story import N_FRAMES, Story, StoryDataError

__all__ = [
    "DEMO_CHARACTERS",
    "DEMO_COLOURS",
    "DEMO_SHAPES",
    "DEMO_SCENES",
    "SINGLE_ACTIONS",
    "PAIR_ACTIONS",
    "GENERATOR_VERSION",
    "generate_demo_stories",
    "generate_demo_story",
    "ensure_demo_dataset",
    "check_demo_file",
    "read_demo_params",
    "DEMO_DEFAULTS",
    "SPEC",
]

log = logging.getLogger(__name__)

#: Bump whenever the generated content changes for the same parameters (forces regeneration of cached files).
GENERATOR_VERSION = 1

#: The cast, in label order.
DEMO_CHARACTERS: tuple[str, ...] = ("pip", "bo", "gus", "yaz", "mo", "kiki")
DEMO_SHAPES: dict[str, str] = {
    "pip": "circle",
    "bo": "square",
    "gus": "triangle",
    "yaz": "diamond",
    "mo": "plus",
    "kiki": "ring",
}
DEMO_COLOURS: dict[str, tuple[int, int, int]] = {
    "pip": (220, 30, 30),  # red
    "bo": (30, 70, 220),  # blue
    "gus": (20, 140, 40),  # green
    "yaz": (245, 150, 0),  # orange
    "mo": (200, 30, 200),  # magenta
    "kiki": (0, 180, 205),  # cyan
}
#: scene name -> (caption phrase, upper colour, ground colour)
DEMO_SCENES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "park": ("in the park", (222, 242, 214), (196, 228, 180)),
    "beach": ("at the beach", (250, 240, 212), (238, 220, 174)),
    "snow": ("in the snow", (234, 240, 250), (250, 251, 253)),
}
SINGLE_ACTIONS: tuple[str, ...] = ("walks", "jumps", "sleeps", "waves", "dances", "sits")
PAIR_ACTIONS: tuple[str, ...] = ("chases", "plays with", "talks to", "hugs", "follows", "waves at")

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SUPERSAMPLE = 4
_WALK = 1000  # random-walk coordinates live in [0, _WALK]
_STEP = 200  # at most a fifth of the range per frame


# ---------------------------------------------------------------------------------------------- rendering


def _sprite_side(resolution: int) -> int:
    return max(4, round(0.4 * resolution))


def _margin(resolution: int) -> int:
    return max(1, resolution // 32)


@lru_cache(maxsize=64)
def _sprite_alpha(shape: str, side: int) -> np.ndarray:
    """Anti-aliased ``side x side`` uint16 alpha mask (0..255) of a character shape."""
    w = side * _SUPERSAMPLE
    img = Image.new("L", (w, w), 0)
    d = ImageDraw.Draw(img)
    last = w - 1
    if shape == "circle":
        d.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        inset = w // 10
        d.rectangle((inset, inset, last - inset, last - inset), fill=255)
    elif shape == "triangle":
        d.polygon([(w // 2, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        d.polygon([(w // 2, 0), (last, w // 2), (w // 2, last), (0, w // 2)], fill=255)
    elif shape == "plus":
        t = (w * 36) // 100
        a = (w - t) // 2
        d.rectangle((a, 0, a + t - 1, last), fill=255)
        d.rectangle((0, a, last, a + t - 1), fill=255)
    elif shape == "ring":
        t = (w * 24) // 100
        d.ellipse((0, 0, last, last), fill=255)
        d.ellipse((t, t, last - t, last - t), fill=0)
    else:  # pragma: no cover - closed set
        raise ValueError(f"unknown shape {shape!r}")
    small = img.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint16)


@lru_cache(maxsize=16)
def _background(scene: str, resolution: int) -> np.ndarray:
    _, upper, ground = DEMO_SCENES[scene]
    bg = np.empty((resolution, resolution, 3), dtype=np.uint8)
    horizon = (resolution * 65) // 100
    bg[:horizon] = upper
    bg[horizon:] = ground
    bg.setflags(write=False)
    return bg


def _paste(frame: np.ndarray, name: str, x0: int, y0: int) -> None:
    side = frame.shape[0]
    alpha = _sprite_alpha(DEMO_SHAPES[name], _sprite_side(side))
    s = alpha.shape[0]
    region = frame[y0 : y0 + s, x0 : x0 + s].astype(np.uint16)
    a = alpha[..., None]
    colour = np.asarray(DEMO_COLOURS[name], dtype=np.uint16)
    frame[y0 : y0 + s, x0 : x0 + s] = ((region * (255 - a) + colour * a + 127) // 255).astype(np.uint8)


def _place(u: int, lo: int, hi: int) -> int:
    return lo + ((hi - lo) * u) // _WALK


def _render(scene: str, resolution: int, placed: list[tuple[str, int, int]]) -> np.ndarray:
    frame = _background(scene, resolution).copy()
    for name, x0, y0 in placed:
        _paste(frame, name, x0, y0)
    return frame


# ----------------------------------------------------------------------------------------------- stories


def _reflect(v: int) -> int:
    if v < 0:
        return -v
    if v > _WALK:
        return 2 * _WALK - v
    return v


def generate_demo_story(seed: int, split: str, index: int, resolution: int = 64) -> Story:
    """Story ``index`` of ``split`` (``train``/``val``/``test``); depends on nothing else."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown demo split {split!r}; expected one of {list(_SPLIT_CODES)}")
    if resolution < 16:
        raise ValueError(f"demo resolution must be at least 16 px, got {resolution}")
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])
    n_cast = len(DEMO_CHARACTERS)
    scenes = list(DEMO_SCENES)
    scene = scenes[int(rng.integers(len(scenes)))]
    n_chars = int(rng.integers(2, 5))  # 2..4
    cast = [int(c) for c in rng.choice(n_cast, size=n_chars, replace=False)]

    # Who is visible in each frame: every story character at least once, then 1..2 per frame.
    visible: list[list[int]] = [[] for _ in range(N_FRAMES)]
    for frame_no, c in zip(rng.permutation(N_FRAMES)[:n_chars].tolist(), cast):
        visible[frame_no].append(c)
    for f in range(N_FRAMES):
        if not visible[f]:
            # continuity: usually keep someone from the previous frame
            prev = visible[f - 1] if f > 0 else []
            if prev and rng.random() < 0.6:
                visible[f].append(prev[int(rng.integers(len(prev)))])
            else:
                visible[f].append(cast[int(rng.integers(n_chars))])
        if len(visible[f]) == 1 and rng.random() < 0.5:
            others = [c for c in cast if c != visible[f][0]]
            visible[f].append(others[int(rng.integers(len(others)))])

    # Random walk of every story character (integer coordinates in [0, _WALK]).
    pos = {c: [int(rng.integers(_WALK + 1)), int(rng.integers(_WALK + 1))] for c in cast}

    side = _sprite_side(resolution)
    m = _margin(resolution)
    half = resolution // 2
    y_lo, y_hi = m, resolution - side - m
    full = (m, resolution - side - m)
    left = (m, max(m, half - side - 1))
    right = (min(resolution - side - m, half + 1), resolution - side - m)

    phrase = DEMO_SCENES[scene][0]
    frames, captions = [], []
    labels = np.zeros((N_FRAMES, n_cast), dtype=np.float32)
    for f in range(N_FRAMES):
        if f > 0:
            for c in cast:
                pos[c][0] = _reflect(pos[c][0] + int(rng.integers(-_STEP, _STEP + 1)))
                pos[c][1] = _reflect(pos[c][1] + int(rng.integers(-_STEP, _STEP + 1)))
        vis = visible[f]
        if len(vis) == 1:
            (c,) = vis
            placed = [(DEMO_CHARACTERS[c], _place(pos[c][0], *full), _place(pos[c][1], y_lo, y_hi))]
            action = SINGLE_ACTIONS[int(rng.integers(len(SINGLE_ACTIONS)))]
            captions.append(f"{DEMO_CHARACTERS[c]} {action} {phrase}.")
        else:
            a, b = sorted(vis, key=lambda c: (pos[c][0], c))  # a is further left
            placed = [
                (DEMO_CHARACTERS[a], _place(pos[a][0], *left), _place(pos[a][1], y_lo, y_hi)),
                (DEMO_CHARACTERS[b], _place(pos[b][0], *right), _place(pos[b][1], y_lo, y_hi)),
            ]
            action = PAIR_ACTIONS[int(rng.integers(len(PAIR_ACTIONS)))]
            captions.append(f"{DEMO_CHARACTERS[a]} {action} {DEMO_CHARACTERS[b]} {phrase}.")
        for c in vis:
            labels[f, c] = 1.0
        frames.append(_render(scene, resolution, placed))
    return Story(id=f"demo-{split}-{index:05d}", captions=captions, frames=frames, labels=labels)


def generate_demo_stories(
    seed: int = 0, n_train: int = 3000, n_val: int = 100, n_test: int = 200, resolution: int = 64
) -> dict[str, list[Story]]:
    """All demo stories: ``{"train": [...], "val": [...], "test": [...]}``."""
    return {split: list(stories) for split, stories in _demo_splits(seed, n_train, n_val, n_test, resolution).items()}


def _demo_splits(seed: int, n_train: int, n_val: int, n_test: int, resolution: int):
    """``{split: generator of its stories}``: stories are made one at a time, as the writer takes them."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if int(n) < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    def stories(split: str, n: int):
        for i in range(n):
            yield generate_demo_story(seed, split, i, resolution)

    return {split: stories(split, int(n)) for split, n in counts.items()}


# ------------------------------------------------------------------------------------------------- files


def _params(seed: int, n_train: int, n_val: int, n_test: int, resolution: int) -> dict[str, int]:
    return {
        "demo_seed": int(seed),
        "demo_n_train": int(n_train),
        "demo_n_val": int(n_val),
        "demo_n_test": int(n_test),
        "demo_resolution": int(resolution),
        "demo_generator_version": GENERATOR_VERSION,
    }


def read_demo_params(path: str | os.PathLike) -> dict[str, int] | None:
    """Generation parameters stored in a demo file; ``None`` if the file is not a demo file (or unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            if "demo_generator_version" not in f.attrs:
                return None
            return {k: int(v) for k, v in f.attrs.items() if k.startswith("demo_")}
    except OSError:
        return None


def _announce(msg: str) -> None:
    if logging.getLogger().handlers or log.handlers:
        log.info(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def ensure_demo_dataset(
    path: str | os.PathLike,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 100,
    n_test: int = 200,
    resolution: int = 64,
) -> Path:
    """Make sure ``path`` holds the demo set for these parameters; generate it (atomically) if not.

    An existing file is kept when its stored parameters and generator version match, and regenerated when
    they differ. A file at ``path`` that is not a demo file is never overwritten (``FileExistsError``).
    """
    path = Path(path)
    want = _params(seed, n_train, n_val, n_test, resolution)
    if path.exists():
        have = read_demo_params(path)
        if have == want:
            return path
        if have is None:
            raise FileExistsError(
                f"{path} exists but is not a storyexp demo dataset (no demo generation attributes); "
                "refusing to overwrite it. Point the demo data path elsewhere or remove the file."
            )
        reason = f"parameters changed ({_diff(have, want)})"
    else:
        reason = "file missing"
    t0 = time.perf_counter()
    write_stories_hdf5(  # streamed: the stories are generated as they are written
        path,
        _demo_splits(seed, n_train, n_val, n_test, resolution),
        text_key="text",
        characters=DEMO_CHARACTERS,
        attrs={"dataset": "demo", **want},
    )
    _announce(
        f"storyexp: generated demo story set at {path} ({reason}): seed={seed}, "
        f"train/val/test={n_train}/{n_val}/{n_test}, {resolution}px, {time.perf_counter() - t0:.1f}s"
    )
    return path


def _diff(have: dict[str, int], want: dict[str, int]) -> str:
    keys = sorted(set(have) | set(want))
    return ", ".join(f"{k}: {have.get(k)} -> {want.get(k)}" for k in keys if have.get(k) != want.get(k))


def check_demo_file(
    path: str | os.PathLike,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 100,
    n_test: int = 200,
    resolution: int = 64,
) -> None:
    """Raise :class:`StoryDataError` when the demo file at ``path`` was generated with other parameters.

    A file that is not a demo file (no generation attributes) passes: it is read as it is.
    """
    have = read_demo_params(path)
    want = _params(seed, n_train, n_val, n_test, resolution)
    if have is not None and have != want:
        raise StoryDataError(
            f"demo file was generated with other parameters than configured ({_diff(have, want)}); set data.demo "
            "to the file's parameters, or leave data.path at its default to generate the configured set",
            file=path,
            field="attrs",
        )


#: Generation parameters of the demo set and their defaults (``data.demo`` in the config).
DEMO_DEFAULTS = {"seed": 0, "n_train": 3000, "n_val": 100, "n_test": 200, "resolution": 64}


def _ensure(path: str | os.PathLike, **params: int) -> Path:
    return ensure_demo_dataset(path, **params)  # looked up on each call (tests replace it)


def _check(path: str | os.PathLike, **params: int) -> None:
    check_demo_file(path, **params)


SPEC = register(
    DatasetSpec(
        name="demo",
        title="demo",
        characters=DEMO_CHARACTERS,
        download="It is generated automatically on first use; check that the data directory is writable.",
        generator=Generator(defaults=DEMO_DEFAULTS, ensure=_ensure, check=_check),
    )
)
