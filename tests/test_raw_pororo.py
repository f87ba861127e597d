"""PororoRawStories against the shared fixtures (raw PororoSV + what the original readers returned)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storyexp.data.frames import split_strip
from storyexp.data.raw_pororo import (
    PORORO_CHARACTERS,
    REQUIRED_FILES,
    PororoRawStories,
    is_pororo_raw,
)
from storyexp.data.story import Story, StoryDataError

from .conftest import fixtures_dir

FIXTURES = fixtures_dir()
RAW = FIXTURES / "raw" / "pororo"
EXPECTED = FIXTURES / "expected"



def _json(name: str) -> dict:
    return json.loads((EXPECTED / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sd() -> dict:
    return _json("storydalle_pororo.json")["splits"]


@pytest.fixture(scope="module")
def arldm() -> dict:
    return _json("arldm_pororo.json")["splits"]


def _splits() -> list[str]:
    if not (EXPECTED / "storydalle_pororo.json").is_file():
        return ["train", "val", "test"]
    return list(_json("storydalle_pororo.json")["splits"])


def _pil_strip(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _block_index(frame: np.ndarray, strip: np.ndarray) -> list[int]:
    return [q for q, b in enumerate(split_strip(strip, 128)) if np.array_equal(b, frame)]


def _arldm_norm(text: str) -> str:
    return text.replace("\n", "").replace("\t", "").strip()


# --------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("split", _splits())
def test_ids_captions_labels_match_storydalle(split, sd):
    ds = PororoRawStories(RAW, split)
    exp = sd[split]
    assert len(ds) == len(exp)
    for item, e in enumerate(exp):
        assert ds.rows[item] == e["story_row"]
        assert ds.frame_keys(item) == (e["source_key"], *e["target_keys"])
        st = ds[item]
        assert isinstance(st, Story)
        assert st.id == e["source_key"] == ds.story_id(item)
        # captions exactly as stored (StoryDALL-E returns them raw)
        assert st.captions == [e["source_caption_lookup"], *e["target_captions"]]
        assert st.labels.dtype == np.float32 and st.labels.shape == (5, len(PORORO_CHARACTERS))
        want = np.asarray([e["source_label_lookup"], *e["target_labels"]], dtype=np.float32)
        np.testing.assert_array_equal(st.labels, want)
        assert len(st.frames) == 5
        for f in st.frames:
            assert f.shape == (128, 128, 3) and f.dtype == np.uint8


@pytest.mark.parametrize("split", _splits())
def test_matches_arldm_files_and_strips(split, arldm):
    ds = PororoRawStories(RAW, split)
    npz = np.load(EXPECTED / "arldm_pororo.npz")
    exp = arldm[split]
    assert len(ds) == len(exp)
    for e in exp:
        r = e["row"]
        keys = ds.frame_keys(r)
        assert [f"pororo/{k}.png" for k in keys] == e["source_files"]
        # ARLDM's converter normalises captions (drops \n and \t, strips); ours are raw.
        assert [_arldm_norm(c) for c in ds[r].captions] == e["texts"]
        for j in range(5):
            strip = ds.strip(r, j)
            assert list(strip.shape) == e["image_shapes"][j]
            np.testing.assert_array_equal(strip, npz[f"{split}/{r}/image{j}"])


def test_raw_captions_differ_from_arldm_where_expected(sd, arldm):
    """The fixture's edge cases: raw captions with \\t / \\n, which only ARLDM normalises."""
    raw = {c for s in sd.values() for e in s for c in [e["source_caption_lookup"], *e["target_captions"]]}
    assert any(("\n" in c or "\t" in c or c != c.strip()) for c in raw)
    for split in sd:
        ds = PororoRawStories(RAW, split)
        for e in arldm[split]:
            caps = ds[e["row"]].captions
            for got, theirs in zip(caps, e["texts"]):
                if got != got.strip() or "\n" in got or "\t" in got:
                    assert got != theirs


@pytest.mark.parametrize("split", _splits())
def test_sentence_embeddings_match_storydalle(split, sd):
    ds = PororoRawStories(RAW, split)
    npz = np.load(EXPECTED / "storydalle_pororo_sent_embeds.npz")
    with open(RAW / "descriptions_vec_512.pkl", "rb") as f:
        vecs = pickle.load(f, encoding="latin1")
    for item in range(len(sd[split])):
        emb = ds.sentence_embeddings(item)
        assert emb.dtype == np.float32 and emb.shape == (5, 512)
        np.testing.assert_array_equal(emb[1:], npz[f"{split}/{item}"])  # StoryDALL-E returns targets only
        np.testing.assert_array_equal(emb[0], np.asarray(vecs[ds.story_id(item)])[0])


# --------------------------------------------------------------------------------------------- frames


@pytest.mark.parametrize("rule", ["fixed", "random", "first", "middle"])
def test_chosen_frame_is_a_block_of_the_png_strip(rule):
    np.random.seed(0)
    seen_multi = False
    for split in _splits():
        ds = PororoRawStories(RAW, split, frame_choice=rule)
        for i in range(len(ds)):
            st = ds[i]
            for j, key in enumerate(ds.frame_keys(i)):
                strip = _pil_strip(RAW / f"{key}.png")
                k = strip.shape[0] // 128
                seen_multi |= k > 1
                hits = _block_index(st.frames[j], strip)
                assert hits, f"{split}/{i} frame {j} is not a block of {key}.png"
                if rule == "first":
                    assert 0 in hits
                elif rule == "middle":
                    assert k // 2 in hits
    assert seen_multi  # the fixture has strips of several frames, so the rules are actually exercised


