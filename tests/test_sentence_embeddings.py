"""Per-frame sentence embeddings (StoryDALL-E's story-block input): the datasets' own vectors and the encoders."""

from __future__ import annotations

import json
import pickle
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from storyexp.data.datamodule import StoryDataModule, collate_stories
from storyexp.data.raw_flintstones import EMBEDDING_ROWS_FILE, EMBEDDINGS_FILE, FlintstonesRawStories
from storyexp.data.raw_pororo import PororoRawStories
from storyexp.data.story import StoryDataError
from storyexp.errors import ConfigurationError, MissingResourceError
from storyexp.models.sentence_encoders import (
    SENTENCE_ENCODER_KINDS,
    HashingSentenceEncoder,
    TransformersSentenceEncoder,
    build_sentence_encoder,
)

from .conftest import fixtures_dir

FIXTURES = fixtures_dir()
EXPECTED = FIXTURES / "expected"
RAW_FLINTSTONES = FIXTURES / "raw" / "flintstones"
RAW_PORORO = FIXTURES / "raw" / "pororo"


CAPTIONS = [
    "Fred and Barney walk the dog.",
    "Wilma bakes a cake for Betty.",
    "Dino chases Fred around the house.",
]


# ------------------------------------------------------------------------------------------------ hashing


def test_hashing_is_deterministic_and_seeded():
    a, b = HashingSentenceEncoder(), HashingSentenceEncoder()
    va, vb = a.encode(CAPTIONS), b.encode(list(CAPTIONS))
    assert torch.equal(va, vb)  # another instance (and another process: crc32, not hash()) gives the same
    assert torch.equal(a.encode(CAPTIONS[:1])[0], va[0])  # independent of the other captions in the batch
    assert not torch.equal(HashingSentenceEncoder(seed=1).encode(CAPTIONS), va)


def test_hashing_bucket_and_sign_follow_crc32():
    enc = HashingSentenceEncoder(dim=97, ngrams=1, seed=3)
    h = zlib.crc32("3\x1fbarney".encode())
    bucket, sign = (h & 0x7FFFFFFF) % 97, -1.0 if h >> 31 else 1.0
    v = enc.encode(["Barney!"])[0]
    expected = torch.zeros(97)
    expected[bucket] = sign
    assert torch.equal(v, expected)


def test_hashing_unit_norm_zero_for_no_words_and_dims():
    for dim in (7, 64, 512):
        enc = HashingSentenceEncoder(dim=dim)
        v = enc.encode([*CAPTIONS, "", "  ?! ..."])
        assert v.shape == (len(CAPTIONS) + 2, dim) and v.dtype == torch.float32 and v.device.type == "cpu"
        torch.testing.assert_close(v[: len(CAPTIONS)].norm(dim=1), torch.ones(len(CAPTIONS)))
        assert torch.count_nonzero(v[len(CAPTIONS):]) == 0
    assert HashingSentenceEncoder().encode([]).shape == (0, 512)
    with pytest.raises(ConfigurationError):
        HashingSentenceEncoder(dim=0)
    with pytest.raises(ConfigurationError):
        HashingSentenceEncoder(ngrams=0)


def test_hashing_content_case_and_word_order():
    enc = HashingSentenceEncoder()
    v = enc.encode(CAPTIONS)
    assert all(not torch.allclose(v[i], v[j]) for i in range(3) for j in range(i + 1, 3))
    assert torch.equal(enc.encode(["FRED and barney"]), enc.encode(["fred AND Barney"]))
    swapped = ["fred walks with barney", "barney walks with fred"]
    bigrams = enc.encode(swapped)
    assert not torch.allclose(bigrams[0], bigrams[1])  # word order matters with ngrams=2
    bag = HashingSentenceEncoder(ngrams=1).encode(swapped)
    assert torch.equal(bag[0], bag[1])  # but not for a bag of words


def test_hashing_has_no_weights_and_moves_to_device():
    enc = HashingSentenceEncoder(dim=16)
    assert list(enc.parameters()) == [] and enc.state_dict() == {}
    assert enc.dim == 16
    assert enc.encode(CAPTIONS, device="cpu").device.type == "cpu"
    assert torch.equal(enc(CAPTIONS), enc.encode(CAPTIONS))
    with pytest.raises(TypeError, match="list"):
        enc.encode("a single caption")


# --------------------------------------------------------------------------------------------- transformers

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "fred", "and", "barney", "walk", "walks", "the", "dog",
          "wilma", "bakes", "a", "cake", "for", "betty", "dino", "chases", "around", "house", "with", "in", "park",
          "while", "sun", "shines", "over", "stone", "town"]
_HIDDEN = 32


