"""task=app, the browser demo (issue 14 item 5): the streamed sampling behind the page (one update per frame, the
frames task=sample draws), its sampler controls and options, and the page itself in a real headless Chromium: five
captions typed, Generate clicked, the story's five frames shown and the story grid downloaded, pixel-equal to
task=sample's output for the same story and seed."""

from __future__ import annotations

import copy
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storyexp.errors import ConfigurationError
from storyexp.tasks import run_task
from storyexp.tasks.validate import validate_config

from .conftest import TINY_DEMO, compose_cfg
from .test_sample_without_data import CAPTIONS, CAPTIONS_ARG, QUIET

CHROMIUM = "/usr/bin/chromium"
# without the background-networking flags Chromium's own connections are refused by this machine's closed network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 60_000  # generous: the tiny model draws a story in about a second, a loaded CI machine is slower


@pytest.fixture(scope="module")
def arldm_ckpt(one_step_checkpoint) -> Path:
    return one_step_checkpoint("arldm_tiny", "visualization")


@pytest.fixture(scope="module")
def mindalle_ckpt(one_step_checkpoint) -> Path:
    return one_step_checkpoint("mindalle_tiny", "continuation")


@pytest.fixture(scope="module")
def source_frame(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("source") / "frame0.png"
    image = np.random.default_rng(1).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return path, image


def _sampled(ckpt: Path, tmp: Path, *extra: str) -> Path:
    """task=sample of CAPTIONS from the checkpoint alone; its samples/ folder."""
    empty = tmp / "no_data"
    empty.mkdir(parents=True, exist_ok=True)
    cfg = compose_cfg([*QUIET, "task=sample", f"ckpt_path={ckpt}", CAPTIONS_ARG, *extra], tmp / "sample",
                      data_dir=empty)
    run_task(cfg)
    return Path(cfg.paths.output_dir) / "samples"


def _frames(samples: Path, first: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(samples / "story_000" / f"frame_{k}.png").convert("RGB"))
                     for k in range(first, 5)])


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _app(ckpt: Path, tmp: Path, *extra: str):
    from storyexp.app.model import load_app

    empty = tmp / "no_data"
    empty.mkdir(parents=True, exist_ok=True)
    cfg = compose_cfg([*QUIET, "task=app", f"ckpt_path={ckpt}", *extra], tmp / "app", data_dir=empty)
    validate_config(cfg)
    return load_app(cfg)


@pytest.fixture(scope="module")
def arldm_app(arldm_ckpt, tmp_path_factory):
    return _app(arldm_ckpt, tmp_path_factory.mktemp("arldm_app"))


@pytest.fixture(scope="module")
def arldm_samples(arldm_ckpt, tmp_path_factory) -> Path:
    """task=sample of CAPTIONS at the checkpoint's settings and seed (what the page must show)."""
    return _sampled(arldm_ckpt, tmp_path_factory.mktemp("arldm_sample"))


# ------------------------------------------------------------------------------------------ without a browser


def test_stream_yields_each_frame_then_the_story_task_sample_draws(arldm_app, arldm_samples):
    app, samples = arldm_app, arldm_samples
    updates = list(app.stream(CAPTIONS))
    # AR-LDM draws frame by frame: one update per frame, in order, then the whole story
    assert [index for index, _ in updates] == [0, 1, 2, 3, 4, None]
    story = updates[-1][1][0]  # the first (only) candidate
    assert story.shape == (5, 32, 32, 3) and story.dtype == np.uint8 and story.std() > 0
    np.testing.assert_array_equal(np.stack([frame[0] for _, frame in updates[:-1]]), story)
    np.testing.assert_array_equal(story, _frames(samples, 0))
    # the grid offered for download is task=sample's grid of the same story
    np.testing.assert_array_equal(app.grid(CAPTIONS, story), _png(samples / "story_000.png"))


def test_a_stream_closed_early_stops_sampling_and_restores_the_model(arldm_app):
    """A page closed mid-story: the sampling thread stops at its next frame and the model samples as before."""
    import threading

    model = arldm_app.model
    stream = arldm_app.stream(CAPTIONS)
    index, _ = next(stream)
    assert index == 0
    stream.close()  # joins the sampling thread
    assert not [t for t in threading.enumerate() if t.name == "storyexp-stream"]
    assert model._frame_listener is None and "decode_latents" not in vars(model.net)
    assert [i for i, _ in arldm_app.stream(CAPTIONS)] == [0, 1, 2, 3, 4, None]


