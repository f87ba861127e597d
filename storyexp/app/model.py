"""The checkpoint's model for the browser demo (`task=app`): built and loaded once, through the same data-free path
as `task=sample sample.captions=...` (the checkpoint alone: its model record and data facts, no dataset), then
sampled story by story with `StorySystem.stream_story` (each frame as it is produced).

No Gradio here: `StoryApp` is plain Python, so the streaming and the grid are tested without a browser.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf

from storyexp.callbacks.story_grid import save_png, stack_grids, story_grid
from storyexp.data.predict import story_batch
from storyexp.errors import ConfigurationError
from storyexp.systems.base import StorySystem
from storyexp.tasks import sharded
from storyexp.tasks.common import (
    CKPT_HINT,
    apply_float32_matmul_precision,
    build_model,
    require_ckpt,
    use_checkpoint_data,
    use_checkpoint_model,
)
from storyexp.tasks.sample import caption_story, square_crop
from storyexp.utils.loading import load_file

log = logging.getLogger("storyexp")

# sampler options shown as controls: key -> (label, kind, min, max, step). Keys the model's sampler config does not
# have are left out; the others (autocast, static_cache, skip_* ...) change speed, not the frames, and stay as
# configured. num_candidates: K independent stories per click (task=sample's candidate_K/), one gallery row each.
CONTROLS: dict[str, tuple[str, str, float, float, float]] = {
    "num_inference_steps": ("Denoising steps", "int", 1, 250, 1),
    "guidance_scale": ("Guidance scale", "float", 0.0, 20.0, 0.5),
    "eta": ("DDIM eta", "float", 0.0, 1.0, 0.05),
    "top_k": ("Top-k", "int", 1, 1024, 1),
    "top_p": ("Top-p (1: off)", "float", 0.05, 1.0, 0.05),
    "temperature": ("Temperature", "float", 0.1, 3.0, 0.05),
    "supercondition_factor": ("Supercondition factor (1: off)", "float", 1.0, 32.0, 0.5),
    "chain": ("Chain frames (frame i attends to frame i-1)", "bool", 0, 1, 1),
    "scheduler": ("Scheduler", "choice", 0, 0, 0),
    "num_candidates": ("Candidates (stories drawn)", "int", 1, 8, 1),
}


@dataclass
class Control:
    """One sampler setting on the page: `key` of model.sampler, its widget kind, range and the checkpoint's value."""

    key: str
    label: str
    kind: str  # int | float | bool | choice
    value: Any
    minimum: float = 0
    maximum: float = 1
    step: float = 1
    choices: list[str] = field(default_factory=list)

    def parse(self, value: Any) -> Any:
        """The widget's value as the sampler takes it (top_p 1 means off: None, as the configs write it)."""
        if self.kind == "int":
            return int(value)
        if self.kind == "float":
            value = float(value)
            return None if self.key == "top_p" and value >= 1.0 else value
        if self.kind == "bool":
            return bool(value)
        return str(value)


def sampler_controls(sampler: dict[str, Any]) -> list[Control]:
    """The controls for a model's sampler config (`CONTROLS` that it has), at its values; a range widens to hold a
    configured value outside it."""
    from storyexp.systems.samplers import ALIASES

    controls = []
    for key, (label, kind, lo, hi, step) in CONTROLS.items():
        if key not in sampler:
            continue
        value = sampler[key]
        if kind == "choice":
            choices = list(dict.fromkeys([str(value), *ALIASES]))
            controls.append(Control(key, label, kind, str(value), choices=choices))
            continue
        if kind == "bool":
            controls.append(Control(key, label, kind, bool(value)))
            continue
        if value is None:  # top_p null: off
            value = hi
        value = int(value) if kind == "int" else float(value)
        controls.append(Control(key, label, kind, value, min(lo, value), max(hi, value), step))
    return controls


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("app.device=cuda but no CUDA GPU is available: use app.device=auto or cpu.")
    return torch.device(name)


def load_checkpoint_weights(model: StorySystem, path: str) -> None:
    """Load a storyexp checkpoint into `model` as Lightning's predict does: the system's `on_load_checkpoint`
    (tokenizer, frozen-weights record, one-line key check), then its strict `load_state_dict`."""
    if sharded.sharded_kind(path):
        raise ConfigurationError(f"Checkpoint (ckpt_path) {path} is sharded (FSDP / DeepSpeed): task=app reads a "
                                 "single-file checkpoint; convert it first (README, 'Checkpoints').")
    checkpoint = load_file(path, "Checkpoint (ckpt_path)", how_to_get=CKPT_HINT, mmap=True)
    model.setup("predict")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)


