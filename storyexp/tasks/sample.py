"""task=sample: generate stories from a checkpoint and write them as PNGs.

Stories come from, in order of precedence:
    sample.captions=["...", ...]          one story given on the command line
    sample.captions_file=stories.txt      one caption per line, a blank line between stories
    sample.split=test sample.num_stories=8   the first stories of a split (ground truth drawn above)

For continuation the first frame is given: `sample.source_image=frame.png` for user captions (the
first caption is that frame's), or the split's own first frame.

Output: <output_dir>/samples/story_XXX.png (grid: ground truth above generated, captions under each
frame) and story_XXX/frame_K.png (the generated frames at full resolution); further candidates of a story, for
models that draw several (`model.sampler.num_candidates`), go to story_XXX/candidate_C/frame_K.png.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from storyexp.callbacks.story_grid import save_png, story_grid
from storyexp.data import Story
from storyexp.data.datamodule import StoryItems, collate_stories
from storyexp.errors import ConfigurationError, MissingResourceError


def run_sampling(cfg: DictConfig, datamodule, model: L.LightningModule, trainer: L.Trainer, ckpt_path: str) -> Path:
    stories, has_truth = sample_stories(cfg, datamodule, model)
    batch_size = max(1, min(len(stories), int(getattr(datamodule, "per_device_batch_size", 1) or 1)))
    loader = DataLoader(StoryItems(stories), batch_size=batch_size, shuffle=False, collate_fn=collate_stories)
    predictions = trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
    out_dir = Path(cfg.paths.output_dir) / "samples"
    if trainer.is_global_zero:
        write_samples(out_dir, stories, predictions or [], model.num_targets, has_truth)
    return out_dir


def sample_stories(cfg: DictConfig, datamodule, model) -> tuple[list[Story], bool]:
    opts = cfg.sample
    n_frames = model.num_frames
    caption_sets = None
    if opts.get("captions"):
        caption_sets = [list(opts.captions)]
    elif opts.get("captions_file"):
        caption_sets = read_captions_file(opts.captions_file)
    if caption_sets is None:
        split = opts.get("split") or "test"
        source = datamodule.stories(split)
        n = min(int(opts.get("num_stories") or len(source)), len(source))
        return [source[i] for i in range(n)], True

    source_frame = None
    if model.task == "continuation":
        if not opts.get("source_image"):
            raise ConfigurationError(
                "Story continuation needs the first frame: add sample.source_image=/path/to/frame.png "
                "(or sample with data.task=visualization)."
            )
        source_frame = read_image(opts.source_image)
    size = source_frame.shape[0] if source_frame is not None else model.image_size
    stories = []
    for i, captions in enumerate(caption_sets):
        if len(captions) != n_frames:
            raise ConfigurationError(
                f"Story {i} has {len(captions)} captions; this model generates {n_frames}-frame stories "
                f"(give {n_frames} captions{', the first describing the source image' if source_frame is not None else ''})."
            )
        # frames the model generates are only placeholders: they stay masked until generated
        frames = [np.zeros((size, size, 3), np.uint8) for _ in range(n_frames)]
        if source_frame is not None:
            frames[0] = source_frame
        stories.append(Story(id=f"user/{i}", captions=[str(c) for c in captions], frames=frames, labels=None))
    return stories, False


def read_captions_file(path: str) -> list[list[str]]:
    p = Path(path)
    if not p.is_file():
        raise MissingResourceError("Captions file (sample.captions_file)", path,
                                   "Write one caption per line and a blank line between stories.")
    stories, current = [], []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            stories.append(current)
            current = []
    if current:
        stories.append(current)
    if not stories:
        raise ConfigurationError(f"Captions file {path} holds no captions.")
    return stories


def read_image(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise MissingResourceError("Source image (sample.source_image)", path)
    with Image.open(p) as im:
        image = np.asarray(im.convert("RGB"))
    side = min(image.shape[:2])  # square centre crop: the models generate square frames
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return np.ascontiguousarray(image[top:top + side, left:left + side])


def write_samples(out_dir: Path, stories: list[Story], predictions: list[dict], n_targets: int, has_truth: bool) -> None:
    generated = [g for batch in predictions for g in batch["generated"].cpu().numpy()]
    # models that draw several candidates per story (model.sampler.num_candidates) return them all; the first is
    # `generated`, the others are written beside it as candidate_K/
    candidates = [c for batch in predictions if "candidates" in batch for c in batch["candidates"].cpu().numpy()]
    for i, (story, frames) in enumerate(zip(stories, generated)):
        first = len(story.frames) - n_targets
        source = story.frames[0] if first > 0 else None
        real = np.stack(story.frames[first:]) if has_truth else None
        captions = list(story.captions) if source is not None else list(story.captions[first:])
        save_png(story_grid(real, frames, captions, source_frame=source), out_dir / f"story_{i:03d}.png")
        for k, frame in enumerate(frames):
            save_png(frame, out_dir / f"story_{i:03d}" / f"frame_{first + k}.png")
        for c, others in enumerate(candidates[i][1:] if i < len(candidates) else [], start=1):
            for k, frame in enumerate(others):
                save_png(frame, out_dir / f"story_{i:03d}" / f"candidate_{c}" / f"frame_{first + k}.png")