def test_slider_settings_reach_the_sampler(arldm_app, arldm_ckpt, tmp_path):
    app = arldm_app
    controls = {c.key: c for c in app.controls}
    assert set(controls) == {"num_inference_steps", "guidance_scale", "eta", "scheduler", "num_candidates"}
    assert controls["num_inference_steps"].value == 2 and controls["guidance_scale"].value == 6.0
    assert controls["scheduler"].value == "ddim" and "dpm" in controls["scheduler"].choices
    values = [{"num_inference_steps": 3, "guidance_scale": 2.5}.get(c.key, c.value) for c in app.controls]
    settings = app.settings(values)
    assert settings == {"num_inference_steps": 3, "guidance_scale": 2.5, "eta": 0.0, "scheduler": "ddim",
                        "num_candidates": 1}
    *_, (_, story) = app.stream(CAPTIONS, seed=7, **settings)
    samples = _sampled(arldm_ckpt, tmp_path, "seed=7", "model.sampler.num_inference_steps=3",
                       "model.sampler.guidance_scale=2.5")
    np.testing.assert_array_equal(story[0], _frames(samples, 0))


def test_continuation_streams_the_drawn_groups_from_the_uploaded_frame(mindalle_ckpt, source_frame, tmp_path,
                                                                       monkeypatch):
    path, image = source_frame
    app = _app(mindalle_ckpt, tmp_path)
    assert app.continuation
    assert {c.key for c in app.controls} == {"top_k", "top_p", "temperature", "chain", "num_candidates"}
    with pytest.raises(ConfigurationError, match="upload the first frame"):
        next(app.stream(CAPTIONS))
    # two candidates (the slider), as task=sample draws them with model.sampler.num_candidates=2
    updates = list(app.stream(CAPTIONS, image, num_candidates=2))
    # StoryDALL-E continuation draws frames 2-5 together: they arrive together, one update per frame
    assert [index for index, _ in updates] == [0, 1, 2, 3, None]
    stories = updates[-1][1]
    assert stories.shape == (2, 4, 16, 16, 3)
    np.testing.assert_array_equal(np.stack([frame for _, frame in updates[:-1]], axis=1), stories)
    samples = _sampled(mindalle_ckpt, tmp_path, f"sample.source_image={path}", "model.sampler.num_candidates=2")
    np.testing.assert_array_equal(stories[0], _frames(samples, 1))
    for k in range(4):
        np.testing.assert_array_equal(stories[1, k], _png(samples / "story_000" / "candidate_1" / f"frame_{k + 1}.png"))
    np.testing.assert_array_equal(app.grid(CAPTIONS, stories[0], image), _png(samples / "story_000.png"))
    assert app.grid(CAPTIONS, stories, image).shape[0] > 2 * app.grid(CAPTIONS, stories[0], image).shape[0]
    # what the sampler reports: one group of four frames; with chain (frame i attends to frame i-1) one at a time
    reports = []
    report = app.model.report_frames
    monkeypatch.setattr(app.model, "report_frames", lambda first, frames: reports.append(
        (first, frames.shape[2])) or report(first, frames))
    list(app.stream(CAPTIONS, image))
    assert reports == [(0, 4)]
    reports.clear()
    chain = [c.value if c.key != "chain" else True for c in app.controls]
    assert [index for index, _ in app.stream(CAPTIONS, image, **app.settings(chain))] == [0, 1, 2, 3, None]
    assert reports == [(0, 1), (1, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize("model", ["mindalle_tiny", "mega_tiny"])
def test_storydalle_visualization_reports_frame_one_then_the_rest(model, tmp_path):
    """Both StoryDALL-E backbones draw frame 1 from its caption alone, then frames 2-5 together attending to it: two
    reports, and the streamed stories are generate_candidates' (an untrained tiny model: no checkpoint needed)."""
    from storyexp.data.predict import story_batch
    from storyexp.tasks.common import build_model
    from storyexp.tasks.sample import caption_story

    cfg = compose_cfg(TINY_DEMO + [f"model={model}", "data.task=visualization"], tmp_path)
    system = build_model(cfg)
    batch = story_batch([caption_story(CAPTIONS, None, system.image_size)])
    reports = []
    report = system.report_frames
    system.report_frames = lambda first, frames: reports.append((first, tuple(frames.shape[:3]))) or report(
        first, frames)
    updates = list(system.stream_story(batch, seed=5, num_candidates=2))
    assert reports == [(0, (1, 2, 1)), (1, (1, 2, 4))]
    assert [u.index for u in updates] == [0, 1, 2, 3, 4, None]
    final = updates[-1].frames
    np.testing.assert_array_equal(final.numpy(), system.generate_candidates(batch, seed=5, num_candidates=2).numpy())
    np.testing.assert_array_equal(np.stack([u.frames.numpy() for u in updates[:-1]], axis=2), final.numpy())


def test_app_options_compose_and_are_checked(tmp_path):
    cfg = compose_cfg(["task=app", "ckpt_path=x.ckpt", "app.host=0.0.0.0", "app.port=8123", "app.share=false",
                       "app.open_browser=true", "app.device=cpu"], tmp_path)
    validate_config(cfg)
    assert dict(cfg.app) == {"host": "0.0.0.0", "port": 8123, "share": False, "open_browser": True, "device": "cpu"}
    default = compose_cfg(["task=app"], tmp_path)
    assert dict(default.app) == {"host": "127.0.0.1", "port": 7860, "share": False, "open_browser": False,
                                 "device": "auto"}
    with pytest.raises(ConfigurationError, match="task=app needs a checkpoint"):
        validate_config(default)
    for key, value, message in (("port", 0, "app.port=0 is not valid"), ("share", "maybe", "app.share='maybe'"),
                                ("device", "tpu", "app.device='tpu' is not valid"),
                                ("open_browser", 1, "app.open_browser=1 is not valid"), ("host", "", "app.host")):
        bad = copy.deepcopy(cfg)
        bad.app[key] = value
        with pytest.raises(ConfigurationError, match=message):
            validate_config(bad)


def test_missing_gradio_is_one_line_naming_the_extra(monkeypatch):
    from storyexp.app import ui
    from storyexp.utils import extras

    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigurationError, match=r"task=app needs the gradio package: pip install 'storyexp\[app\]'"):
        ui.import_gradio()


# ------------------------------------------------------------------------------------------ in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, tries: int = 100) -> None:
    """Poll the page (bounded): ready once it answers 200."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the app did not answer at {url} after {tries} tries")


@pytest.fixture()
def served(arldm_ckpt, tmp_path):
    from storyexp.tasks.app import serve

    empty = tmp_path / "no_data"
    empty.mkdir()
    port = _free_port()
    cfg = compose_cfg([*QUIET, "task=app", f"ckpt_path={arldm_ckpt}", f"app.port={port}", "app.device=cpu"],
                      tmp_path / "app", data_dir=empty)
    validate_config(cfg)
    page, app, url = serve(cfg, block=False)
    try:
        assert url.startswith(f"http://127.0.0.1:{port}")
        _wait_until_served(url)
        yield url, app
    finally:
        page.close()


def test_the_page_streams_the_story_and_offers_the_grid(served, arldm_samples, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup_browser.sh (installs Debian's chromium) first.")
    from playwright.sync_api import expect, sync_playwright

    url, app = served
    samples = arldm_samples  # the same story through task=sample
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(url)
            for i, caption in enumerate(CAPTIONS, start=1):
                box = page.locator(f"#caption-{i} textarea")
                box.fill(caption)
            expect(page.locator("#sampler-num_inference_steps input[type=number]")).to_have_value("2")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("Done: 5 frames", timeout=UI_TIMEOUT_MS)
            images = page.locator("#story img")
            expect(images).to_have_count(5, timeout=UI_TIMEOUT_MS)
            # the gallery's frames are task=sample's frames, pixel for pixel
            want = _frames(samples, 0)
            assert want.std() > 0  # real pixel content
            for k in range(5):
                response = page.request.get(images.nth(k).get_attribute("src"))
                assert response.ok
                shown = tmp_path / f"shown_{k}.png"
                shown.write_bytes(response.body())
                np.testing.assert_array_equal(_png(shown), want[k])
            # the grid download is task=sample's grid
            link = page.locator("#grid-file a").first
            expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
            with page.expect_download(timeout=UI_TIMEOUT_MS) as info:
                link.click()
            grid = tmp_path / "downloaded.png"
            info.value.save_as(grid)
            np.testing.assert_array_equal(_png(grid), _png(samples / "story_000.png"))
        finally:
            browser.close()
    assert sorted(p.name for p in (app.output_dir / "app").iterdir()) == ["story_grid_001.png"]

