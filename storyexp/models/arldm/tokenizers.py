"""Tokenizers of AR-LDM: CLIP's (captions -> UNet context) and BLIP's BERT (history captions).

Loading follows the original: the CLIP tokenizer of the Stable Diffusion folder; bert-base-uncased extended the
way BLIP's ``init_tokenizer`` does it ([DEC] as bos token, [ENC] as the additional special token whose id BLIP
writes over [CLS] in multimodal mode). Character names are added to both with ``add_character_tokens``.

The two ``write_*`` builders create small tokenizer folders from a word list, with no download, for the built-in
demo and the tiny test configurations. They write the same file formats as the real tokenizers so that
transformers' ``CLIPTokenizer`` / ``BertTokenizer`` load them unchanged.
"""

from __future__ import annotations

import json
import string
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex
from tokenizers import AddedToken
from transformers import BertTokenizer, CLIPTokenizer

ENC_TOKEN = "[ENC]"
DEC_TOKEN = "[DEC]"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# CLIP's pre-tokenisation pattern (what its tokenizer splits lower-cased text into before BPE).
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The CLIP tokenizer of a Stable Diffusion ``tokenizer`` folder (pad token = <|endoftext|> in SD v1.5)."""
    return CLIPTokenizer.from_pretrained(str(folder))


def _extra_special_tokens(tokenizer) -> list[str]:
    # transformers 5 calls them extra_special_tokens, 4.x additional_special_tokens.
    for name in ("extra_special_tokens", "additional_special_tokens"):
        tokens = getattr(tokenizer, name, None)
        if tokens:
            return [str(t) for t in tokens]
    return []


def load_blip_tokenizer(folder: str | Path) -> BertTokenizer:
    """bert-base-uncased (or a folder in its format) + [DEC] (bos) + [ENC], like BLIP's ``init_tokenizer``.

    Sets ``tokenizer.enc_token_id`` (the id of the first additional special token, [ENC]). A folder that was
    saved after this step already holds both tokens; nothing is added twice.
    """
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if not _extra_special_tokens(tokenizer):
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokenizer.enc_token_id = blip_enc_token_id(tokenizer)
    return tokenizer


def blip_enc_token_id(tokenizer) -> int:
    """Id of BLIP's [ENC] token (the first additional special token)."""
    extra = _extra_special_tokens(tokenizer)
    token = extra[0] if extra else ENC_TOKEN
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the BLIP tokenizer has no {ENC_TOKEN} token; load it with load_blip_tokenizer()")
    return int(token_id)


def add_character_tokens(tokenizer, names: Iterable[str], match_case: bool = False) -> list[str]:
    """Add character names as whole tokens; only names missing from the vocabulary are added (in order).

    ``match_case``: the name token stands for the name as written (lower case) only, as the original's
    transformers 4.24 slow ``CLIPTokenizer`` matched added tokens, before lower-casing the rest of the text:
    "pororo" is the new token, "Pororo" and "PORORO" fall apart into the pretrained BPE pieces of "pororo".
    Otherwise (current transformers) the name is matched after the tokenizer's normalisation, so any case maps to
    the new token. A BERT tokenizer (``do_lower_case``) lower-cases before matching in both versions, so the
    original BLIP tokenizer was case-insensitive: leave ``match_case`` off for it.
    Returns the names that were added. Embedding tables must then be sized ``len(tokenizer)``.
    """
    vocab = tokenizer.get_vocab()
    missing = []
    for name in names:
        if name not in vocab and name not in missing:
            missing.append(name)
    if missing:
        # normalized=False: matched against the raw text, i.e. case-sensitively (the 4.24 slow tokenizer's trie)
        tokenizer.add_tokens([AddedToken(name, normalized=False) for name in missing] if match_case else missing)
    return missing


