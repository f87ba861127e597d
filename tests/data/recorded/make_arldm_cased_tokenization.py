"""Writes arldm_cased_tokenization.json: AR-LDM's caption tokenization of capitalised captions, as the original ran it.

Run with the original's library versions (not this project's environment):

    python -m venv /tmp/v424 && /tmp/v424/bin/pip install transformers==4.24.0 tokenizers==0.13.3 ftfy==6.3.1 \
        "numpy<2" "huggingface_hub<0.20"
    /tmp/v424/bin/python tests/data/recorded/make_arldm_cased_tokenization.py

It follows ARLDM's datasets/pororo.py: the Stable Diffusion CLIPTokenizer and BLIP's init_tokenizer (bert-base-uncased
+ [DEC] as bos + [ENC]), `add_tokens(new_tokens)` on both, then padding to max_length without truncation. The
tokenizer files are the AR-LDM parity set's stand-ins (parity/arldm/pretrained/tokenizer, parity/arldm/blip/
bert_tokenizer) with the parity set's character tokens.
"""

import json
import sys
from pathlib import Path

import transformers
from transformers import BertTokenizer, CLIPTokenizer

HERE = Path(__file__).resolve().parent
PARITY = HERE.parent / "parity" / "arldm"
NEW_TOKENS = ["pororo", "loopy", "eddy", "crong"]
MAX_LENGTH = 24
TEXTS = [
    "Pororo is playing in the snow .",
    "Crong runs outside to see the big tree .",
    "pororo and Crong eat cake .",
    "LOOPY laughs at Eddy .",
    "Eddy, Pororo and loopy run .",
    "Pororo's friend crong is here .",
    "the pororos and eddy play .",
]


def main() -> None:
    assert transformers.__version__ == "4.24.0", transformers.__version__
    clip = CLIPTokenizer.from_pretrained(str(PARITY / "pretrained" / "tokenizer"))
    blip = BertTokenizer.from_pretrained(str(PARITY / "blip" / "bert_tokenizer"))
    blip.add_special_tokens({"bos_token": "[DEC]"})
    blip.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    clip.add_tokens(NEW_TOKENS)
    blip.add_tokens(NEW_TOKENS)
    kw = dict(padding="max_length", max_length=MAX_LENGTH, truncation=False)
    out = {
        "made_with": {"transformers": transformers.__version__, "python": sys.version.split()[0],
                      "clip_tokenizer_class": type(clip).__name__, "blip_tokenizer_class": type(blip).__name__},
        "clip_tokenizer": "parity/arldm/pretrained/tokenizer",
        "blip_tokenizer": "parity/arldm/blip/bert_tokenizer",
        "new_tokens": NEW_TOKENS,
        "max_length": MAX_LENGTH,
        "texts": TEXTS,
        "clip_input_ids": clip(TEXTS, **kw).input_ids,
        "clip_tokens": [clip.tokenize(t) for t in TEXTS],
        "blip_input_ids": blip(TEXTS, **kw).input_ids,
        "blip_tokens": [blip.tokenize(t) for t in TEXTS],
    }
    (HERE / "arldm_cased_tokenization.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
