"""task=sample: generate stories from a checkpoint and write them as PNGs.

Stories come from, in order of precedence:
    sample.captions=["...", ...]          one story given on the command line
    sample.captions_file=stories.txt      one caption per line, a blank line between stories
    sample.split=test sample.num_stories=8   the first stories of a split (ground truth drawn above)

For continuation the first frame is given: `sample.source_image=frame.png` for user captions (the
first caption is that frame's), or the split's own first frame.

User captions need nothing but the checkpoint: no dataset is read (or generated), and the data facts the model
was built from (task, character names, caption length, tokenizer words, frame size) come from the checkpoint's
record (`storyexp.callbacks.model_record`; a checkpoint from before that record uses the composed data config).

The model is the checkpoint's own; `ckpt_path` may also be an original AR-LDM `last.ckpt` or a released StoryDALL-E
`{epoch}.pth` (the composed model is built from it, tasks/original_checkpoints.py), and without `ckpt_path` the model
built from `model.network.init_from_*` samples as it is.

Output: <output_dir>/samples/story_XXX.png (grid: ground truth above generated, captions under each
frame) and story_XXX/frame_K.png (the generated frames at full resolution); further candidates of a story, for
models that draw several (`model.sampler.num_candidates`), go to story_XXX/candidate_C/frame_K.png.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from storyexp.callbacks.story_grid import save_png, story_grid
from storyexp.callbacks.wandb_run import log_samples
from storyexp.data import Story
from storyexp.data.story import N_FRAMES
from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.tasks.common import (
    build_all,
    build_without_data,
    require_ckpt,
    use_checkpoint_data,
    use_checkpoint_model,
)

log = logging.getLogger("storyexp")


def run(cfg: DictConfig) -> dict[str, float]:
    given = require_ckpt(cfg, allow_original=True)
    # an original checkpoint as ckpt_path is imported: the model is built from it and Lightning gets None
    ckpt_path = use_checkpoint_model(cfg, given) if given else None
    if wants_user_stories(cfg):
        # the user's own captions need the checkpoint alone: its recorded data facts, no dataset (build_without_data)
        use_checkpoint_data(cfg, ckpt_path)
    given = user_stories(cfg)  # checked before anything heavy is built
    datamodule, model, trainer = build_all(cfg) if given is None else build_without_data(cfg)
    if given is None:
        stories, has_truth = split_stories(cfg, datamodule), True
    else:
        stories, has_truth = given, False
    datamodule.predict_on(stories)
    predictions = trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    out_dir = Path(cfg.paths.output_dir) / "samples"
    # under DDP every process writes the stories of its own shard (distinct files, as Lightning's
    # BasePredictionWriter does); each story's file name is its position in `stories`
    write_samples(out_dir, stories, predictions or [], model.num_targets, has_truth)
    log_samples(cfg, trainer, out_dir, stories)  # the story grids to W&B, when a W&B logger is configured
    if trainer.is_global_zero:
        log.info("Story PNGs written to %s", out_dir)
    return {}


def split_stories(cfg: DictConfig, datamodule) -> Sequence[Story]:
    """The first `sample.num_stories` stories of `sample.split`."""
    return datamodule.first_stories(cfg.sample.get("split") or "test", cfg.sample.get("num_stories"))


def wants_user_stories(cfg: DictConfig) -> bool:
    """Whether the stories come from the user (`sample.captions` / `sample.captions_file`), not a split."""
    opts = cfg.get("sample") or {}
    return bool(opts.get("captions") or opts.get("captions_file"))


def user_stories(cfg: DictConfig) -> list[Story] | None:
    """Stories from `sample.captions` / `sample.captions_file` (None: sample a split), with the source image
    for continuation; every story must have one caption per frame."""
    opts = cfg.sample
    if opts.get("captions"):
        caption_sets = [list(opts.captions)]
    elif opts.get("captions_file"):
        caption_sets = read_captions_file(opts.captions_file)
    else:
        return None
    source_frame = None
    if str(cfg.model.task) == "continuation":
        if not opts.get("source_image"):
            raise ConfigurationError(
                "Story continuation needs the first frame: add sample.source_image=/path/to/frame.png "
                "(or sample with data.task=visualization)."
            )
        source_frame = read_image(opts.source_image)
    stories = []
    for i, captions in enumerate(caption_sets):
        where = "sample.captions" if opts.get("captions") else f"story {i} of {opts.captions_file}"
        hint = ", the first describing sample.source_image" if source_frame is not None else ""
        stories.append(caption_story(captions, source_frame, int(cfg.model.image_size), i, where, hint))
    return stories


def caption_story(captions: Sequence[str], source_frame: np.ndarray | None, image_size: int, index: int = 0,
                  where: str = "the story", hint: str = "") -> Story:
    """The story a user gives: its captions (one per frame), the given first frame for continuation, placeholder
    frames for the rest; id `user/<index>` (the id seeds the story's draws, so task=sample and task=app draw the
    same frames for the same story and seed)."""
    if len(captions) != N_FRAMES:
        raise ConfigurationError(f"{where} has {len(captions)} captions; stories have {N_FRAMES} frames: give "
                                 f"{N_FRAMES} captions{hint}.")
    size = source_frame.shape[0] if source_frame is not None else int(image_size)
    # frames the model generates are only placeholders: they stay masked until generated
    frames = [np.zeros((size, size, 3), np.uint8) for _ in range(N_FRAMES)]
    if source_frame is not None:
        frames[0] = source_frame
    return Story(id=f"user/{index}", captions=[str(c) for c in captions], frames=frames, labels=None)


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
        return square_crop(np.asarray(im.convert("RGB")))


def square_crop(image: np.ndarray) -> np.ndarray:
    """The central square of an RGB image (uint8 [H, W, 3])."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)
    side = min(image.shape[:2])  # square centre crop: the models generate square frames
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return np.ascontiguousarray(image[top:top + side, left:left + side])


def write_samples(out_dir: Path, stories: Sequence[Story], predictions: list[dict], n_targets: int,
                  has_truth: bool) -> None:
    """One grid and the frames per predicted story; models that draw several candidates per story
    (`model.sampler.num_candidates`) return them all: the first is `generated`, the others are written beside it
    as candidate_K/."""
    for batch in predictions:
        candidates = batch.get("candidates")
        for row, index in enumerate(batch["index"].tolist()):
            story, frames = stories[index], batch["generated"][row].cpu().numpy()
            first = len(story.frames) - n_targets
            source = story.frames[0] if first > 0 else None
            real = np.stack(story.frames[first:]) if has_truth else None
            captions = list(story.captions) if source is not None else list(story.captions[first:])
            folder = out_dir / f"story_{index:03d}"
            save_png(story_grid(real, frames, captions, source_frame=source), out_dir / f"story_{index:03d}.png")
            for k, frame in enumerate(frames):
                save_png(frame, folder / f"frame_{first + k}.png")
            others = [] if candidates is None else candidates[row, 1:].cpu().numpy()
            for c, candidate in enumerate(others, start=1):
                for k, frame in enumerate(candidate):
                    save_png(frame, folder / f"candidate_{c}" / f"frame_{first + k}.png")
