"""Tests of storyexp.data: Story records, the ARLDM HDF5 layout, the demo story set and the data module."""

from __future__ import annotations

import functools
import io
import json
import logging
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import storyexp.data as sd
from storyexp.data import (
    DEMO_CHARACTERS,
    HDF5Stories,
    Story,
    StoryDataError,
    StoryDataModule,
    ensure_demo_dataset,
    load_stories,
    write_stories_hdf5,
)
from storyexp.data.demo import DEMO_COLOURS, DEMO_SCENES, PAIR_ACTIONS, SINGLE_ACTIONS, generate_demo_stories
from storyexp.errors import ConfigurationError
from tests.data_paths import fixtures_dir

REPO = Path(__file__).resolve().parents[1]
FIXTURES = fixtures_dir()
DEMO_KW = dict(seed=7, n_train=24, n_val=6, n_test=8, resolution=64)



@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo.h5", **DEMO_KW)


@pytest.fixture(scope="module")
def demo_stories() -> dict[str, list[Story]]:
    return generate_demo_stories(**DEMO_KW)


def _story(i: int = 0, size=(8, 8), labels=True, n_chars=3) -> Story:
    rng = np.random.default_rng(i)
    frames = [rng.integers(0, 256, size=(*size, 3), dtype=np.uint8) for _ in range(5)]
    lab = (rng.random((5, n_chars)) < 0.5).astype(np.float32) if labels else None
    return Story(id=f"s{i}", captions=[f"caption {i}.{j} with ünïcode" for j in range(5)], frames=frames, labels=lab)


# ------------------------------------------------------------------------------------------------ demo


def test_demo_determinism_same_seed_identical_other_seed_differs(tmp_path, demo_stories):
    again = generate_demo_stories(**DEMO_KW)
    for split in ("train", "val", "test"):
        assert len(again[split]) == DEMO_KW[f"n_{split}"]
        assert again[split] == demo_stories[split]
    other = generate_demo_stories(**{**DEMO_KW, "seed": 8})
    assert other["train"] != demo_stories["train"]
    assert any(
        not np.array_equal(a, b) for s, t in zip(other["train"], demo_stories["train"]) for a, b in zip(s.frames, t.frames)
    )
    # a story depends only on (seed, split, index): more training stories only append
    longer = generate_demo_stories(**{**DEMO_KW, "n_train": 30, "n_val": 0, "n_test": 0})
    assert longer["train"][:24] == demo_stories["train"]
    # identical parameters -> byte-identical files
    a = ensure_demo_dataset(tmp_path / "a.h5", **{**DEMO_KW, "n_train": 5, "n_val": 2, "n_test": 2})
    b = ensure_demo_dataset(tmp_path / "b.h5", **{**DEMO_KW, "n_train": 5, "n_val": 2, "n_test": 2})
    assert a.read_bytes() == b.read_bytes()


def test_demo_story_structure(demo_stories):
    scene_phrases = [v[0] for v in DEMO_SCENES.values()]
    actions = SINGLE_ACTIONS + PAIR_ACTIONS
    for split, stories in demo_stories.items():
        for story in stories:
            assert story.id.startswith(f"demo-{split}-")
            assert len(story.frames) == 5 and len(story.captions) == 5
            assert story.labels.shape == (5, len(DEMO_CHARACTERS)) and story.labels.dtype == np.float32
            assert set(np.unique(story.labels)) <= {0.0, 1.0}
            per_frame = story.labels.sum(1)
            assert per_frame.min() >= 1 and per_frame.max() <= 2
            assert 2 <= int((story.labels.sum(0) > 0).sum()) <= 4
            phrases = {p for c in story.captions for p in scene_phrases if c.endswith(p + ".")}
            assert len(phrases) == 1, story.captions  # one scene per story
            for frame, caption, lab in zip(story.frames, story.captions, story.labels):
                assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
                words = re.findall(r"[a-z]+", caption)
                named = [w for w in words if w in DEMO_CHARACTERS]
                labelled = [DEMO_CHARACTERS[k] for k in np.flatnonzero(lab)]
                assert sorted(named) == sorted(labelled), (caption, labelled)
                assert len(set(named)) == len(named)
                assert any(f" {a} " in caption for a in actions), caption