def _write_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT and its word-piece tokenizer, saved as a Hugging Face model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(_VOCAB), hidden_size=_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def bert(bert_dir) -> TransformersSentenceEncoder:
    return TransformersSentenceEncoder(bert_dir)


def test_transformers_shape_and_mean_pooling(bert):
    assert bert.dim == _HIDDEN
    v = bert.encode(CAPTIONS)
    assert v.shape == (3, _HIDDEN) and v.dtype == torch.float32 and not v.requires_grad
    assert bert.encode([]).shape == (0, _HIDDEN)
    # mean over the real tokens of one caption, computed directly from the model
    ids = bert.tokenizer(CAPTIONS[0], return_tensors="pt")
    with torch.no_grad():
        hidden = bert.model(**ids).last_hidden_state[0]
    torch.testing.assert_close(v[0], hidden.mean(dim=0), rtol=0, atol=1e-5)


def test_transformers_padding_does_not_change_a_caption(bert):
    short = "fred walks."
    long = "fred and barney walk the dog around the house while the sun shines over stone town."
    together = bert.encode([long, short])
    alone = bert.encode([short])
    assert bert.tokenizer([long, short], padding=True)["attention_mask"][1][-1] == 0  # it was padded
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together[0], bert.encode([long])[0], rtol=0, atol=1e-5)


def test_transformers_cls_pooling_and_max_length(bert_dir, bert):
    cls = TransformersSentenceEncoder(bert_dir, pooling="cls")
    v = cls.encode(CAPTIONS)
    ids = cls.tokenizer(CAPTIONS[1], return_tensors="pt")
    with torch.no_grad():
        first = cls.model(**ids).last_hidden_state[0, 0]
    torch.testing.assert_close(v[1], first, rtol=0, atol=1e-5)
    assert not torch.allclose(v, bert.encode(CAPTIONS))
    short = TransformersSentenceEncoder(bert_dir, max_length=4)  # [CLS] fred and [SEP]
    torch.testing.assert_close(short.encode(["fred and barney walk"]), short.encode(["fred and"]), rtol=0, atol=1e-5)
    with pytest.raises(ConfigurationError, match="pooling"):
        TransformersSentenceEncoder(bert_dir, pooling="max")


def test_transformers_is_frozen_even_inside_a_training_parent(bert_dir):
    enc = TransformersSentenceEncoder(bert_dir)
    params = list(enc.parameters())
    assert params and not any(p.requires_grad for p in params)
    parent = nn.ModuleDict({"encoder": enc, "head": nn.Linear(_HIDDEN, 2)})
    parent.train()
    assert not enc.model.training  # no dropout in training runs
    a, b = enc.encode(CAPTIONS), enc.encode(CAPTIONS)
    assert torch.equal(a, b)
    assert torch.equal(enc.encode(CAPTIONS), TransformersSentenceEncoder(bert_dir).encode(CAPTIONS))


def test_transformers_missing_files(tmp_path, bert_dir):
    missing = tmp_path / "no_such_model"
    with pytest.raises(MissingResourceError) as e:
        TransformersSentenceEncoder(missing)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert str(missing) in msg and "name_or_path" in msg and "download" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingResourceError, match="config.json"):
        TransformersSentenceEncoder(tmp_path / "empty")
    weights_only = tmp_path / "weights_only"
    shutil.copytree(bert_dir, weights_only)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (weights_only / name).unlink(missing_ok=True)
    with pytest.raises(MissingResourceError, match="tokenizer"):
        TransformersSentenceEncoder(weights_only)
    with pytest.raises(MissingResourceError, match="Hugging Face cache"):
        TransformersSentenceEncoder("storyexp-test/no-such-encoder")


# ---------------------------------------------------------------------------------------------------- build


def test_build_sentence_encoder(bert_dir):
    enc = build_sentence_encoder("hashing", 128, ngrams=1, seed=5)
    assert isinstance(enc, HashingSentenceEncoder) and (enc.dim, enc.ngrams, enc.seed) == (128, 1, 5)
    with pytest.raises(ConfigurationError) as e:
        build_sentence_encoder("use", 512)
    assert all(kind in str(e.value) for kind in SENTENCE_ENCODER_KINDS)
    with pytest.raises(ConfigurationError, match="ngram"):
        build_sentence_encoder("hashing", 512, ngram=2)
    with pytest.raises(ConfigurationError, match="name_or_path"):
        build_sentence_encoder("transformers", _HIDDEN)
    enc = build_sentence_encoder("transformers", _HIDDEN, name_or_path=str(bert_dir), pooling="cls")
    assert isinstance(enc, TransformersSentenceEncoder) and enc.dim == _HIDDEN and enc.pooling == "cls"
    with pytest.raises(ConfigurationError) as e:
        build_sentence_encoder("transformers", 512, name_or_path=str(bert_dir))
    assert "hidden size 32" in str(e.value) and "dim=32" in str(e.value) and "story_linear" in str(e.value)


# ------------------------------------------------------------------------------------ flintstones raw reader


def _json(name: str) -> dict:
    return json.loads((EXPECTED / name).read_text(encoding="utf-8"))


def _flintstones_table() -> tuple[np.ndarray, dict]:
    table = np.load(RAW_FLINTSTONES / EMBEDDINGS_FILE)
    with open(RAW_FLINTSTONES / EMBEDDING_ROWS_FILE, "rb") as f:
        return table, pickle.load(f)


def test_flintstones_sentence_embeddings_match_storydalle():
    expected = np.load(EXPECTED / "storydalle_flintstones_sent_embeds.npz")
    table, rows = _flintstones_table()
    checked = n_stories = 0
    for split, items in _json("storydalle_flintstones.json")["splits"].items():
        ds = FlintstonesRawStories(RAW_FLINTSTONES, split)
        n_stories += len(ds)
        by_id = {sid: i for i, sid in enumerate(ds.ids)}
        for it in items:
            if it["n_targets"] != 4:  # StoryDALL-E's short train stories are no 5-frame story here
                assert it["source_globalID"] not in by_id
                continue
            emb = ds.sentence_embeddings(by_id[it["source_globalID"]])
            assert emb.dtype == np.float32 and emb.shape == (5, table.shape[1])
            np.testing.assert_array_equal(emb[1:], expected[f"{split}/{it['item']}"])  # the 4 targets
            np.testing.assert_array_equal(emb[0], table[rows[it["source_globalID"]]])  # + the source clip
            checked += 1
    assert checked == n_stories > 0  # every story of the reader was compared


def test_flintstones_sentence_embeddings_survive_pickling():
    ds = FlintstonesRawStories(RAW_FLINTSTONES, "val")
    emb = ds.sentence_embeddings(0)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._embedding_table is None  # the memory-mapped table is reopened, not copied
    np.testing.assert_array_equal(copy.sentence_embeddings(-1), emb)


@pytest.fixture()
def flintstones_copy(tmp_path) -> Path:
    root = tmp_path / "flintstones"
    shutil.copytree(RAW_FLINTSTONES, root)
    return root


def _check_error(err: StoryDataError, ds: FlintstonesRawStories, file_name: str, field: str) -> None:
    assert err.split == ds.split and err.index == 0 and err.story_id == ds.ids[0] and err.field == field
    assert err.file.endswith(file_name)
    assert all(part in str(err) for part in (file_name, ds.ids[0], field))


@pytest.mark.parametrize("name", [EMBEDDINGS_FILE, EMBEDDING_ROWS_FILE])
def test_flintstones_missing_embedding_file(flintstones_copy, name):
    (flintstones_copy / name).unlink()
    ds = FlintstonesRawStories(flintstones_copy, "train")
    assert ds[0].captions  # stories are still readable without the optional files
    with pytest.raises(StoryDataError) as e:
        ds.sentence_embeddings(0)
    _check_error(e.value, ds, name, "sentence_embeddings")
    assert "missing" in str(e.value)


def test_flintstones_missing_or_bad_embedding_row(flintstones_copy):
    ds = FlintstonesRawStories(flintstones_copy, "train")
    victim = ds.clip_ids(0)[3]
    table, rows = _flintstones_table()
    with open(flintstones_copy / EMBEDDING_ROWS_FILE, "wb") as f:
        pickle.dump({k: v for k, v in rows.items() if k != victim}, f)
    with pytest.raises(StoryDataError) as e:
        FlintstonesRawStories(flintstones_copy, "train").sentence_embeddings(0)
    _check_error(e.value, ds, EMBEDDING_ROWS_FILE, "embedding3")
    assert victim in str(e.value)
    with open(flintstones_copy / EMBEDDING_ROWS_FILE, "wb") as f:
        pickle.dump({**rows, victim: table.shape[0]}, f)
    with pytest.raises(StoryDataError, match="out of range") as e:
        FlintstonesRawStories(flintstones_copy, "train").sentence_embeddings(0)
    _check_error(e.value, ds, EMBEDDING_ROWS_FILE, "embedding3")
    np.save(flintstones_copy / EMBEDDINGS_FILE, np.zeros(5, np.float32))
    with pytest.raises(StoryDataError, match="2-D") as e:
        FlintstonesRawStories(flintstones_copy, "train").sentence_embeddings(0)
    _check_error(e.value, ds, EMBEDDINGS_FILE, "sentence_embeddings")


# ---------------------------------------------------------------------------------------------- data module


