"""Raw SSID reader (storyexp.data.raw_ssid) against the shared fixtures (raw/ssid and expected/)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storyexp.data.raw_ssid import SSID_SPLIT_FILES, SSIDRawStories, is_ssid_raw
from storyexp.data.story import N_FRAMES, Story, StoryDataError
from tests.data_paths import fixtures_dir

FIXTURES = fixtures_dir()
RAW = FIXTURES / "raw" / "ssid"
EXPECTED = FIXTURES / "expected"


SPLITS = list(SSID_SPLIT_FILES)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((EXPECTED / "ssid_stories.json").read_text(encoding="utf-8"))["splits"]


@pytest.fixture(scope="module")
def arldm() -> dict:
    return json.loads((EXPECTED / "arldm_ssid.json").read_text(encoding="utf-8"))["splits"]


@pytest.fixture(scope="module")
def arldm_pixels():
    with np.load(EXPECTED / "arldm_ssid.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def stories() -> dict[str, list[Story]]:
    return {s: list(SSIDRawStories(RAW, s)) for s in SPLITS}


def pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def copy_raw(tmp_path: Path) -> Path:
    root = tmp_path / "ssid"
    shutil.copytree(RAW, root)
    return root


def edit_json(root: Path, split: str, fn) -> None:
    path = root / "SSID_Annotations" / SSID_SPLIT_FILES[split]
    doc = json.loads(path.read_text(encoding="utf-8"))
    fn(doc["annotations"])
    path.write_text(json.dumps(doc), encoding="utf-8")


# ---------------------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("split", SPLITS)
def test_ids_captions_frame_order_match_expected(split, expected, stories):
    rows = expected[split]
    ours = stories[split]
    ds = SSIDRawStories(RAW, split)
    assert len(ds) == len(rows) == len(ours)
    assert [r["h5_row"] for r in rows] == list(range(len(rows)))
    assert ds.ids == [str(r["story_id"]) for r in rows]
    for i, (row, story) in enumerate(zip(rows, ours)):
        want = row["derived_sorted_by_image_order"]
        # The expected file's sorted view agrees with sorting the stored order by image_order.
        perm = sorted(range(len(row["image_order"])), key=lambda k: row["image_order"][k])
        assert want["h5_frame_indices"] == perm
        assert want["youtube_image_ids"] == [row["youtube_image_ids"][k] for k in perm]
        assert want["storytexts_raw"] == [row["storytexts_raw"][k] for k in perm]

        assert story.id == str(row["story_id"])
        assert story.captions == want["storytexts_raw"]  # exact storytext, not normalised
        assert ds.image_ids(i) == want["youtube_image_ids"]
        assert story.labels is None
        assert story.n_frames == N_FRAMES


@pytest.mark.parametrize("split", SPLITS)
def test_pixels_equal_pil_decode_of_the_jpegs(split, expected, stories):
    for row, story in zip(expected[split], stories[split]):
        ids = row["derived_sorted_by_image_order"]["youtube_image_ids"]
        for frame, image_id in zip(story.frames, ids):
            want = pil_rgb(RAW / "SSID_Images" / f"{image_id}.jpg")
            assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            assert frame.shape == want.shape
            np.testing.assert_array_equal(frame, want)


@pytest.mark.parametrize("split", SPLITS)
def test_against_original_converter_and_reader(split, arldm, arldm_pixels, stories):
    """Same stories as ARLDM_SSID's ssid.hdf5 rows; frames are its frames permuted into image_order order."""
    rows = arldm[split]
    ours = stories[split]
    assert [str(r["story_id"]) for r in rows] == [s.id for s in ours]
    for row, story in zip(rows, ours):
        order = row["image_order"]
        perm = sorted(range(len(order)), key=lambda k: order[k])
        sorted_ids = [row["youtube_image_ids"][k] for k in perm]
        ds_ids = [Path(f).stem for f in row["source_files"]]
        assert ds_ids == row["youtube_image_ids"]
        for j, k in enumerate(perm):  # our frame j is the original's image<k>
            np.testing.assert_array_equal(story.frames[j], arldm_pixels[f"{split}/{row['row']}/image{k}"])
            assert list(story.frames[j].shape) == row["image_shapes"][k]
        # The original's captions are ours after its normalisation, in its (file) order.
        norm = [c.replace("\n", "").replace("\t", "").strip() for c in story.captions]
        assert [norm[perm.index(k)] for k in range(len(perm))] == row["texts"]
        if order != sorted(order):  # the original kept file order: ours must be the image_order-sorted one
            assert sorted_ids != row["youtube_image_ids"]
            assert SSIDRawStories(RAW, split).image_ids(row["row"]) == sorted_ids