def _colour_mask(frame: np.ndarray, name: str, tol: int = 12) -> np.ndarray:
    return (np.abs(frame.astype(int) - np.array(DEMO_COLOURS[name])).max(-1) <= tol)


def test_demo_frames_show_exactly_the_labelled_characters_without_overlap(demo_stories):
    stories = demo_stories["train"] + demo_stories["test"]
    for story in stories:
        for frame, caption, lab in zip(story.frames, story.captions, story.labels):
            for k, name in enumerate(DEMO_CHARACTERS):
                mask = _colour_mask(frame, name)
                if lab[k]:
                    assert mask.sum() >= 0.3 * (0.4 * 64) ** 2, (story.id, caption, name)
                else:
                    assert mask.sum() == 0, (story.id, caption, name)
            named = [w for w in re.findall(r"[a-z]+", caption) if w in DEMO_CHARACTERS]
            if len(named) == 2:  # first named is in the left half, second in the right half
                left, right = _colour_mask(frame, named[0]), _colour_mask(frame, named[1])
                assert not left[:, 32:].any() and not right[:, :32].any(), (story.id, caption)


def test_demo_characters_move_smoothly(demo_stories):
    steps = []
    for story in demo_stories["train"]:
        for f in range(4):
            a, b = story.labels[f], story.labels[f + 1]
            if a.sum() == 1 and b.sum() == 1 and np.array_equal(a, b):  # same character alone in both
                name = DEMO_CHARACTERS[int(np.flatnonzero(a)[0])]
                c0, c1 = (np.argwhere(_colour_mask(story.frames[g], name)).mean(0) for g in (f, f + 1))
                steps.append(np.abs(c1 - c0).max())
    assert steps and max(steps) <= 0.2 * (64 - 26 - 4) + 1.5  # a fifth of the free range per frame


def test_demo_characters_are_distinct_at_32px():
    stories = generate_demo_stories(seed=1, n_train=10, n_val=0, n_test=0, resolution=32)["train"]
    for story in stories:
        for frame, lab in zip(story.frames, story.labels):
            assert frame.shape == (32, 32, 3)
            for k, name in enumerate(DEMO_CHARACTERS):
                assert bool(_colour_mask(frame, name).sum() >= 8) == bool(lab[k])


def test_ensure_demo_dataset_reuses_regenerates_and_protects(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="storyexp.data.demo")

    def announced() -> str:  # one line, on the log when logging is set up, else on stderr
        text = capsys.readouterr().err + caplog.text
        caplog.clear()
        return text

    p = tmp_path / "sub" / "demo.h5"
    kw = dict(seed=1, n_train=3, n_val=1, n_test=2, resolution=32)
    ensure_demo_dataset(p, **kw)
    assert "generated demo story set" in announced()
    with h5py.File(p) as f:
        assert f.attrs["demo_seed"] == 1 and f.attrs["demo_n_train"] == 3 and f.attrs["demo_resolution"] == 32
        assert "demo_generator_version" in f.attrs
        assert json.loads(f.attrs["characters"]) == list(DEMO_CHARACTERS)
    stat = p.stat()
    ensure_demo_dataset(p, **kw)  # same parameters: untouched
    assert p.stat().st_mtime_ns == stat.st_mtime_ns and announced() == ""
    ensure_demo_dataset(p, **{**kw, "n_train": 4})  # changed: regenerated
    assert "parameters changed" in announced()
    assert len(HDF5Stories(p, "train")) == 4
    assert not [q for q in p.parent.iterdir() if q.name != "demo.h5"]  # no temp files left
    foreign = tmp_path / "foreign.h5"
    write_stories_hdf5(foreign, {"train": [_story()]})
    before = foreign.read_bytes()
    with pytest.raises(FileExistsError, match="not a storyexp demo dataset"):
        ensure_demo_dataset(foreign, **kw)
    assert foreign.read_bytes() == before


