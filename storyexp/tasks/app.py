"""task=app: a browser demo of a checkpoint (Gradio).

    storyexp task=app ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt     # then open http://127.0.0.1:7860

The page takes five captions (and, for a continuation model, the first frame), the sampler settings of the
checkpoint's model on sliders (AR-LDM: steps, guidance scale, eta, scheduler; StoryDALL-E: top-k, top-p,
temperature, chain, supercondition factor for Mega) and a seed; the story appears frame by frame as the model draws
it, and the story grid `task=sample` writes can be downloaded as a PNG (also kept in <output_dir>/app/). The model
is loaded once, through the same data-free path as `task=sample sample.captions=...`: the checkpoint alone, no
dataset. For the same captions, seed and settings the page draws the frames task=sample draws.

Options (`app:` in storyexp/conf/config.yaml): host (127.0.0.1: this machine only), port, share (a public Gradio
link: off, and it needs the internet), open_browser, device (auto | cpu | cuda). Gradio is optional
(`pip install 'storyexp[app]'`); it runs offline (analytics off, system fonts, no share link).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("storyexp")


def serve(cfg: DictConfig, block: bool = True):
    """Load the model, build the page and launch it; returns (page, StoryApp, local url). With `block` (the task)
    it serves until interrupted; without (tests), Gradio serves from its own thread: `page.close()` stops it."""
    from storyexp.app.ui import build_ui, import_gradio, launch

    import_gradio()  # fails first, with the install line, when Gradio is missing
    from storyexp.app.model import load_app

    app = load_app(cfg)
    page = build_ui(app)
    grids = Path(cfg.paths.output_dir) / "app"
    grids.mkdir(parents=True, exist_ok=True)
    options = OmegaConf.to_container(cfg.app, resolve=True) if cfg.get("app") is not None else {}
    if not block:
        _, url, _ = launch(page, options, [str(grids)], block=False)
        return page, app, url
    log.info("task=app: serving on http://%s:%s (Ctrl+C stops it)", options.get("host"), options.get("port"))
    launch(page, options, [str(grids)], block=True)
    return page, app, None


def run(cfg: DictConfig) -> dict[str, float]:
    serve(cfg, block=True)
    return {}
