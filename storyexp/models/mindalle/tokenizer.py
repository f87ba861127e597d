"""minDALL-E's text tokenizer: a CharBPE (HF `tokenizers`) vocabulary padded/truncated to the text context.

The recipe is the one minDALL-E uses (BPE ids, then `[PAD]` up to `context_length`; no BOS/EOS), so that ids
match the pretrained `tok_emb_txt` rows bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import CharBPETokenizer

VOCAB_FILE = "bpe-16k-vocab.json"
MERGES_FILE = "bpe-16k-merges.txt"
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"


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
    tokenizer.add_special_tokens([PAD_TOKEN])
    tokenizer.enable_padding(length=context_length, pad_id=tokenizer.token_to_id(PAD_TOKEN))
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer
