"""The page of `task=app` (Gradio Blocks): five captions (and the first frame for a continuation model), the
checkpoint's sampler settings on sliders, a seed, Generate; the story appears frame by frame in a gallery as the
model draws it, and the story grid (`task=sample`'s, storyexp.callbacks.story_grid) is offered as a PNG download.

Offline by construction: analytics off (GRADIO_ANALYTICS_ENABLED=False, set before Gradio is imported), no share
link unless `app.share=true`, a theme with system fonts only (Gradio's default theme pulls Google Fonts from a CDN),
no server-side rendering (which needs a Node server).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from storyexp.app.model import StoryApp
from storyexp.data.story import N_FRAMES
from storyexp.errors import StoryexpError
from storyexp.utils.extras import require

FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def import_gradio():
    """Gradio with its analytics off (it reads the variable when imported)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    return require("gradio", extra="app", feature="task=app")


def offline_theme(gr):
    """Gradio's default look with system fonts (its default theme loads Google Fonts from their CDN)."""
    return gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)


def example_captions(app: StoryApp) -> list[str]:
    """Captions that use the checkpoint's own character names (so the demo fills in something the model knows)."""
    names = [str(c) for c in (app.cfg.get("data") or {}).get("characters") or []] or ["someone"]
    verbs = ["walks in the park", "waves", "jumps", "talks to", "sleeps"]
    out = []
    for i, verb in enumerate(verbs):
        name = names[i % len(names)]
        other = names[(i + 1) % len(names)]
        out.append(f"{name} {verb} {other} ." if verb == "talks to" else f"{name} {verb} .")
    return out


def gallery_items(app: StoryApp, frames: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
    """The gallery's images for the frames so far (per target frame: uint8 [K, H, W, 3]): candidate by candidate,
    each a row of its frames, labelled with the story frame number."""
    if not frames:
        return []
    k = frames[0].shape[0]
    items = []
    for c in range(k):
        for j, frame in enumerate(frames):
            label = f"frame {app.model.first_target + j + 1}" + (f" (candidate {c + 1})" if k > 1 else "")
            items.append((frame[c], label))
    return items


def build_ui(app: StoryApp):
    """The Blocks page for `app` (not launched)."""
    gr = import_gradio()
    targets = app.model.num_targets
    with gr.Blocks(title="storyexp story demo") as page:
        gr.Markdown(
            f"## storyexp story demo\n{app.model_name}, story {app.model.task}, {app.model.image_size} px frames. "
            + ("Upload the first frame and write five captions (the first describes it): the model draws frames "
               "2-5." if app.continuation else "Write five captions: the model draws one frame for each.")
        )
        with gr.Row():
            with gr.Column(scale=2):
                examples = example_captions(app)
                caption_boxes = [gr.Textbox(label=f"Caption {i + 1}", value=examples[i], elem_id=f"caption-{i + 1}",
                                            max_lines=2) for i in range(N_FRAMES)]
                source = gr.Image(label="First frame (story continuation)", type="numpy", sources=["upload"],
                                  visible=app.continuation, elem_id="source-frame", image_mode="RGB")
            with gr.Column(scale=1):
                seed = gr.Number(label="Seed", value=app.seed, precision=0, elem_id="seed")
                widgets = []
                with gr.Accordion("Sampler", open=True):
                    for c in app.controls:
                        if c.kind == "bool":
                            widgets.append(gr.Checkbox(label=c.label, value=c.value, elem_id=f"sampler-{c.key}"))
                        elif c.kind == "choice":
                            widgets.append(gr.Dropdown(label=c.label, choices=c.choices, value=c.value,
                                                       elem_id=f"sampler-{c.key}"))
                        else:
                            widgets.append(gr.Slider(label=c.label, minimum=c.minimum, maximum=c.maximum,
                                                     step=c.step, value=c.value, elem_id=f"sampler-{c.key}"))
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        gallery = gr.Gallery(label="Story", columns=targets, format="png", elem_id="story", height="auto",
                             object_fit="contain")
        grid_file = gr.File(label="Story grid (PNG)", elem_id="grid-file", interactive=False)

        def run(*values: Any):
            captions = list(values[:N_FRAMES])
            image, seed_value = values[N_FRAMES], values[N_FRAMES + 1]
            try:
                settings = app.settings(values[N_FRAMES + 2:])
                k = int(settings.pop("num_candidates", 1))
                frames: list[np.ndarray] = []  # per target frame: uint8 [K, H, W, 3]
                yield [], f"Generating frame 1 of {targets} ...", None
                for index, pixels in app.stream(captions, image, seed=seed_value, num_candidates=k, **settings):
                    if index is None:  # the whole stories [K, V, H, W, 3]: exactly task=sample's frames
                        grid = app.save_grid(app.grid(captions, pixels, image))
                        done = f"Done: {targets} frames" + (f" x {k} candidates" if k > 1 else "")
                        yield gallery_items(app, list(pixels.transpose(1, 0, 2, 3, 4))), \
                            f"{done} (seed {int(seed_value)}).", str(grid)
                        return
                    frames.append(pixels)
                    more = f"; generating frame {len(frames) + 1} of {targets} ..." if len(frames) < targets else ""
                    yield gallery_items(app, frames), f"{len(frames)} of {targets} frames{more}", None
            except StoryexpError as err:  # the user's to fix (a missing caption or first frame): shown on the page
                raise gr.Error(str(err)) from None

        # one story at a time: the model is shared and samples on one device
        generate.click(run, inputs=[*caption_boxes, source, seed, *widgets], outputs=[gallery, status, grid_file],
                       concurrency_limit=1)
    return page


def launch(page, options: dict[str, Any], allowed: list[str], block: bool = True):
    """Serve `page` on `app.host`:`app.port` (`app.*` options: share, open_browser); returns Gradio's
    (app, local url, share url). `block=False` returns at once (tests; the server runs in Gradio's thread)."""
    gr = import_gradio()
    return page.queue().launch(
        server_name=str(options.get("host", "127.0.0.1")),
        server_port=options.get("port"),
        share=bool(options.get("share", False)),
        inbrowser=bool(options.get("open_browser", False)),
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        ssr_mode=False,
        allowed_paths=allowed,
        theme=offline_theme(gr),
        footer_links=[],
    )