def _reader_and_expected(dataset: str, split: str):
    """The raw reader of a split and {story index: StoryDALL-E's [4, D] target embeddings}."""
    if dataset == "pororo":
        ds = PororoRawStories(RAW_PORORO, split)
        npz = np.load(EXPECTED / "storydalle_pororo_sent_embeds.npz")
        items = _json("storydalle_pororo.json")["splits"][split]
        return ds, {i: npz[f"{split}/{it['item']}"] for i, it in enumerate(items)}
    ds = FlintstonesRawStories(RAW_FLINTSTONES, split)
    npz = np.load(EXPECTED / "storydalle_flintstones_sent_embeds.npz")
    items = _json("storydalle_flintstones.json")["splits"][split]
    by_id = {sid: i for i, sid in enumerate(ds.ids)}
    return ds, {by_id[it["source_globalID"]]: npz[f"{split}/{it['item']}"] for it in items if it["n_targets"] == 4}


@pytest.mark.parametrize("dataset", ["pororo", "flintstones"])
def test_datamodule_batches_sentence_embeddings(dataset):
    root = RAW_PORORO if dataset == "pororo" else RAW_FLINTSTONES
    dm = StoryDataModule(name=dataset, path=root, batch_size=2, frame_size=32, sentence_embeddings=True)
    dm.setup("fit")
    reader, expected = _reader_and_expected(dataset, "val")
    dim = next(iter(expected.values())).shape[1]
    assert dm.sentence_embedding_dim == dim
    seen = 0
    for batch in dm.val_dataloader():
        emb = batch["sentence_embeds"]
        assert emb.dtype == torch.float32 and emb.shape == (len(batch["ids"]), 5, dim)
        for k, i in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(emb[k].numpy(), reader.sentence_embeddings(i))
            np.testing.assert_array_equal(emb[k, 1:].numpy(), expected[i])
            seen += 1
    assert seen == len(reader) == len(expected)
    train = next(iter(dm.train_dataloader()))  # shuffled split: embeddings follow their story
    assert train["sentence_embeds"].shape[1:] == (5, dim)

    limited = StoryDataModule(name=dataset, path=root, batch_size=2, frame_size=32, sentence_embeddings=True,
                              limit_val=1)
    limited.setup("validate")
    (only,) = list(limited.val_dataloader())
    assert only["sentence_embeds"].shape == (1, 5, dim)
    np.testing.assert_array_equal(only["sentence_embeds"][0].numpy(), reader.sentence_embeddings(0))

    plain = StoryDataModule(name=dataset, path=root, batch_size=2, frame_size=32)
    plain.setup("validate")
    assert "sentence_embeds" not in next(iter(plain.val_dataloader()))


def test_datamodule_sources_without_sentence_embeddings_fail_at_setup():
    h5 = FIXTURES / "h5" / "pororo.h5"
    dm = StoryDataModule(name="pororo", path=h5, batch_size=2, sentence_embeddings=True)
    with pytest.raises(ConfigurationError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert str(h5) in msg and "HDF5" in msg and "sentence_encoder.kind=hashing" in msg and "=transformers" in msg
    dm = StoryDataModule(name="ssid", path=FIXTURES / "raw" / "ssid", batch_size=2, sentence_embeddings=True)
    with pytest.raises(ConfigurationError, match="ssid.*ships no per-frame sentence embeddings"):
        dm.setup("validate")


def test_datamodule_missing_embedding_file_fails_at_setup(flintstones_copy):
    (flintstones_copy / EMBEDDINGS_FILE).unlink()
    dm = StoryDataModule(name="flintstones", path=flintstones_copy, batch_size=2, sentence_embeddings=True)
    with pytest.raises(StoryDataError, match=EMBEDDINGS_FILE):
        dm.setup("fit")
    StoryDataModule(name="flintstones", path=flintstones_copy, batch_size=2).setup("fit")  # not asked: fine


def test_collate_sentence_embeddings_all_or_none():
    def item(i, emb=True):
        it = {"frames": [np.zeros((4, 4, 3), np.uint8)] * 5, "captions": ["c"] * 5, "labels": None,
              "id": f"s{i}", "index": i}
        if emb:
            it["sentence_embeds"] = np.full((5, 3), i, np.float64)
        return it

    batch = collate_stories([item(0), item(1)])
    assert batch["sentence_embeds"].dtype == torch.float32 and batch["sentence_embeds"].shape == (2, 5, 3)
    assert batch["sentence_embeds"][1].eq(1).all()
    assert "sentence_embeds" not in collate_stories([item(0, False), item(1, False)])
    with pytest.raises(ValueError, match="s1"):
        collate_stories([item(0), item(1, False)])