class StoryApp:
    """The model the page samples, its sampler controls and where grids go."""

    def __init__(self, cfg: DictConfig, model: StorySystem, output_dir: Path):
        self.cfg, self.model, self.output_dir = cfg, model, Path(output_dir)
        data = cfg.get("data") or {}
        self.frame_size, self.frame_fit = data.get("frame_size"), str(data.get("frame_fit", "squash"))
        self.seed = int(cfg.seed) if cfg.get("seed") is not None else 0
        sampler = OmegaConf.to_container(cfg.model.get("sampler") or {}, resolve=True)
        self.controls = sampler_controls(sampler)
        self.model_name = str(cfg.model.get("_target_", type(model).__name__)).rsplit(".", 1)[-1]
        self.grids = 0

    @property
    def continuation(self) -> bool:
        return self.model.task == "continuation"

    def settings(self, values: Sequence[Any]) -> dict[str, Any]:
        """Sampler overrides from the controls' values (in `controls` order)."""
        return {c.key: c.parse(v) for c, v in zip(self.controls, values)}

    def story(self, captions: Sequence[str], source: np.ndarray | None):
        captions = [str(c or "").strip() for c in captions]
        if any(not c for c in captions):
            raise ConfigurationError(f"Give all {len(captions)} captions (one per frame).")
        source_frame = None
        if self.continuation:
            if source is None:
                raise ConfigurationError("This is a story continuation model: upload the first frame (caption 1 "
                                         "describes it).")
            source_frame = square_crop(source)
        return caption_story(captions, source_frame, self.model.image_size, 0, "the story")

    def stream(self, captions: Sequence[str], source: np.ndarray | None = None, seed: int | None = None,
               num_candidates: int = 1, **settings) -> Iterator[tuple[int | None, np.ndarray]]:
        """(target index, uint8 [K, H, W, 3]) per frame as it is generated (that frame of each of the K candidates),
        then (None, uint8 [K, V, H, W, 3]): the whole stories, exactly `task=sample`'s frames for the same story,
        seed and settings (candidate 0: story_000/, candidate c: story_000/candidate_c/)."""
        story = self.story(captions, source)
        # on the model's device, as Lightning's predict loop hands batches over
        batch = move_data_to_device(story_batch([story], self.frame_size, self.frame_fit), self.model.device)
        seed = self.seed if seed is None else int(seed)
        for update in self.model.stream_story(batch, seed=seed, num_candidates=int(num_candidates), **settings):
            yield update.index, update.frames[0].numpy()

    def grid(self, captions: Sequence[str], frames: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
        """The grid `task=sample` writes for a user story (no ground truth): frames [V, H, W, 3] under their captions,
        the given first frame in front for continuation. Several candidates [K, V, H, W, 3]: their grids one under
        the other (`stack_grids`)."""
        frames = np.asarray(frames)
        if frames.ndim == 5:
            grids = [self.grid(captions, candidate, source) for candidate in frames]
            return grids[0] if len(grids) == 1 else stack_grids(grids)
        story = self.story(captions, source)
        first = len(story.frames) - self.model.num_targets
        src = story.frames[0] if first > 0 else None
        shown = list(story.captions) if src is not None else list(story.captions[first:])
        return story_grid(None, frames, shown, source_frame=src)

    def save_grid(self, grid: np.ndarray) -> Path:
        self.grids += 1
        return save_png(grid, self.output_dir / "app" / f"story_grid_{self.grids:03d}.png")


def load_app(cfg: DictConfig) -> StoryApp:
    """The checkpoint's model (`ckpt_path`, or one built from `model.network.init_from_*`) on `app.device`, through
    the data-free path of task=sample with user captions (`use_checkpoint_model` + `use_checkpoint_data`)."""
    given = require_ckpt(cfg, allow_original=True)
    ckpt_path = use_checkpoint_model(cfg, given) if given else None
    use_checkpoint_data(cfg, ckpt_path)
    if cfg.get("seed") is not None:  # as build_without_data: the model is built as task=sample builds it
        L.seed_everything(cfg.seed, workers=True)
    apply_float32_matmul_precision(cfg)
    model = build_model(cfg)
    if ckpt_path:
        load_checkpoint_weights(model, ckpt_path)
    model.to(_device(str((cfg.get("app") or {}).get("device", "auto"))))
    model.eval()
    log.info("task=app: %s (%s, %d px) from %s", type(model).__name__, model.task, model.image_size,
             ckpt_path or "model.network.init_from_*")
    return StoryApp(cfg, model, Path(cfg.paths.output_dir))