# ------------------------------------------------------------------------------------------ HDF5 layout


def test_round_trip_write_read(tmp_path):
    stories = {"train": [_story(i) for i in range(3)], "val": [_story(9, size=(16, 8))], "test": []}
    p = write_stories_hdf5(tmp_path / "x.h5", stories, characters=["a", "b", "c"], attrs={"note": {"k": 1}})
    for split, expected in stories.items():
        ds = HDF5Stories(p, split)
        assert len(ds) == len(expected) and ds.text_key == "text"
        assert list(ds) == expected
    ds = HDF5Stories(p, "train")
    assert ds.characters == ["a", "b", "c"] and ds.n_characters == 3
    assert json.loads(ds.attrs["note"]) == {"k": 1}
    assert ds[-1] == stories["train"][-1]
    with pytest.raises(IndexError):
        ds[3]
    # stories without labels, other text key
    q = write_stories_hdf5(tmp_path / "y.h5", {"train": [_story(1, labels=False)]}, text_key="ssid")
    ds = HDF5Stories(q, "train")
    assert ds.text_key == "ssid" and ds[0].labels is None and ds[0] == _story(1, labels=False)


def test_channel_order_matches_arldm_quirk(tmp_path):
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    story = Story("red", [f"c{j}" for j in range(5)], [red] * 5)
    p = write_stories_hdf5(tmp_path / "red.h5", {"train": [story]})
    back = HDF5Stories(p, "train")[0].frames[0]
    assert back.shape == (4, 6, 3) and (back[..., 0] == 255).all() and (back[..., 1:] == 0).all()
    with h5py.File(p) as f:  # on disk it is channel-swapped, like ARLDM's files: a standard decoder sees blue
        raw = bytes(f["train"]["image0"][0])
        assert f["train"]["image0"].dtype == h5py.vlen_dtype(np.uint8)
        assert h5py.check_string_dtype(f["train"]["text"].dtype).encoding == "utf-8"
    pil = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert (pil[..., 2] == 255).all() and (pil[..., :2] == 0).all()


def test_hdf5_stories_pickle_and_worker_processes(demo_file, demo_stories):
    ds = HDF5Stories(demo_file, "val")
    first = ds[0]  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handle is None and clone[0] == first == demo_stories["val"][0]
    loader = torch.utils.data.DataLoader(
        sd.datamodule.StoryItems(ds), batch_size=2, num_workers=2, collate_fn=sd.collate_stories
    )
    ids = [i for batch in loader for i in batch["ids"]]
    assert ids == [s.id for s in demo_stories["val"]]


def _write_and_edit(tmp_path, edit) -> Path:
    p = write_stories_hdf5(tmp_path / "bad.h5", {"train": [_story(i) for i in range(3)]})
    with h5py.File(p, "a") as f:
        edit(f["train"])
    return p


def _assert_names(msg: str, path: Path, *parts: str) -> None:
    for part in (str(path), *parts):
        assert part in msg, (part, msg)


def test_error_corrupt_png(tmp_path):
    def edit(g):
        g["image2"][1] = np.frombuffer(b"\x89PNG definitely not a png", np.uint8)

    p = _write_and_edit(tmp_path, edit)
    ds = HDF5Stories(p, "train")
    ds[0]
    with pytest.raises(StoryDataError) as e:
        ds[1]
    _assert_names(str(e.value), p, "'train'", "story 1", "'image2'", "decoded")
    assert (e.value.split, e.value.index, e.value.field) == ("train", 1, "image2")
    assert pickle.loads(pickle.dumps(e.value)).field == "image2"


def test_error_missing_image_dataset(tmp_path):
    p = _write_and_edit(tmp_path, lambda g: g.__delitem__("image3"))
    with pytest.raises(StoryDataError) as e:
        HDF5Stories(p, "train")
    _assert_names(str(e.value), p, "'train'", "story 0..2", "'image3'", "missing")


