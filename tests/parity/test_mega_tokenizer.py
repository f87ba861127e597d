"""min-dalle text tokenizer (storyexp.models.mega.tokenizer) vs. the ids recorded from kuprel/min-dalle 0.4.11.

Parity README §2.2 (vocab.json / merges.txt) and §2.3 `tokenizer`: ids, subwords and the [texts, 2, 64] arrays the
pipeline builds (unconditional row + caption row) are exact. Every case and length comes from cases.pt.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import parity_dir

MEGA = parity_dir() / "mega"

from storyexp.models.mega import MegaTokenizer, unconditional_ids  # noqa: E402
from storyexp.models.mega.tokenizer import read_merges  # noqa: E402


@functools.cache
def cases() -> dict:
    return torch.load(MEGA / "cases.pt", map_location="cpu", weights_only=True)


def tokenizer() -> MegaTokenizer:
    return MegaTokenizer.from_files(MEGA / "vocab.json", MEGA / "merges.txt")


def test_emoji_version_matches_the_recording():
    import emoji

    # emoji names (hence ids of texts with emoji) depend on the emoji package version
    assert emoji.__version__ == cases()["tokenizer"]["emoji_version"]


def test_merges_file_reading():
    lines = (MEGA / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = read_merges(MEGA / "merges.txt")
    assert merges == lines[1:-1]
    assert lines[0].startswith("#") and lines[-1] == ""  # the header and the empty tail are what gets dropped
    assert all(len(m.split()) == 2 for m in merges)


def test_special_ids():
    tok, special = tokenizer(), cases()["tokenizer"]["special_ids"]
    assert tok.bos_id == special["<s>"] and tok.eos_id == special["</s>"] and tok.unk_id == special["<unk>"]
    assert tok.pad_id == special["<pad>"]
    assert tok.vocab_size == len(tok.vocab) == special["<mask>"] + 1  # <mask> is the last vocabulary entry


def test_ids_and_subwords_exact():
    tok, c = tokenizer(), cases()["tokenizer"]
    for text, ids, pieces in zip(c["texts"], c["token_ids"], c["subwords"], strict=True):
        assert tok.subwords(text) == pieces, text
        assert tok.tokenize(text) == ids, text


def test_pipeline_text_arrays_exact_including_truncation():
    tok, c = tokenizer(), cases()["tokenizer"]
    arrays = c["text_tokens"]  # [texts, 2 (unconditional, caption), length]
    length = arrays.shape[-1]
    ids = tok.encode_batch(c["texts"], length)
    assert torch.equal(ids, arrays[:, 1])
    assert torch.equal(unconditional_ids(ids), arrays[:, 0])
    # the record holds a caption longer than the text length: cut to `length` ids, </s> dropped, and the
    # unconditional row then ends with the last kept id
    long = [i for i, t in enumerate(c["token_ids"]) if len(t) > length]
    assert long, "cases.pt should hold a caption longer than the text length"
    for i in long:
        assert ids[i].tolist() == c["token_ids"][i][:length]
        assert arrays[i, 0, 1].item() == c["token_ids"][i][length - 1] != tok.eos_id


def test_add_tokens_whole_words_only():
    tok = tokenizer()
    base = tok.vocab_size
    new = tok.add_tokens(["Pororo", "crong"])
    assert new == [base, base + 1] and tok.vocab_size == base + 2
    assert tok.add_tokens(["pororo"]) == [base]  # already added: same id, no growth
    assert tok.vocab_size == base + 2
    assert tok.tokenize("PORORO  crong") == [tok.bos_id, base, base + 1, tok.eos_id]
    # "pororo." and "xcrong" are not whole-word matches: they go through BPE and use no added id
    text = "met pororo. xcrong"
    ids = tok.tokenize(text)
    assert ids == tokenizer().tokenize(text)
    assert not set(ids) & set(new)
    with pytest.raises(ValueError):
        tok.add_tokens(["two words"])