def test_fixture_has_unsorted_stories(arldm):
    """The fix is exercised: some story in the fixtures is stored out of image_order order."""
    assert any(r["image_order"] != sorted(r["image_order"]) for rows in arldm.values() for r in rows)


def test_greyscale_jpeg_becomes_rgb(stories):
    grey = []
    for path in sorted((RAW / "SSID_Images").glob("*.jpg")):
        with Image.open(path) as im:
            if im.mode == "L":
                grey.append(path.stem)
    assert grey, "fixture README promises a greyscale JPEG"
    found = 0
    for split in SPLITS:
        ds = SSIDRawStories(RAW, split)
        for i, story in enumerate(stories[split]):
            for frame, image_id in zip(story.frames, ds.image_ids(i)):
                if image_id in grey:
                    found += 1
                    assert frame.shape[2] == 3
                    assert np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 1], frame[..., 2])
    assert found


def test_frames_keep_their_own_sizes(stories):
    shapes = {f.shape for split in SPLITS for s in stories[split] for f in s.frames}
    assert len(shapes) > 1


def test_split_aliases_pickle_and_indexing():
    ds = SSIDRawStories(RAW, "validation")
    assert ds.split == "val"
    assert SSIDRawStories(RAW, "Val").ids == ds.ids
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[0] == ds[0]
    assert ds[-1] == ds[len(ds) - 1]
    assert ds[0:2] == [ds[0], ds[1]]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="unknown SSID split"):
        SSIDRawStories(RAW, "dev")


def test_is_ssid_raw(tmp_path):
    assert is_ssid_raw(RAW)
    assert is_ssid_raw(str(RAW))
    assert not is_ssid_raw(tmp_path)
    assert not is_ssid_raw(tmp_path / "nope")
    assert not is_ssid_raw(RAW / "SSID_Annotations")
    assert not is_ssid_raw(RAW / "SSID_Annotations" / SSID_SPLIT_FILES["train"])
    if (FIXTURES / "h5").is_dir():
        assert not is_ssid_raw(FIXTURES / "h5")
    only_ann = tmp_path / "only"
    (only_ann / "SSID_Annotations").mkdir(parents=True)
    shutil.copy(RAW / "SSID_Annotations" / SSID_SPLIT_FILES["test"], only_ann / "SSID_Annotations")
    assert not is_ssid_raw(only_ann)
    (only_ann / "SSID_Images").mkdir()
    assert is_ssid_raw(only_ann)


# -------------------------------------------------------------------------------------------- errors


def _story_using_image(split: str, expected: dict) -> tuple[int, str, str, int]:
    """(index, story id, image id, frame position in image_order order) of the last story of a split, frame 1."""
    row = expected[split][-1]
    ids = row["derived_sorted_by_image_order"]["youtube_image_ids"]
    return row["h5_row"], str(row["story_id"]), ids[1], 1


def _assert_names(err: StoryDataError, *, split: str, story_id: str, field: str, index=None, file=None):
    msg = str(err)
    assert err.split == split and f"split {split!r}" in msg
    assert err.story_id == story_id and story_id in msg
    assert err.field == field and f"field {field!r}" in msg
    if index is not None:
        assert err.index == index and f"story {index}" in msg
    if file is not None:
        assert err.file == os.fspath(file) and os.fspath(file) in msg


