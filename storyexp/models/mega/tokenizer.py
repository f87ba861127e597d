"""min-dalle's text tokenizer for DALL-E Mega / Mini: greedy byte-pair merges over BART's vocab.json / merges.txt.

It is *not* the HF BART tokenizer (no byte-level regex pre-tokenizer), and the pretrained text embeddings were
looked up with exactly these ids, so the recipe is reproduced step for step:

1. `emoji.demojize(text, delimiters=("", ""))` (emoji names depend on the `emoji` version; 2.16.0 is pinned),
   lowercase, drop every non-ASCII character;
2. split on the space character only; empty pieces are skipped, punctuation / tabs / newlines stay in the word;
3. each word is `'Ġ'` (chr(288), the word-start marker) followed by its characters; the adjacent pair with the
   lowest merge rank is merged, repeatedly, until no adjacent pair is a known merge;
4. pieces missing from the vocabulary become `<unk>`; the result is `[<s>] + ids + [</s>]` (no truncation here:
   `encode_batch` truncates to the text length and pads with the pad id 1, as the pipeline does).

`add_tokens(names)` is StoryDALL-E's addition (character names): a whole space-delimited word equal to a name
(after the same normalisation) becomes one new id appended after the vocabulary; it never matches inside a
longer word. The text embedding then needs `vocab_size` rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

WORD_START = chr(ord(" ") + 256)  # 'Ġ'
PAD_ID = 1  # min-dalle pads with ones and masks `tokens != 1`; it never looks the id up by name


def read_merges(path: str | Path) -> list[str]:
    """merges.txt as min-dalle reads it: split on '\\n', drop the first line (the `#version` header) and the last
    element (the empty string after the final newline)."""
    return Path(path).read_text(encoding="utf-8").split("\n")[1:-1]


class MegaTokenizer:
    def __init__(self, vocab: dict[str, int], merges: Sequence[str]):
        self.vocab = dict(vocab)
        pairs = [tuple(line.split()) for line in merges]
        self.merge_rank = {pair: rank for rank, pair in enumerate(pairs)}  # a repeated pair keeps its last rank
        self.bos_id = self.vocab["<s>"]
        self.eos_id = self.vocab["</s>"]
        self.unk_id = self.vocab["<unk>"]
        self.pad_id = PAD_ID
        self.added: dict[str, int] = {}

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> "MegaTokenizer":
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, read_merges(merges_path))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can emit: the vocabulary plus added tokens (the rows a text embedding needs)."""
        return len(self.vocab) + len(self.added)

    def add_tokens(self, names: Sequence[str]) -> list[int]:
        """Append whole-word tokens (e.g. character names); returns their ids. A name already added keeps its id.

        Names are normalised like text (lowercase, ASCII) and must be one space-free word, since only whole
        words are compared with them.
        """
        ids = []
        for name in names:
            word = self.normalize(name)
            if not word or " " in word:
                raise ValueError(f"added token {name!r} must be one non-empty word (no spaces)")
            if word not in self.added:
                self.added[word] = len(self.vocab) + len(self.added)
            ids.append(self.added[word])
        return ids

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def normalize(text: str) -> str:
        from emoji import demojize

        text = demojize(text, delimiters=("", ""))
        return text.lower().encode("ascii", errors="ignore").decode()

    def bpe(self, word: str) -> list[str]:
        """'Ġ' + characters, then merge the lowest-ranked adjacent pair (its first occurrence) until none is known."""
        pieces = [WORD_START, *word]
        while len(pieces) > 1:
            ranks = [self.merge_rank.get(pair) for pair in zip(pieces[:-1], pieces[1:])]
            known = [(rank, i) for i, rank in enumerate(ranks) if rank is not None]
            if not known:
                break
            _, i = min(known)
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        return pieces

    def subwords(self, text: str) -> list[str]:
        return [piece for word in self.normalize(text).split(" ") if word for piece in self._word_pieces(word)]

    def _word_pieces(self, word: str) -> list[str]:
        return [word] if word in self.added else self.bpe(word)

    def _piece_id(self, piece: str) -> int:
        if piece in self.added:
            return self.added[piece]
        return self.vocab.get(piece, self.unk_id)

    def tokenize(self, text: str) -> list[int]:
        """`[<s>] + ids + [</s>]`, untruncated (min-dalle's `TextTokenizer.tokenize`)."""
        return [self.bos_id, *(self._piece_id(p) for p in self.subwords(text)), self.eos_id]

    def encode_batch(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """LongTensor [B, length]: each `tokenize(text)[:length]`, padded with the pad id 1.

        Truncation can cut `</s>` off (min-dalle does the same), so a row's last non-pad id is not always `</s>`.
        """
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)[:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
