"""Raw FlintstonesSV reader against the fixtures' expected outputs of the original readers (fast, CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from storyexp.data.frames import pick_frame
from storyexp.data.raw_flintstones import (
    FLINTSTONES_CHARACTERS,
    FlintstonesRawStories,
    is_flintstones_raw,
)
from storyexp.data.story import Story, StoryDataError

from .conftest import fixtures_dir

FIXTURES = fixtures_dir()
RAW = FIXTURES / "raw" / "flintstones"
EXPECTED = FIXTURES / "expected"



def _json(name: str):
    return json.loads((EXPECTED / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def arldm():
    return _json("arldm_flintstones.json")


@pytest.fixture(scope="module")
def arldm_images():
    with np.load(EXPECTED / "arldm_flintstones.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def storydalle():
    return _json("storydalle_flintstones.json")


def _splits(arldm) -> list[str]:
    return list(arldm["splits"])


def _gid(source_file: str) -> str:
    return Path(source_file).stem


def _normalise(text: str) -> str:  # AR-LDM converter: drop every \n and \t, then strip
    return text.replace("\n", "").replace("\t", "").strip()


def test_fixture_splits_are_all_covered(arldm, storydalle):
    assert set(_splits(arldm)) == set(storydalle["splits"]) == {"train", "val", "test"}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_matches_arldm_rows(split, arldm, arldm_images):
    rows = arldm["splits"][split]
    ds = FlintstonesRawStories(RAW, split)
    assert len(ds) == len(rows)
    assert ds.ids == [_gid(r["source_files"][0]) for r in rows]
    for i, row in enumerate(rows):
        story = ds[i]
        assert isinstance(story, Story)
        assert ds.clip_ids(i) == tuple(_gid(f) for f in row["source_files"])
        assert [_normalise(c) for c in story.captions] == row["texts"]
        assert len(story.frames) == 5
        for j, frame in enumerate(story.frames):
            assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
            strip = arldm_images[f"{split}/{row['row']}/image{j}"]  # [640, 128, 3], RGB
            blocks = [strip[k : k + 128] for k in range(0, strip.shape[0], 128)]
            assert any(np.array_equal(frame, b) for b in blocks), (split, i, j)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_matches_storydalle_captions_and_labels(split, storydalle):
    items = storydalle["splits"][split]
    full = [it for it in items if it["n_targets"] == 4]  # the 5-frame stories (AR-LDM's filter)
    ds = FlintstonesRawStories(RAW, split)
    assert ds.ids == [it["source_globalID"] for it in full]
    for i, it in enumerate(full):
        story = ds[i]
        assert story.id == it["source_globalID"]
        assert ds.clip_ids(i) == (it["source_globalID"], *it["target_globalIDs"])
        assert story.captions == [it["source_caption_lookup"], *it["target_captions"]]  # exact, raw text
        want = np.asarray([it["source_label_lookup"], *it["target_labels"]], dtype=np.float32)
        assert story.labels.dtype == np.float32
        assert story.labels.shape == (5, len(FLINTSTONES_CHARACTERS))
        np.testing.assert_array_equal(story.labels, want)


def test_storydalle_extra_train_items_are_short(storydalle):
    # The only difference in story membership: StoryDALL-E keeps train clips with < 4 followings.
    for split, items in storydalle["splits"].items():
        for it in items:
            assert it["n_targets"] == len(it["target_globalIDs"])
            if split != "train":
                assert it["n_targets"] == 4


def test_frames_are_clip_frames_and_fixed_is_stable():
    a = FlintstonesRawStories(RAW, "train", frame_choice="fixed")
    b = FlintstonesRawStories(RAW, "train", frame_choice="fixed")
    assert len(a) > 0
    for i in range(len(a)):
        s1, s2, s3 = a[i], a[i], b[i]
        assert s1 == s2 == s3
        for pos, gid in enumerate(a.clip_ids(i)):
            clip = np.load(RAW / "video_frames_sampled" / f"{gid}.npy")
            k = pick_frame(clip.shape[0], "fixed", key=f"{s1.id}/{pos}")
            np.testing.assert_array_equal(s1.frames[pos], clip[k])


@pytest.mark.parametrize("rule", ["random", "first", "middle"])
def test_other_frame_rules(rule):
    ds = FlintstonesRawStories(RAW, "val", frame_choice=rule)
    story = ds[0]
    for pos, gid in enumerate(ds.clip_ids(0)):
        clip = np.load(RAW / "video_frames_sampled" / f"{gid}.npy")
        if rule == "random":
            assert any(np.array_equal(story.frames[pos], f) for f in clip)
        else:
            np.testing.assert_array_equal(story.frames[pos], clip[0 if rule == "first" else clip.shape[0] // 2])


def test_sequence_protocol_and_test_limit():
    ds = FlintstonesRawStories(RAW, "test")
    assert [s.id for s in ds] == ds.ids
    assert ds[-1] == ds[len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(FlintstonesRawStories(RAW, "test", test_limit=0)) == 0
    assert FlintstonesRawStories(RAW, "test", test_limit=len(ds) + 5).ids == ds.ids
    assert len(FlintstonesRawStories(RAW, "train", test_limit=0)) > 0  # only test is truncated
    with pytest.raises(ValueError):
        FlintstonesRawStories(RAW, "validation")
    with pytest.raises(ValueError):
        FlintstonesRawStories(RAW, "train", frame_choice="nope")


def test_is_flintstones_raw(tmp_path):
    assert is_flintstones_raw(RAW)
    assert not is_flintstones_raw(FIXTURES / "raw" / "pororo")
    assert not is_flintstones_raw(tmp_path)
    assert not is_flintstones_raw(tmp_path / "nope")
    assert not is_flintstones_raw(FIXTURES / "h5" / "flintstones.h5")


# --- broken copies ------------------------------------------------------------------------------------------


@pytest.fixture()
def broken_root(tmp_path):
    root = tmp_path / "flintstones"
    shutil.copytree(RAW, root)
    return root


def _victim(root: Path, pos: int) -> tuple[str, str]:
    """(story id of train story 0, globalID of its clip at `pos`)."""
    ds = FlintstonesRawStories(root, "train")
    return ds.ids[0], ds.clip_ids(0)[pos]


def _check(err: StoryDataError, story_id: str, field: str, file_part: str) -> None:
    assert err.story_id == story_id and err.field == field and err.split == "train" and err.index == 0
    assert file_part in err.file
    msg = str(err)
    assert story_id in msg and field in msg and file_part in msg


def test_missing_root_file(broken_root):
    (broken_root / "labels.pkl").unlink()
    with pytest.raises(FileNotFoundError) as e:
        FlintstonesRawStories(broken_root, "train")
    assert "labels.pkl" in str(e.value) and "unpacked flintstones archive" in str(e.value)
    with pytest.raises(FileNotFoundError, match="unpacked flintstones archive"):
        FlintstonesRawStories(broken_root / "missing", "train")


def test_missing_npy(broken_root):
    sid, gid = _victim(broken_root, 2)
    (broken_root / "video_frames_sampled" / f"{gid}.npy").unlink()
    ds = FlintstonesRawStories(broken_root, "train")
    with pytest.raises(StoryDataError) as e:
        ds[0]
    _check(e.value, sid, "image2", f"{gid}.npy")


def test_corrupt_npy(broken_root):
    sid, gid = _victim(broken_root, 0)
    path = broken_root / "video_frames_sampled" / f"{gid}.npy"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(StoryDataError) as e:
        FlintstonesRawStories(broken_root, "train")[0]
    _check(e.value, sid, "image0", f"{gid}.npy")
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(StoryDataError) as e:
        FlintstonesRawStories(broken_root, "train")[0]
    _check(e.value, sid, "image0", f"{gid}.npy")


def test_wrong_shape_npy(broken_root):
    sid, gid = _victim(broken_root, 4)
    np.save(broken_root / "video_frames_sampled" / f"{gid}.npy", np.zeros((5, 64, 64, 3), np.uint8))
    with pytest.raises(StoryDataError) as e:
        FlintstonesRawStories(broken_root, "train")[0]
    _check(e.value, sid, "image4", f"{gid}.npy")
    assert "shape" in str(e.value)


def test_missing_annotation(broken_root):
    sid, gid = _victim(broken_root, 3)
    path = broken_root / "flintstones_annotations_v1-0.json"
    ann = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps([a for a in ann if a["globalID"] != gid]), encoding="utf-8")
    with pytest.raises(StoryDataError) as e:
        FlintstonesRawStories(broken_root, "train")[0]
    _check(e.value, sid, "caption3", "flintstones_annotations_v1-0.json")
    assert gid in str(e.value)