def test_fixed_is_stable_across_reads_and_instances():
    for split in _splits():
        a = PororoRawStories(RAW, split, frame_choice="fixed")
        b = PororoRawStories(RAW, split, frame_choice="fixed")
        np.random.seed(1)
        first = [a[i] for i in range(len(a))]
        np.random.seed(2)
        assert first == [a[i] for i in range(len(a))]
        assert first == [b[i] for i in range(len(b))]
        assert first == list(pickle.loads(pickle.dumps(a)))


def test_first_and_middle_pick_the_defined_block():
    ds_first = PororoRawStories(RAW, "train", frame_choice="first")
    ds_mid = PororoRawStories(RAW, "train", frame_choice="middle")
    for i in range(len(ds_first)):
        for j in range(5):
            blocks = split_strip(ds_first.strip(i, j), 128)
            np.testing.assert_array_equal(ds_first[i].frames[j], blocks[0])
            np.testing.assert_array_equal(ds_mid[i].frames[j], blocks[len(blocks) // 2])


# --------------------------------------------------------------------------------------------- layout / errors


def test_is_pororo_raw(tmp_path):
    assert is_pororo_raw(RAW)
    assert not is_pororo_raw(tmp_path)
    assert not is_pororo_raw(RAW / "img_cache4.npy")
    assert not is_pororo_raw(FIXTURES / "raw" / "flintstones")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        PororoRawStories(RAW, "validation")
    with pytest.raises(ValueError, match="frame choice"):
        PororoRawStories(RAW, "train", frame_choice="last")
    ds = PororoRawStories(RAW, "val")
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1] == ds[len(ds) - 1]


@pytest.fixture
def copy_root(tmp_path) -> Path:
    dst = tmp_path / "pororo"
    shutil.copytree(RAW, dst)
    return dst


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_required_file(copy_root, name):
    (copy_root / name).unlink()
    assert not is_pororo_raw(copy_root)
    with pytest.raises(FileNotFoundError) as ei:
        PororoRawStories(copy_root, "train")
    msg = str(ei.value)
    assert name in msg and "StoryDALL-E pororo archive" in msg


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="StoryDALL-E pororo archive"):
        PororoRawStories(tmp_path / "nope", "train")


def _target(split: str = "test", item: int = 0, position: int = 2):
    ds = PororoRawStories(RAW, split)
    return ds.story_id(item), ds.frame_keys(item)[position]


def test_missing_image(copy_root):
    sid, key = _target()
    (copy_root / f"{key}.png").unlink()
    ds = PororoRawStories(copy_root, "test")
    with pytest.raises(StoryDataError) as ei:
        ds[0]
    e = ei.value
    assert (e.story_id, e.field, e.split, e.index) == (sid, "image2", "test", 0)
    assert e.file.endswith(f"{key}.png")
    assert sid in str(e) and "image2" in str(e) and f"{key}.png" in str(e)


def test_corrupt_png(copy_root):
    sid, key = _target()
    path = copy_root / f"{key}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated PNG
    ds = PororoRawStories(copy_root, "test")
    with pytest.raises(StoryDataError) as ei:
        ds[0]
    assert (ei.value.story_id, ei.value.field) == (sid, "image2")
    assert sid in str(ei.value) and "decoded" in str(ei.value)

    path.write_bytes(b"not a png at all")
    with pytest.raises(StoryDataError) as ei:
        PororoRawStories(copy_root, "test")[0]
    assert (ei.value.story_id, ei.value.field) == (sid, "image2")


def test_wrong_strip_height(copy_root):
    sid, key = _target()
    Image.fromarray(np.zeros((200, 128, 3), np.uint8)).save(copy_root / f"{key}.png")
    with pytest.raises(StoryDataError) as ei:
        PororoRawStories(copy_root, "test")[0]
    assert (ei.value.story_id, ei.value.field) == (sid, "image2")
    assert "128x200" in str(ei.value)


def test_missing_caption_and_label(copy_root):
    sid, key = _target()
    desc = np.load(copy_root / "descriptions.npy", allow_pickle=True, encoding="latin1").item()
    del desc[key]
    np.save(copy_root / "descriptions.npy", np.array(desc, dtype=object), allow_pickle=True)
    with pytest.raises(StoryDataError) as ei:
        PororoRawStories(copy_root, "test")[0]
    assert (ei.value.story_id, ei.value.field) == (sid, "caption2")

    shutil.copy(RAW / "descriptions.npy", copy_root / "descriptions.npy")
    labels = np.load(copy_root / "labels.npy", allow_pickle=True, encoding="latin1").item()
    del labels[key]
    np.save(copy_root / "labels.npy", np.array(labels, dtype=object), allow_pickle=True)
    with pytest.raises(StoryDataError) as ei:
        PororoRawStories(copy_root, "test")[0]
    assert (ei.value.story_id, ei.value.field) == (sid, "labels")


def test_bad_split_ids(copy_root):
    n = np.load(RAW / "img_cache4.npy").shape[0]
    ids = np.empty(3, dtype=object)
    ids[:] = [np.array([0, n]), np.array([1]), np.array([2])]
    np.save(copy_root / "train_seen_unseen_ids.npy", ids, allow_pickle=True)
    with pytest.raises(StoryDataError, match="out of range"):
        PororoRawStories(copy_root, "train")