def tokenize(tokenizer, texts: list[str], max_length: int):
    """AR-LDM's caption tokenisation: pad to ``max_length``, no truncation; over-long captions raise."""
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=False, return_tensors="pt")
    if enc.input_ids.shape[-1] != max_length:
        lengths = [len(ids) for ids in tokenizer(texts).input_ids]
        too_long = [(t, n) for t, n in zip(texts, lengths) if n > max_length]
        raise ValueError(
            f"{len(too_long)} caption(s) are longer than max_length={max_length} tokens, e.g. "
            f"{too_long[0][0]!r} ({too_long[0][1]} tokens); raise max_length or shorten the captions"
        )
    return enc.input_ids, enc.attention_mask


# --------------------------------------------------------------------------------------------------------------
# Builders (no download)
# --------------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2/CLIP), in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves; the others are shifted to code points from 256 up. Written out
    here because transformers only ships it as a private helper of its converters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _clip_pieces(words: Iterable[str]) -> list[str]:
    """Lower-cased CLIP pre-tokens of the given words (each becomes one BPE 'word')."""
    pieces = []
    for word in words:
        text = " ".join(unicodedata.normalize("NFC", word).split()).lower()
        for piece in _CLIP_PATTERN.findall(text):
            if piece not in (CLIP_BOS, CLIP_EOS) and piece not in pieces:
                pieces.append(piece)
    return pieces


def _learn_merges(symbol_words: list[list[str]]) -> list[tuple[str, str]]:
    """Classic BPE training run to completion: merge the most frequent adjacent pair until every word is one symbol.

    tokenizers' ``BpeTrainer`` was considered; it is not used because CLIP's file layout needs the merges in
    learning order with a byte alphabet placed first, and the trainer stops at a vocabulary size rather than
    guaranteeing that every given word ends as a single token. Ties go to the pair seen first (deterministic).
    """
    words = [list(w) for w in symbol_words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=counts.get)  # first maximal pair in insertion order
        merges.append(best)
        joined = best[0] + best[1]
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def write_clip_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write a CLIP-format tokenizer folder whose merges build every given word into one token.

    vocab.json: the 256 byte symbols, the same 256 with ``</w>``, one entry per merge, then ``<|startoftext|>``
    and ``<|endoftext|>`` (as CLIP's vocabulary is laid out); pad token = ``<|endoftext|>`` as in SD v1.5.
    Any other text still tokenizes (byte fallback through the 512 base symbols).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_encoder = bytes_to_unicode()
    alphabet = list(byte_encoder.values())
    vocab_list = alphabet + [s + "</w>" for s in alphabet]
    symbol_words = []
    for piece in _clip_pieces(words):
        symbols = [byte_encoder[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        symbol_words.append(symbols)
    merges = _learn_merges(symbol_words)
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    config = dict(specials, model_max_length=int(model_max_length), tokenizer_class="CLIPTokenizer", errors="replace")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def _bert_words(words: Iterable[str]) -> list[str]:
    """Lower-cased, accent-stripped, punctuation-split words (what BERT's basic tokenizer yields)."""
    out = []
    for word in words:
        text = unicodedata.normalize("NFD", word.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        for piece in regex.findall(r"[\p{L}\p{N}]+|[^\s\p{L}\p{N}]", text):
            if piece not in out:
                out.append(piece)
    return out


def write_bert_tokenizer(words: Iterable[str], out_dir: str | Path) -> Path:
    """Write a bert-base-uncased-format folder (vocab.txt + tokenizer_config.json) holding the given words.

    Layout: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, the words, then every single character (a-z, 0-9,
    ASCII punctuation and any other character of the words) and its ``##`` continuation, so that any lower-case
    text tokenizes into known pieces.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = list(BERT_SPECIALS)
    seen = set(vocab)

    def add(token: str) -> None:
        if token not in seen:
            seen.add(token)
            vocab.append(token)

    bert_words = _bert_words(words)
    for w in bert_words:
        add(w)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    for w in bert_words:
        chars += [c for c in w if c not in chars]
    for c in chars:
        add(c)
    for c in chars:
        if c.isalnum():
            add("##" + c)
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    config = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir
