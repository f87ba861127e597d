"""minDALL-E's text tokenizer: a CharBPE (HF `tokenizers`) vocabulary padded/truncated to the text context.

The recipe is the one minDALL-E uses (BPE ids, then `[PAD]` up to `context_length`; no BOS/EOS), so that ids
match the pretrained `tok_emb_txt` rows bit for bit. Three more ways in:

- `word_tokenizer(words, ...)`: the same CharBPE model whose merges spell each listed word as one token, for the
  demo and tiny models (no 16k vocabulary can be downloaded or trained here);
- `add_character_tokens`: StoryDALL-E's character names appended as whole-word tokens (the original's plain
  `add_tokens` also matched inside longer words, e.g. "eddy" in "teddy": `whole_words=False`, which
  `model.network.original_name_tokens` selects);
- `tokenizer_to_json` / `tokenizer_from_json`: the grown tokenizer travels inside a training checkpoint (the
  original saved only vocab.json/merges.txt and re-added the characters at inference).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, CharBPETokenizer, Tokenizer

VOCAB_FILE = "bpe-16k-vocab.json"
MERGES_FILE = "bpe-16k-merges.txt"
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
SUFFIX = "</w>"  # CharBPE's end-of-word marker
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _pad_to_context(tokenizer, context_length: int):
    """`[PAD]` appended as a special token, then padding and truncation to `context_length` (minDALL-E's order)."""
    tokenizer.add_special_tokens([PAD_TOKEN])
    tokenizer.enable_padding(length=context_length, pad_id=tokenizer.token_to_id(PAD_TOKEN))
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


def build_tokenizer(
    folder: str | Path,
    context_length: int,
    lowercase: bool = True,
    dropout: float | None = None,
) -> CharBPETokenizer:
    """Load `<folder>/bpe-16k-{vocab.json,merges.txt}` and pad/truncate every encoding to `context_length`.

    `[PAD]` is added as a special token *after* loading; when it is not in the trained vocabulary it gets the id
    `vocab_size` (appended), which is why the pad id must be read back with `token_to_id` rather than assumed.
    """
    folder = Path(folder)
    tokenizer = CharBPETokenizer.from_file(
        str(folder / VOCAB_FILE),
        str(folder / MERGES_FILE),
        unk_token=UNK_TOKEN,
        lowercase=lowercase,
        dropout=dropout,
    )
    return _pad_to_context(tokenizer, context_length)


def word_tokenizer(words: Iterable[str], context_length: int, alphabet: str = ALPHABET) -> CharBPETokenizer:
    """A CharBPE tokenizer whose merges build every word of `words` (lower-cased) into one token.

    Every single character of `alphabet` (with and without the end-of-word suffix) is in the vocabulary, so any
    other text still tokenizes, character by character; characters outside it become `[UNK]`.
    """
    vocab: dict[str, int] = {UNK_TOKEN: 0}
    merges: dict[tuple[str, str], None] = {}  # ordered set: the merge ranks

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in alphabet:
        add(ch)
        add(ch + SUFFIX)
    for word in dict.fromkeys(w.lower() for w in words if w):
        pieces = list(word)
        pieces[-1] += SUFFIX
        current = pieces[0]
        for piece in pieces[1:]:
            merges.setdefault((current, piece))
            current += piece
            add(current)
    tokenizer = CharBPETokenizer(vocab, list(merges), unk_token=UNK_TOKEN, lowercase=True)
    return _pad_to_context(tokenizer, context_length)


def add_character_tokens(tokenizer, names: Sequence[str], whole_words: bool = True) -> list[int]:
    """Append `names` as tokens matched after lower-casing; returns their ids (existing ones kept).

    `whole_words`: a name matches only as a whole word. False: the original's plain `add_tokens(names)`, which
    also matches inside a longer word ("teddy" -> "t" + "eddy"); the ids of a released checkpoint's training.
    """
    tokens = [AddedToken(n.lower(), single_word=bool(whole_words), normalized=True) for n in names]
    tokenizer.add_tokens(tokens)
    return [tokenizer.token_to_id(n.lower()) for n in names]


def tokenizer_to_json(tokenizer) -> str:
    """The whole tokenizer (vocabulary, merges, added tokens, padding, truncation) as one JSON string."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # CharBPETokenizer wraps a `tokenizers.Tokenizer`
    return inner.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    return Tokenizer.from_str(text)


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit (added tokens included): the rows `tok_emb_txt` needs."""
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def pad_id(tokenizer) -> int:
    return int(tokenizer.token_to_id(PAD_TOKEN))
