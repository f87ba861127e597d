"""`MinDalle.from_pretrained` on the parity folder: the public API reproduces the original's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data_paths import parity_dir
from storyexp.errors import MissingResourceError

ROOT = parity_dir()
FOLDER = ROOT / "mindalle"


@pytest.fixture(scope="module")
def model():
    from storyexp.models.mindalle import MinDalle

    return MinDalle.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def cases():
    return torch.load(FOLDER / "cases.pt", map_location="cpu", weights_only=True)


def test_public_api_reproduces_the_original(model, cases):
    tok = cases["tokenizer"]
    assert model.tokenize(tok["texts"]).tolist() == tok["ids"].tolist()
    assert torch.equal(model.encode_images(cases["stage1"]["images"]), cases["stage1"]["codes"])
    s = cases["sampling"]
    torch.testing.assert_close(model.decode_codes(s["codes"]), s["pixels"], atol=1e-4, rtol=0)
    f = cases["stage2_forward"]
    logits_img, logits_txt = model.logits(f["texts"], f["images"])
    torch.testing.assert_close(logits_img, f["logits_img"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_txt, f["logits_txt"], atol=1e-4, rtol=0)


def test_seeded_sampling_reproduces_the_recorded_codes(model, cases):
    s = cases["sampling"]
    ids = model.tokenize([s["prompt"]])
    assert ids.repeat(s["num_candidates"], 1).tolist() == s["tokens"].tolist()
    generator = torch.Generator().manual_seed(int(s["seed"]))
    codes = model.sample(ids, top_k=s["top_k"], top_p=s["top_p"], temperature=s["softmax_temperature"],
                         num_candidates=s["num_candidates"], generator=generator)
    assert torch.equal(codes, s["codes"])


def test_missing_files_are_listed(tmp_path):
    from storyexp.models.mindalle import MinDalle

    (tmp_path / "config.yaml").write_text((FOLDER / "config.yaml").read_text())
    with pytest.raises(MissingResourceError, match="stage1_last.ckpt.*stage2_last.ckpt.*bpe-16k-vocab.json"):
        MinDalle.from_pretrained(tmp_path)
