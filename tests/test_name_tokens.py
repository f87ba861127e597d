"""Character names reach the networks as the originals tokenized them (issue 12, item 6).

- AR-LDM's CLIP tokenizer: transformers 4.24's slow tokenizer matched an added token case-sensitively, so only a
  lower-case "pororo" became the name token and "Pororo" fell apart into BPE pieces. The ids it produced on
  capitalised captions were recorded with transformers 4.24.0 (tests/data/recorded/, which says how) and are the
  ground truth of `original_name_tokens: true`; `false` maps every case to the name token.
- BLIP's BERT tokenizer lower-cases before matching in both versions: the same ids either way.
- BLIP's [PAD] row trains whenever the word table grew, as after the original's resize.
- StoryDALL-E on minDALL-E: the original's plain `add_tokens` also matched a name inside a longer word.
- Flintstones: the token order (the originals' fred, barney, ...) is kept apart from the label order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import CharBPETokenizer

from storyexp.errors import ConfigurationError
from storyexp.models.arldm.tokenizers import add_character_tokens, load_blip_tokenizer, load_clip_tokenizer
from storyexp.models.mindalle.tokenizer import MERGES_FILE, PAD_TOKEN, UNK_TOKEN, VOCAB_FILE, build_tokenizer
from storyexp.models.mindalle.tokenizer import add_character_tokens as add_mindalle_names
from storyexp.models.sources import original_name_tokens
from tests.conftest import compose_cfg
from tests.data_paths import parity_dir

RECORDED = Path(__file__).resolve().parent / "data" / "recorded" / "arldm_cased_tokenization.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    data = json.loads(RECORDED.read_text())
    assert data["made_with"]["transformers"] == "4.24.0"
    return data


def _clip(recorded: dict, match_case: bool):
    tokenizer = load_clip_tokenizer(parity_dir() / recorded["clip_tokenizer"].removeprefix("parity/"))
    add_character_tokens(tokenizer, recorded["new_tokens"], match_case=match_case)
    return tokenizer


def _ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=False).input_ids


def test_clip_original_name_tokens_equal_transformers_4_24(recorded, tmp_path):
    tokenizer = _clip(recorded, match_case=True)
    assert _ids(tokenizer, recorded["texts"], recorded["max_length"]) == recorded["clip_input_ids"]
    assert [tokenizer.tokenize(t) for t in recorded["texts"]] == recorded["clip_tokens"]
    # the case rule survives a save and reload (the tokenizer folder a run may write)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_clip_tokenizer(tmp_path)
    assert _ids(reloaded, recorded["texts"], recorded["max_length"]) == recorded["clip_input_ids"]


def test_clip_any_case_name_tokens_are_the_original_ids_of_lower_case_text(recorded):
    any_case, original = _clip(recorded, match_case=False), _clip(recorded, match_case=True)
    texts, n = recorded["texts"], recorded["max_length"]
    assert _ids(any_case, texts, n) == _ids(original, [t.lower() for t in texts], n)
    assert _ids(any_case, texts, n) != recorded["clip_input_ids"]  # the captions do mention capitalised names
    name_ids = set(original.convert_tokens_to_ids(recorded["new_tokens"]))
    mentions = sum(t.lower().split().count(name) for t in texts for name in recorded["new_tokens"])
    assert sum(i in name_ids for row in _ids(any_case, texts, n) for i in row) >= mentions


@pytest.mark.parametrize("match_case", [False, True])
def test_blip_ids_equal_transformers_4_24_in_both_settings(recorded, match_case):
    tokenizer = load_blip_tokenizer(parity_dir() / recorded["blip_tokenizer"].removeprefix("parity/"))
    add_character_tokens(tokenizer, recorded["new_tokens"], match_case=False)
    assert _ids(tokenizer, recorded["texts"], recorded["max_length"]) == recorded["blip_input_ids"]


def test_original_name_tokens_resolution():
    assert original_name_tokens({}, "init_from_original") is False
    assert original_name_tokens({"init_from_original": "/x/last.ckpt"}, "init_from_original") is True
    assert original_name_tokens({"original_name_tokens": None, "init_from_storydalle": "9.pth"},
                                "init_from_storydalle") is True
    assert original_name_tokens({"original_name_tokens": False, "init_from_original": "x"}, "init_from_original") is False
    assert original_name_tokens({"original_name_tokens": True}, "init_from_original") is True
    with pytest.raises(ConfigurationError, match=r"^model\.network\.original_name_tokens='yes' is not valid"):
        original_name_tokens({"original_name_tokens": "yes"}, "init_from_original")


def _arldm_from_parity(original: bool):
    from storyexp.models.arldm.build import build_arldm

    from tests.parity import arldm_support as support

    root = parity_dir() / "arldm"
    network = {"source": "pretrained", "stable_diffusion": str(root / "pretrained"),
               "blip_checkpoint": str(root / "blip" / "model_large_tiny.pth"),
               "bert_tokenizer": str(root / "blip" / "bert_tokenizer"), "original_name_tokens": original,
               "blip_med_config": str(root / "blip" / "med_config.json"),
               "blip_vision": json.loads((root / "blip" / "vit_config.json").read_text()), "local_files_only": True}
    return build_arldm(network, support.new_tokens(), max_length=support.max_length())


def test_arldm_builder_switch_and_blip_padding_row(recorded):
    built = _arldm_from_parity(original=True)
    texts, n = recorded["texts"], recorded["max_length"]
    assert _ids(built.clip_tokenizer, texts, n) == recorded["clip_input_ids"]
    assert _ids(_arldm_from_parity(original=False).clip_tokenizer, texts, n) == _ids(
        built.clip_tokenizer, [t.lower() for t in texts], n)

    # the BLIP table grew by the character tokens, so its [PAD] row has no padding_idx and learns
    table = built.model.mm_encoder.text.embeddings.word_embeddings
    assert table.padding_idx is None
    pad = built.blip_tokenizer.pad_token_id
    ids = torch.full((1, 6), pad)
    ids[0, :2] = torch.tensor([built.blip_tokenizer.cls_token_id, built.blip_tokenizer.sep_token_id])
    image = torch.zeros(1, 3, built.model.mm_encoder.image_size, built.model.mm_encoder.image_size)
    built.model.mm_encoder(image, ids, attention_mask=None).square().sum().backward()
    assert table.weight.grad[pad].abs().sum() > 0


def test_blip_padding_row_kept_when_nothing_is_added():
    from storyexp.models.arldm.blip import BlipMultimodalConfig, BlipMultimodalEncoder

    encoder = BlipMultimodalEncoder(BlipMultimodalConfig(image_size=32, patch_size=16, vision_width=16, vision_depth=1,
                                                         vision_heads=2, text_hidden_size=16, text_layers=1,
                                                         text_heads=2, text_intermediate_size=32, vocab_size=40,
                                                         enc_token_id=39))
    assert encoder.text.embeddings.word_embeddings.padding_idx == 0  # the table as BLIP builds it
    encoder.resize_token_embeddings(44)  # the original's resize: no padding row
    assert encoder.text.embeddings.word_embeddings.padding_idx is None


def _mindalle_tokenizer(whole_words: bool | None):
    folder = parity_dir() / "mindalle" / "tokenizer"
    if whole_words is None:  # the original: CharBPETokenizer + [PAD] + plain add_tokens (storydalle.md 2.1)
        tokenizer = CharBPETokenizer.from_file(str(folder / VOCAB_FILE), str(folder / MERGES_FILE),
                                               unk_token=UNK_TOKEN, lowercase=True, dropout=None)
        tokenizer.add_special_tokens([PAD_TOKEN])
        tokenizer.add_tokens(["eddy", "pororo"])
        return tokenizer
    tokenizer = build_tokenizer(folder, context_length=64)
    add_mindalle_names(tokenizer, ["eddy", "pororo"], whole_words=whole_words)
    return tokenizer


def test_mindalle_original_name_tokens_match_inside_words():
    texts = ["Teddy and Eddy see Pororo.", "pororos eddy teddy"]
    original = _mindalle_tokenizer(None)
    ours_original = _mindalle_tokenizer(whole_words=False)
    ours = _mindalle_tokenizer(whole_words=True)
    expected = [e.ids for e in original.encode_batch(texts)]
    got = [e.ids[: len(x)] for e, x in zip(ours_original.encode_batch(texts), expected)]
    assert got == expected
    eddy = ours.token_to_id("eddy")
    assert eddy in expected[0][:2]  # "teddy" -> "t" + the name token in the original
    assert ours.encode(texts[0]).ids[:2].count(eddy) == 0  # whole words only
    assert ours.encode(texts[0]).ids.count(eddy) == 1


@pytest.mark.parametrize("model", ["arldm_tiny", "mindalle_tiny", "mega_tiny"])
def test_flintstones_token_order_is_not_the_label_order(model, tmp_path):
    cfg = compose_cfg([f"model={model}", "data=flintstones"], tmp_path)
    assert list(cfg.model.characters) == ["fred", "barney", "wilma", "betty", "pebbles", "dino", "slate"]
    labels = ["wilma", "fred", "betty", "barney", "dino", "pebbles", "slate"]
    assert list(cfg.data.characters) == labels
    assert list(cfg.callbacks.story_evaluation.characters) == labels
    # the switch exists where the original tokenized names differently (Mega's whole-word rule is the original's)
    assert cfg.model.network.get("original_name_tokens", "absent") == ("absent" if model == "mega_tiny" else None)


@pytest.mark.parametrize("model", ["arldm_tiny", "mindalle_tiny"])
def test_original_name_tokens_option_composes_and_builds(model, tmp_path):
    from storyexp.tasks.common import build_model

    built = {}
    for value in ("true", "false"):
        cfg = compose_cfg([f"model={model}", "data=demo", f"model.network.original_name_tokens={value}"], tmp_path)
        assert cfg.model.network.original_name_tokens is (value == "true")
        built[value] = build_model(cfg)
    if model == "mindalle_tiny":  # the names are added tokens, whole-word ones only with `false`
        added = {t.content: t.single_word for t in built["true"].tokenizer.get_added_tokens_decoder().values()}
        assert added["pip"] is False
        added = {t.content: t.single_word for t in built["false"].tokenizer.get_added_tokens_decoder().values()}
        assert added["pip"] is True
    cfg = compose_cfg([f"model={model}", "data=demo", "model.network.original_name_tokens=yes"], tmp_path)
    with pytest.raises(ConfigurationError, match=r"original_name_tokens='yes' is not valid"):
        build_model(cfg)
