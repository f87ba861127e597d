"""task=sample with the user's own captions needs the checkpoint alone (issue 14 item 6): no dataset is read or
generated, the data facts the model was built from come from the checkpoint's record, and the frames equal those
sampled through the dataset's own data module (same seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storyexp.callbacks.model_record import DATA_RECORD, RECORD_KEY
from storyexp.tasks import run_task
from storyexp.tasks.common import build_all, use_checkpoint_model
from storyexp.tasks.sample import user_stories
from storyexp.tasks.validate import validate_config

from .conftest import TINY_DEMO, compose_cfg

QUIET = ["logger=none", "print_config=false", "callbacks=minimal", "+trainer.enable_progress_bar=false",
         "trainer=cpu"]
CAPTIONS = ["pip waves in the park .", "pip jumps .", "bo walks with gus .", "gus sleeps .", "mo dances ."]
CAPTIONS_ARG = "sample.captions=[" + ",".join(CAPTIONS) + "]"

# (model, task): the three families; AR-LDM also as a continuation model (sample.source_image)
CASES = [("arldm_tiny", "visualization"), ("arldm_tiny", "continuation"), ("mindalle_tiny", "continuation"),
         ("mega_tiny", "visualization")]


@pytest.fixture(scope="module")
def checkpoints(one_step_checkpoint) -> dict:
    """One tiny checkpoint per case (conftest's one_step_checkpoint: trained once per session)."""
    return {case: one_step_checkpoint(*case) for case in CASES}


@pytest.fixture(scope="module")
def source_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "frame0.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _source_args(task: str, source: Path) -> list[str]:
    return [f"sample.source_image={source}"] if task == "continuation" else []


def _sample_with_dataset(overrides: list[str], tmp: Path, data_dir: Path) -> np.ndarray:
    """The same stories sampled the way task=sample did before it learnt to do without data: the composed data
    module (dataset on disk, checked and set up) serving them. uint8 [V, H, W, 3]."""
    cfg = compose_cfg(overrides, tmp, data_dir=data_dir)
    validate_config(cfg)
    ckpt_path = use_checkpoint_model(cfg, cfg.ckpt_path)
    stories = user_stories(cfg)
    datamodule, model, trainer = build_all(cfg)
    datamodule.predict_on(stories)
    (batch,) = trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return batch["generated"][0].numpy()


def _written_frames(out: Path, first: int) -> np.ndarray:
    folder = out / "samples" / "story_000"
    return np.stack([np.asarray(Image.open(folder / f"frame_{first + k}.png").convert("RGB"))
                     for k in range(5 - first)])


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_user_captions_sample_from_the_checkpoint_alone(case, checkpoints, source_image, shared_data_dir, tmp_path):
    model, task = case
    ckpt = checkpoints[case]
    empty = tmp_path / "no_data"
    empty.mkdir()
    args = [*QUIET, "task=sample", f"ckpt_path={ckpt}", CAPTIONS_ARG, *_source_args(task, source_image)]
    cfg = compose_cfg(args, tmp_path / "free", data_dir=empty)
    run_task(cfg)
    out = Path(cfg.paths.output_dir)
    assert list(empty.iterdir()) == []  # nothing was generated or cached in the data folder
    assert (out / "samples" / "story_000.png").is_file()
    first = 1 if task == "continuation" else 0
    free = _written_frames(out, first)

    # the checkpoint's record holds the data facts the model was built from
    record = torch.load(ckpt, map_location="cpu", weights_only=True)[RECORD_KEY][DATA_RECORD]
    assert record["task"] == task and record["characters"] == ["pip", "bo", "gus", "yaz", "mo", "kiki"]
    assert record["name"] == "demo" and record["frame_size"] is None

    reference = _sample_with_dataset(TINY_DEMO + args + [f"data.task={task}"], tmp_path / "with_data", shared_data_dir)
    assert free.shape == reference.shape == (5 - first, free.shape[1], free.shape[1], 3)
    assert free.std() > 0  # real pixel content
    np.testing.assert_array_equal(free, reference)


def test_the_record_wins_over_another_composed_data_config(checkpoints, shared_data_dir, tmp_path):
    """A demo-trained model sampled under data=ssid (no SSID anywhere; other characters, caption length and task):
    the checkpoint's data facts build the model it was trained as, with the same frames."""
    case = ("arldm_tiny", "visualization")
    args = [*QUIET, "task=sample", f"ckpt_path={checkpoints[case]}", CAPTIONS_ARG]
    empty = tmp_path / "no_data"
    empty.mkdir()
    cfg = compose_cfg(["data=ssid", *args], tmp_path / "ssid", data_dir=empty)
    run_task(cfg)
    assert cfg.data.task == "visualization" and list(cfg.data.characters)[:2] == ["pip", "bo"]
    assert cfg.data.max_length == 16
    ssid = _written_frames(Path(cfg.paths.output_dir), 0)
    reference = _sample_with_dataset(TINY_DEMO + args + ["data.task=visualization"], tmp_path / "with_data",
                                     shared_data_dir)
    np.testing.assert_array_equal(ssid, reference)


def test_a_checkpoint_without_the_data_record_uses_the_composed_data_config(checkpoints, shared_data_dir, tmp_path):
    """Checkpoints written before the data record still sample (the composed data config fills in)."""
    case = ("arldm_tiny", "visualization")
    old = torch.load(checkpoints[case], map_location="cpu", weights_only=True)
    del old[RECORD_KEY][DATA_RECORD]
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    # as before the record: the data config must match the training run's (here, its task)
    args = [*QUIET, "task=sample", f"ckpt_path={path}", CAPTIONS_ARG, "data.task=visualization"]
    empty = tmp_path / "no_data"
    empty.mkdir()
    cfg = compose_cfg(TINY_DEMO + args, tmp_path / "old", data_dir=empty)
    run_task(cfg)
    assert list(empty.iterdir()) == []
    frames = _written_frames(Path(cfg.paths.output_dir), 0)
    reference = _sample_with_dataset(TINY_DEMO + args, tmp_path / "with_data", shared_data_dir)
    np.testing.assert_array_equal(frames, reference)