@pytest.mark.parametrize("split", SPLITS)
def test_missing_image(tmp_path, split, expected):
    root = copy_raw(tmp_path)
    index, story_id, image_id, pos = _story_using_image(split, expected)
    path = root / "SSID_Images" / f"{image_id}.jpg"
    path.unlink()
    ds = SSIDRawStories(root, split)  # opening reads no image
    with pytest.raises(StoryDataError, match="not found") as ei:
        ds[index]
    _assert_names(ei.value, split=split, story_id=story_id, field=f"image{pos}", index=index, file=path)
    assert image_id in str(ei.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_jpeg(tmp_path, expected, damage):
    split = "train"
    root = copy_raw(tmp_path)
    index, story_id, image_id, pos = _story_using_image(split, expected)
    path = root / "SSID_Images" / f"{image_id}.jpg"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a jpeg" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(StoryDataError, match="cannot be decoded") as ei:
        SSIDRawStories(root, split)[index]
    _assert_names(ei.value, split=split, story_id=story_id, field=f"image{pos}", index=index, file=path)


@pytest.mark.parametrize("split", SPLITS)
def test_story_with_four_frames(tmp_path, split, expected):
    root = copy_raw(tmp_path)
    row = expected[split][-1]
    sid = row["story_id"]

    def drop_one(ann):
        k = max(i for i, a in enumerate(ann) if a[0]["story_id"] == sid)
        del ann[k]

    edit_json(root, split, drop_one)
    with pytest.raises(StoryDataError, match=f"has {N_FRAMES - 1} annotations") as ei:
        SSIDRawStories(root, split)
    _assert_names(
        ei.value, split=split, story_id=str(sid), field="annotations", index=row["h5_row"],
        file=root / "SSID_Annotations" / SSID_SPLIT_FILES[split],
    )


def test_story_with_six_frames(tmp_path, expected):
    split = "test"
    root = copy_raw(tmp_path)
    row = expected[split][0]

    def add_one(ann):
        extra = json.loads(json.dumps(next(a for a in ann if a[0]["story_id"] == row["story_id"])))
        extra[0]["image_order"] = max(row["image_order"]) + 1
        ann.append(extra)

    edit_json(root, split, add_one)
    with pytest.raises(StoryDataError, match=f"has {N_FRAMES + 1} annotations") as ei:
        SSIDRawStories(root, split)
    _assert_names(ei.value, split=split, story_id=str(row["story_id"]), field="annotations", index=row["h5_row"])


def test_duplicated_image_order(tmp_path, expected):
    split = "val"
    root = copy_raw(tmp_path)
    row = expected[split][-1]
    sid = row["story_id"]

    def dup(ann):
        mine = [a[0] for a in ann if a[0]["story_id"] == sid]
        mine[1]["image_order"] = mine[0]["image_order"]

    edit_json(root, split, dup)
    with pytest.raises(StoryDataError, match="duplicated image_order") as ei:
        SSIDRawStories(root, split)
    _assert_names(ei.value, split=split, story_id=str(sid), field="image_order", index=row["h5_row"])


@pytest.mark.parametrize("field", ["storytext", "image_order", "youtube_image_id"])
def test_missing_or_bad_annotation_field(tmp_path, field):
    root = copy_raw(tmp_path)
    edit_json(root, "train", lambda ann: ann[0][0].pop(field))
    with pytest.raises(StoryDataError, match="lacks") as ei:
        SSIDRawStories(root, "train")
    assert ei.value.field == f"annotations[0].{field}"

    root2 = copy_raw(tmp_path / "b")
    edit_json(root2, "train", lambda ann: ann[0][0].__setitem__(field, None))
    with pytest.raises(StoryDataError) as ei:
        SSIDRawStories(root2, "train")
    assert ei.value.field == f"annotations[0].{field}"


def test_malformed_json(tmp_path):
    root = copy_raw(tmp_path)
    path = root / "SSID_Annotations" / SSID_SPLIT_FILES["test"]
    path.write_text('{"annotations": [', encoding="utf-8")
    with pytest.raises(StoryDataError, match="JSON") as ei:
        SSIDRawStories(root, "test")
    assert ei.value.file == os.fspath(path) and ei.value.split == "test"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(StoryDataError, match="annotations"):
        SSIDRawStories(root, "test")


def test_missing_annotation_file(tmp_path):
    root = copy_raw(tmp_path)
    path = root / "SSID_Annotations" / SSID_SPLIT_FILES["val"]
    path.unlink()
    with pytest.raises(FileNotFoundError) as ei:
        SSIDRawStories(root, "val")
    msg = str(ei.value)
    assert str(path) in msg and "SSID_Annotations/" in msg and "SSID_Images/" in msg and "'val'" in msg
    assert len(SSIDRawStories(root, "train")) > 0  # the other splits still open


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="SSID_Annotations/") as ei:
        SSIDRawStories(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(ei.value)
