"""Tokenisation with ARLDM's dataset settings: ids, masks, vocabularies, special ids and null tokens."""

from __future__ import annotations

import pytest

from . import arldm_support as S


from storyexp.models.arldm import (  # noqa: E402
    add_character_tokens,
    blip_enc_token_id,
    load_blip_tokenizer,
    load_clip_tokenizer,
    tokenize,
)


def _tokenization():
    import json

    return json.loads((S.ARLDM_DIR / "tokenization.json").read_text())


STORIES = list(range(len(_tokenization()["stories"])))
SOURCES = ["pipeline", "saved_folders"]


def _tokenizers(source: str):
    """('pipeline') pretrained/tokenizer + blip/bert_tokenizer + character tokens, as the builder does it;
    ('saved_folders') the tokenizers the original saved after adding the tokens."""
    if source == "pipeline":
        clip = load_clip_tokenizer(S.ARLDM_DIR / "pretrained" / "tokenizer")
        blip = load_blip_tokenizer(S.ARLDM_DIR / "blip" / "bert_tokenizer")
        add_character_tokens(clip, S.new_tokens())
        add_character_tokens(blip, S.new_tokens())
    else:
        clip = load_clip_tokenizer(S.ARLDM_DIR / "tokenizers_with_new_tokens" / "clip")
        blip = load_blip_tokenizer(S.ARLDM_DIR / "tokenizers_with_new_tokens" / "blip")
    return clip, blip


@pytest.mark.parametrize("source", SOURCES)
def test_vocabularies_and_special_ids(source):
    sizes = S.meta()["sizes"]
    clip, blip = _tokenizers(source)
    assert len(clip) == sizes["clip_vocab_after_new_tokens"] == S.dataset_args()["clip_embedding_tokens"]
    assert len(blip) == sizes["blip_vocab_after_new_tokens"] == S.dataset_args()["blip_embedding_tokens"]
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (
        sizes["clip_bos_id"], sizes["clip_eos_id"], sizes["clip_pad_id"],
    )
    assert (blip.cls_token_id, blip.sep_token_id, blip.pad_token_id) == (
        sizes["bert_cls_id"], sizes["bert_sep_id"], sizes["bert_pad_id"],
    )
    assert blip.bos_token_id == sizes["blip_dec_token_id"]
    assert blip.enc_token_id == blip_enc_token_id(blip) == sizes["blip_enc_token_id"]


def test_character_tokens_added_once_and_in_order():
    sizes = S.meta()["sizes"]
    clip = load_clip_tokenizer(S.ARLDM_DIR / "pretrained" / "tokenizer")
    blip = load_blip_tokenizer(S.ARLDM_DIR / "blip" / "bert_tokenizer")
    assert len(clip) == sizes["clip_vocab_pretrained"] and len(blip) == sizes["blip_vocab_pretrained"]
    assert len(add_character_tokens(clip, S.new_tokens())) == sizes["clip_new_tokens_added"]
    assert len(add_character_tokens(blip, S.new_tokens())) == sizes["blip_new_tokens_added"]
    assert add_character_tokens(clip, S.new_tokens()) == [] and add_character_tokens(blip, S.new_tokens()) == []
    saved_clip, saved_blip = _tokenizers("saved_folders")
    for name in S.new_tokens():
        assert clip.convert_tokens_to_ids(name) == saved_clip.convert_tokens_to_ids(name)
        assert blip.convert_tokens_to_ids(name) == saved_blip.convert_tokens_to_ids(name)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("story", STORIES)
def test_caption_ids_and_masks(story, source):
    record = _tokenization()["stories"][story]
    s = _tokenization()["max_length"]
    clip, blip = _tokenizers(source)
    texts = record["texts"]
    # CLIP gets the target captions only (the last V of the story), BERT all source captions.
    targets = texts[len(texts) - len(record["clip_input_ids"]) :]
    ids, mask = tokenize(clip, targets, s)
    S.assert_equal(ids, record["clip_input_ids"], "CLIP ids")
    S.assert_equal(mask, record["clip_attention_mask"], "CLIP mask")
    ids, mask = tokenize(blip, texts, s)
    S.assert_equal(ids, record["blip_input_ids"], "BERT ids")
    S.assert_equal(mask, record["blip_attention_mask"], "BERT mask")


@pytest.mark.parametrize("source", SOURCES)
def test_null_tokens(source):
    nulls = _tokenization()["null_tokens"]
    s = _tokenization()["max_length"]
    clip, blip = _tokenizers(source)
    S.assert_equal(tokenize(clip, [""], s)[0], nulls["clip_text_null_token"], "CLIP null caption")
    S.assert_equal(tokenize(blip, [""], s)[0], nulls["blip_text_null_token_as_built"], "BERT null caption")


def test_model_null_buffers_match_tokenizers_and_checkpoint():
    nulls = _tokenization()["null_tokens"]
    model = S.parity_model().model
    ckpt = S.checkpoint_state_dict()
    S.assert_equal(model.clip_text_null_token, nulls["clip_text_null_token"], "clip_text_null_token")
    S.assert_equal(model.blip_text_null_token, nulls["blip_text_null_token_as_built"], "blip_text_null_token")
    for name in ("clip_text_null_token", "blip_text_null_token", "blip_image_null_token"):
        S.assert_equal(getattr(model, name), ckpt[name], name)
    # the pretrained builder computes them itself (before the checkpoint is loaded)
    fresh = S.build_from_pretrained().model
    for name in ("clip_text_null_token", "blip_text_null_token", "blip_image_null_token"):
        S.assert_equal(getattr(fresh, name), ckpt[name], f"{name} as built")


def test_over_long_caption_raises():
    clip, _ = _tokenizers("pipeline")
    with pytest.raises(ValueError, match="longer than max_length"):
        tokenize(clip, ["the " * (S.max_length() + 5)], S.max_length())