def test_error_wrong_caption_count(tmp_path):
    def edit(g):
        g["text"][2] = "only|four|captions|here"

    p = _write_and_edit(tmp_path, edit)
    with pytest.raises(StoryDataError) as e:
        HDF5Stories(p, "train")[2]
    _assert_names(str(e.value), p, "'train'", "story 2", "'text'", "expected 5 captions", "got 4")


def test_error_missing_file_split_and_text(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        HDF5Stories(missing, "train")
    p = write_stories_hdf5(tmp_path / "ok.h5", {"train": [_story()]})
    with pytest.raises(StoryDataError) as e:
        HDF5Stories(p, "val")
    _assert_names(str(e.value), p, "'val'", "missing")
    with pytest.raises(StoryDataError) as e:
        HDF5Stories(p, "train", text_key="dii")
    _assert_names(str(e.value), p, "'train'", "'dii'")


def test_writer_rejects_bad_stories(tmp_path):
    bad = _story(0)
    bad.captions[1] = "a|b"
    with pytest.raises(StoryDataError, match=r"story 0 .*'captions'.*separator"):
        write_stories_hdf5(tmp_path / "w.h5", {"train": [bad]})
    short = _story(1)
    short.frames = short.frames[:4]
    with pytest.raises(StoryDataError, match=r"'frames'.*expected 5 frames"):
        write_stories_hdf5(tmp_path / "w.h5", {"train": [_story(0), short]})
    with pytest.raises(StoryDataError, match="'labels'"):
        write_stories_hdf5(tmp_path / "w.h5", {"train": [_story(0), _story(1, labels=False)]})
    assert not list(tmp_path.iterdir())  # nothing (not even a temp file) left behind


# ---------------------------------------------------------------------------- fixtures written by ARLDM


@pytest.mark.parametrize(
    "dataset,filename", [("pororo", "pororo.h5"), ("flintstones", "flintstones.h5"), ("ssid", "ssid.hdf5")]
)
def test_reads_files_written_by_arldm_scripts(dataset, filename):
    expected = json.loads((FIXTURES / "expected" / f"arldm_{dataset}.json").read_text())
    arrays = np.load(FIXTURES / "expected" / f"arldm_{dataset}.npz")
    path = FIXTURES / "h5" / filename
    for split, rows in expected["splits"].items():
        ds = HDF5Stories(path, split)  # frames as stored (whole strips / clips)
        picked = load_stories(dataset, path, split)  # one frame chosen per strip, deterministically
        assert ds.text_key == expected["text_dataset"]
        assert len(ds) == len(rows)
        for row in rows:
            story = ds[row["row"]]
            assert story.captions == row["texts"]
            assert [list(f.shape) for f in story.frames] == row["image_shapes"]
            assert story.labels is None
            chosen = picked[row["row"]]
            assert chosen.captions == story.captions
            for j, frame in enumerate(story.frames):
                assert frame.dtype == np.uint8
                np.testing.assert_array_equal(frame, arrays[f"{split}/{row['row']}/image{j}"])
                if dataset in ("pororo", "flintstones"):  # 128-px frames stacked vertically
                    options = [frame[k : k + 128] for k in range(0, frame.shape[0], 128)]
                    assert any(np.array_equal(chosen.frames[j], o) for o in options)
                else:
                    np.testing.assert_array_equal(chosen.frames[j], frame)
    ex = expected["channel_order_example"]
    frame = HDF5Stories(path, ex["split"])[ex["row"]].frames[ex["frame"]]
    y, x = ex["pixel_yx"]
    assert frame[y, x].tolist() == ex["source_rgb"] == ex["cv2_imdecode"]


# -------------------------------------------------------------------------------------- load_stories


def test_load_stories_entry_point(tmp_path, demo_file, monkeypatch):
    assert [s.id for s in load_stories("demo", demo_file, "test")] == [f"demo-test-{i:05d}" for i in range(8)]
    with pytest.raises(ValueError, match="demo, pororo, flintstones, ssid"):
        load_stories("vist", demo_file)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):  # a folder without the raw layout's files
        load_stories("pororo", tmp_path)
    with pytest.raises(FileNotFoundError, match="flintstones.*nope.h5"):
        load_stories("flintstones", tmp_path / "nope.h5")
    small = functools.partial(sd.demo.ensure_demo_dataset, n_train=2, n_val=1, n_test=1, resolution=32)
    monkeypatch.setattr(sd.demo, "ensure_demo_dataset", small)  # what the demo spec's generator calls
    fresh = load_stories("demo", tmp_path / "new" / "demo.h5", "val")  # missing demo file: generated
    assert len(fresh) == 1 and fresh[0].frames[0].shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------ datamodule


def _dm(path, **kw) -> StoryDataModule:
    args = dict(name="demo", path=path, characters=list(DEMO_CHARACTERS), batch_size=4, demo=DEMO_KW)
    args.update(kw)
    return StoryDataModule(**args)


def test_datamodule_batches(demo_file, demo_stories):
    dm = _dm(demo_file)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (4, 5, 64, 64, 3)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, 5, 6)
    assert batch["index"].dtype == torch.long and batch["index"].shape == (4,)
    assert len(batch["captions"]) == 4 and all(len(c) == 5 and isinstance(c[0], str) for c in batch["captions"])
    for k, i in enumerate(batch["index"].tolist()):  # batch content is the story at `index`
        ref = demo_stories["train"][i]
        assert batch["ids"][k] == ref.id and batch["captions"][k] == ref.captions
        assert np.array_equal(batch["frames"][k].numpy(), np.stack(ref.frames))
        assert np.array_equal(batch["labels"][k].numpy(), ref.labels)
    val = [b for b in dm.val_dataloader()]
    assert [i for b in val for i in b["index"].tolist()] == list(range(6))  # not shuffled
    assert [b["frames"].shape[0] for b in val] == [4, 2]
    dm.setup("test")
    assert [i for b in dm.predict_dataloader() for i in b["ids"]] == [s.id for s in demo_stories["test"]]
    torch.manual_seed(0)
    order1 = [i for b in dm.train_dataloader() for i in b["index"].tolist()]
    torch.manual_seed(0)
    order2 = [i for b in dm.train_dataloader() for i in b["index"].tolist()]
    assert order1 == order2 and sorted(order1) == list(range(24)) and order1 != list(range(24))


def test_datamodule_global_batch_size_and_limits(demo_file):
    dm = _dm(demo_file, batch_size=6, limit_train=10, limit_val=3, limit_test=5)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert dm.per_device_batch_size == 3
    batches = list(dm.train_dataloader())
    assert sum(b["frames"].shape[0] for b in batches) == 10 and max(b["frames"].shape[0] for b in batches) == 3
    assert len(dm.stories("val")) == 3
    dm.setup("test")
    assert [i for b in dm.test_dataloader() for i in b["index"].tolist()] == list(range(5))
    bad = _dm(demo_file, batch_size=6)
    bad.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ConfigurationError, match=r"data.batch_size=6 \(the global batch\) is not divisible"):
        bad.setup("fit")
    with pytest.raises(ValueError, match="known datasets"):
        StoryDataModule(name="coco", path=demo_file)


def test_datamodule_generates_demo_and_checks_characters(tmp_path):
    p = tmp_path / "gen" / "demo.h5"
    small = dict(seed=2, n_train=4, n_val=2, n_test=2, resolution=32)
    dm = _dm(None, generated_path=p, demo=small, batch_size=2)  # path unset: the generated set
    dm.prepare_data()
    assert p.exists()
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["frames"].shape == (2, 5, 32, 32, 3)
    wrong = _dm(p, demo=small, characters=list(reversed(DEMO_CHARACTERS)))
    with pytest.raises(StoryDataError, match="'characters'"):
        wrong.setup("fit")


