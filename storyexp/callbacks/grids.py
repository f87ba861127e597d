"""Story grids during training: sample the first validation stories every few epochs, save and log them."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from storyexp.callbacks.evaluation import log_image
from storyexp.callbacks.story_grid import save_png, stack_grids, story_grid


class StoryGridLogger(L.Callback):
    """Ground truth above generated, captions below; PNG in `dirpath` and an image in W&B/TensorBoard."""

    def __init__(self, dirpath: str, num_stories: int = 4, every_n_epochs: int = 1):
        self.dirpath = Path(dirpath)
        self.num_stories = int(num_stories)
        self.every_n_epochs = max(int(every_n_epochs), 1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0):
        if (batch_idx != 0 or self.num_stories <= 0 or trainer.sanity_checking or not trainer.is_global_zero
                or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        n = min(self.num_stories, batch["frames"].shape[0])
        sub = {k: (v[:n] if hasattr(v, "__getitem__") and v is not None else v) for k, v in batch.items()}
        with trainer.precision_plugin.forward_context():
            generated = pl_module.generate(sub).cpu().numpy()
        frames = sub["frames"].cpu().numpy()
        first = frames.shape[1] - generated.shape[1]
        grids = []
        for b in range(n):
            caps = list(sub["captions"][b])
            source = frames[b, 0] if first > 0 else None
            grids.append(story_grid(frames[b, first:], generated[b], caps if source is not None else caps[first:],
                                    source_frame=source))
        sheet = stack_grids(grids)
        save_png(sheet, self.dirpath / f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:07d}.png")
        log_image(trainer, "val/stories", sheet)