def test_datamodule_missing_file_and_frame_sizes(tmp_path):
    hint = "Download pororo.zip from the StoryDALL-E README and run scripts/convert_pororo.py."
    dm = StoryDataModule(name="pororo", path=tmp_path / "pororo.h5", characters=[], batch_size=2, missing_hint=hint)
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("fit")
    _assert_names(str(e.value), tmp_path / "pororo.h5", "pororo", "missing", hint)
    # Pororo strips are split into their 128-px frames, so a batch stacks
    dm = StoryDataModule(name="pororo", path=FIXTURES / "h5" / "pororo.h5", batch_size=2)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["frames"].shape[2:] == (128, 128, 3)
    # SSID images come in several sizes: stacking is a clear error unless frame_size is set
    dm = StoryDataModule(name="ssid", path=FIXTURES / "h5" / "ssid.hdf5", batch_size=2)
    dm.setup("fit")
    with pytest.raises(ValueError, match="different sizes.*frame_size"):
        next(iter(dm.train_dataloader()))
    dm = StoryDataModule(name="flintstones", path=FIXTURES / "h5" / "flintstones.h5", batch_size=2, frame_size=32)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["frames"].shape == (1, 5, 32, 32, 3) and batch["labels"] is None


@pytest.mark.parametrize("dataset", ["pororo", "flintstones", "ssid"])
def test_raw_directories_are_detected_and_batched(dataset):
    root = FIXTURES / "raw" / dataset
    stories = load_stories(dataset, root, "val")
    assert type(stories).__name__.lower().startswith(dataset[:4]) and len(stories) > 0
    assert all(len(s.frames) == 5 and len(s.captions) == 5 for s in stories)
    dm = StoryDataModule(name=dataset, path=root, batch_size=2, frame_size=32,
                         frame_choice={"train": "random", "eval": "fixed"})
    dm.check_available()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["frames"].shape[1:] == (5, 32, 32, 3) and batch["frames"].dtype == torch.uint8
    # eval frames are the same on every read (fixed rule); training frames may vary
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["frames"], again["frames"])
    with pytest.raises(ValueError, match="frame_choice"):
        StoryDataModule(name=dataset, path=root, frame_choice={"train": "sometimes", "eval": "fixed"})


def test_demo_is_generated_only_at_its_default_path(tmp_path):
    """`data=demo` generates into the data folder; a `data.path` of one's own is read, never written."""
    import hydra

    from storyexp.errors import MissingResourceError
    from tests.conftest import compose_cfg

    small = ["data.demo.n_train=4", "data.demo.n_val=2", "data.demo.n_test=2", "data.demo.resolution=16"]

    def build(*overrides: str) -> tuple[StoryDataModule, Path]:
        cfg = compose_cfg(["data=demo", *small, *overrides], tmp_path)
        return hydra.utils.instantiate(cfg.data, _convert_="all"), Path(cfg.data.generated_path)

    dm, default = build()
    assert dm.generates and dm.path == default and default.is_relative_to(tmp_path / "data")
    dm.check_available()  # nothing to check yet: it is generated in prepare_data
    dm.prepare_data()
    assert default.is_file()
    dm.setup("fit")
    assert len(dm.stories("train")) == 4
    removed, _ = build("~data.path")  # data.path removed: the same generated set
    assert removed.generates and removed.path == default

    wrong = tmp_path / "nonexistent" / "demo.h5"
    dm, _ = build(f"data.path={wrong}")
    assert not dm.generates
    dm.prepare_data()  # generates nothing
    for call in (dm.check_available, lambda: dm.setup("fit")):
        with pytest.raises(MissingResourceError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(wrong) in msg
        assert f"remove data.path to generate the demo set in {default}, or point it at an existing file" in msg
    assert not (tmp_path / "nonexistent").exists()

    mine = tmp_path / "mine.h5"  # an existing demo file of one's own: read as it is
    mine.write_bytes(default.read_bytes())
    before = mine.stat().st_mtime_ns
    dm, _ = build(f"data.path={mine}")
    dm.check_available()
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.stories("train")) == 4
    other, _ = build(f"data.path={mine}", "data.demo.n_val=3")  # generated with other parameters: an error
    other.prepare_data()
    with pytest.raises(StoryDataError, match="other parameters.*demo_n_val: 2 -> 3"):
        other.setup("fit")
    assert mine.stat().st_mtime_ns == before  # never rewritten
