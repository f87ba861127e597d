"""Sentence encoders: one vector per caption, for StoryDALL-E's story block.

StoryDALL-E feeds one sentence embedding per frame (512-d Universal Sentence Encoder vectors in the original)
through ``story_linear`` into its story block. StoryDALL-E's raw PororoSV and FlintstonesSV archives ship those
vectors (``data.sentence_embeddings=true``); for every other source they are computed from the captions by one
of these encoders:

* :class:`HashingSentenceEncoder` — signed feature hashing of word n-grams. Weight-free and deterministic, so
  it runs on a fresh machine (the demo, tests). Not a learned representation.
* :class:`TransformersSentenceEncoder` — a frozen Hugging Face encoder (e.g. a sentence-transformers model
  folder) with masked mean or CLS pooling.

Both share one interface: ``.dim`` and ``encode(captions, device=None) -> float32 [n, dim]`` (under
``no_grad``). :func:`build_sentence_encoder` builds one from the ``model.sentence_encoder`` config.
"""

from __future__ import annotations

import inspect
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from storyexp.errors import ConfigurationError, MissingResourceError

__all__ = [
    "SENTENCE_ENCODER_KINDS",
    "HashingSentenceEncoder",
    "TransformersSentenceEncoder",
    "build_sentence_encoder",
]

SENTENCE_ENCODER_KINDS = ("hashing", "transformers")
POOLINGS = ("mean", "cls")

_WORD = re.compile(r"[a-z0-9']+")
_SIGN_BIT = 1 << 31


def _as_list(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):  # a lone string would otherwise be encoded character by character
        raise TypeError("encode() takes a list of captions, got a single str; wrap it in a list")
    return [str(c) for c in captions]


class HashingSentenceEncoder(nn.Module):
    """Weight-free sentence vectors: signed feature hashing of lower-cased word n-grams, L2-normalised.

    Words are the runs of ``[a-z0-9']`` in the lower-cased caption (other characters separate words). Every
    n-gram for n = 1..`ngrams` is hashed with ``zlib.crc32`` of ``"<seed>\\x1f<n-gram>"`` (stable across
    processes and machines, unlike Python's salted ``hash()``): the low 31 bits pick one of `dim` buckets and
    bit 31 the sign (+1 / -1) added there, so colliding n-grams tend to cancel rather than pile up. The
    counts are L2-normalised; a caption without words is the zero vector.

    This is a real representation of the words (and, with ``ngrams >= 2``, of their local order) that needs
    no weights, so the demo and the tests run on a fresh machine. It knows nothing of meaning (synonyms are
    unrelated): published runs should use the dataset's USE vectors (``data.sentence_embeddings=true``) or a
    :class:`TransformersSentenceEncoder`.

    Args:
        dim: number of buckets (the output size).
        ngrams: longest word n-gram hashed (1 = bag of words, word order ignored).
        seed: changes every n-gram's bucket and sign (another, independent hashing).
    """

    def __init__(self, dim: int = 512, ngrams: int = 2, seed: int = 0) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ConfigurationError(f"HashingSentenceEncoder dim must be >= 1, got {dim}.")
        if int(ngrams) < 1:
            raise ConfigurationError(f"HashingSentenceEncoder ngrams must be >= 1, got {ngrams}.")
        self.dim, self.ngrams, self.seed = int(dim), int(ngrams), int(seed)

    def features(self, caption: str) -> dict[int, float]:
        """Signed bucket counts of one caption (before normalisation)."""
        words = _WORD.findall(caption.lower())
        counts: dict[int, float] = {}
        for n in range(1, self.ngrams + 1):
            for k in range(len(words) - n + 1):
                h = zlib.crc32(f"{self.seed}\x1f{' '.join(words[k:k + n])}".encode())
                bucket = (h & (_SIGN_BIT - 1)) % self.dim
                counts[bucket] = counts.get(bucket, 0.0) + (-1.0 if h & _SIGN_BIT else 1.0)
        return counts

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """float32 ``[len(captions), dim]``, unit rows (zero rows for captions without words), on `device`."""
        captions = _as_list(captions)
        out = torch.zeros(len(captions), self.dim, dtype=torch.float32)
        for i, caption in enumerate(captions):
            for bucket, value in self.features(caption).items():
                out[i, bucket] = value
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)  # zero rows stay zero
        return out if device is None else out.to(device)

    def forward(self, captions: Sequence[str]) -> Tensor:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ngrams={self.ngrams}, seed={self.seed}"


def _missing_model(name_or_path: str, local_files_only: bool, cause: Exception) -> MissingResourceError:
    """What is missing, where it was looked for (a folder, or the hub cache for an id), how to get it."""
    path = Path(name_or_path).expanduser()
    what = f"Sentence encoder '{name_or_path}' (model.sentence_encoder.name_or_path)"
    example = (
        "e.g. `hf download sentence-transformers/all-MiniLM-L6-v2 --local-dir <folder>` (hidden size 384, so "
        "model.sentence_encoder.dim=384)"
    )
    if path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists():
        where = str(path)
    else:  # a relative name: a folder below the working directory, or a hub id looked up in the cache
        where = f"{path.resolve()} (as a folder) or in the Hugging Face cache (as a hub id)"
    offline = " With local_files_only=true nothing is downloaded." if local_files_only else ""
    how = (
        "A model folder holds config.json, the weights (model.safetensors or pytorch_model.bin) and the "
        f"tokenizer files. Download one where a network is available, {example}, and point "
        f"model.sentence_encoder.name_or_path at it.{offline} Loading said: {cause}"
    )
    return MissingResourceError(what, where, how)


class TransformersSentenceEncoder(nn.Module):
    """A frozen Hugging Face encoder pooled into one vector per caption.

    ``AutoTokenizer`` + ``AutoModel`` from `name_or_path` (a local folder, e.g. a sentence-transformers model,
    or a hub id found in the cache). ``pooling="mean"`` averages ``last_hidden_state`` over the real tokens
    (the attention mask), so padding in a batch does not change a caption's vector; ``"cls"`` takes the first
    token. Output size ``dim`` is the model's hidden size.

    The encoder is never trained: its parameters have ``requires_grad=False`` and it stays in eval mode even
    when a parent module calls ``.train()`` (no dropout). It is an ``nn.Module`` so that ``.to(device)`` moves
    it with its owner; a system that holds it should keep it outside its registered module tree (a plain
    attribute set with ``object.__setattr__``, moved in ``on_fit_start``) if it does not want the frozen
    weights in its checkpoints, since they are reloaded from `name_or_path` anyway.

    Args:
        name_or_path: model folder or hub id.
        pooling: ``mean`` | ``cls``.
        max_length: captions are truncated to this many tokens.
        local_files_only: never download (the default: these machines are offline).

    Raises:
        MissingResourceError: the model or its tokenizer files are not there (says where to get them).
        ConfigurationError: unknown pooling or a non-positive max_length.
    """

    def __init__(
        self, name_or_path: str | os.PathLike, pooling: str = "mean", max_length: int = 128,
        local_files_only: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigurationError(f"Unknown sentence encoder pooling {pooling!r}; expected one of {POOLINGS}.")
        if int(max_length) < 1:
            raise ConfigurationError(f"Sentence encoder max_length must be >= 1, got {max_length}.")
        self.name_or_path = os.fspath(name_or_path)
        self.pooling, self.max_length = pooling, int(max_length)
        self.tokenizer, self.model = self._load(self.name_or_path, bool(local_files_only))
        self.model.requires_grad_(False)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)

    @staticmethod
    def _load(name_or_path: str, local_files_only: bool):
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when this encoder is used

        path = Path(name_or_path).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise _missing_model(name_or_path, local_files_only, FileNotFoundError(f"no config.json in {path}"))
        source = str(path) if path.is_dir() else name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            model = AutoModel.from_pretrained(source, local_files_only=local_files_only)
        except OSError as e:  # transformers' "not found / cannot connect" errors (EnvironmentError)
            raise _missing_model(name_or_path, local_files_only, e) from e
        except ValueError as e:  # e.g. a folder with config.json but no tokenizer files
            if path.is_dir():
                raise _missing_model(name_or_path, local_files_only, e) from e
            raise
        if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
            # recent transformers build an empty word-piece tokenizer when vocab files are absent: every word
            # would become [UNK] and every caption the same vector
            reason = FileNotFoundError("the tokenizer has no vocabulary besides its special tokens (tokenizer files "
                                       "such as tokenizer.json / vocab.txt are missing)")
            raise _missing_model(name_or_path, local_files_only, reason)
        return tokenizer, model

    def train(self, mode: bool = True) -> TransformersSentenceEncoder:
        """Frozen: stays in eval mode whatever the parent asks."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """float32 ``[len(captions), dim]`` on `device` (default: the encoder's device)."""
        captions = _as_list(captions)
        target = self.device if device is None else torch.device(device)
        if not captions:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=target)
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()  # [n, T, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return pooled.to(target)

    def forward(self, captions: Sequence[str]) -> Tensor:
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"name_or_path={self.name_or_path!r}, dim={self.dim}, pooling={self.pooling!r}"


_CLASSES = {"hashing": HashingSentenceEncoder, "transformers": TransformersSentenceEncoder}


def _check_options(kind: str, options: dict, reserved: tuple[str, ...]) -> None:
    params = inspect.signature(_CLASSES[kind].__init__).parameters
    allowed = [p for p in params if p != "self" and p not in reserved]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s) {unknown} for model.sentence_encoder.kind={kind}; allowed: {allowed}."
        )


def build_sentence_encoder(kind: str, dim: int, **options) -> HashingSentenceEncoder | TransformersSentenceEncoder:
    """The sentence encoder of the ``model.sentence_encoder`` config.

    Args:
        kind: ``hashing`` (options ``ngrams``, ``seed``) or ``transformers`` (options ``name_or_path``,
            ``pooling``, ``max_length``, ``local_files_only``).
        dim: the embedding size the model is built for (StoryDALL-E's ``story_linear`` input is sized from
            it). The hashing encoder outputs `dim` values; a transformers model must have hidden size `dim`.

    Raises:
        ConfigurationError: unknown kind or option, or `dim` differs from the transformers model's hidden size.
        MissingResourceError: the transformers model is not there.
    """
    if kind not in _CLASSES:
        raise ConfigurationError(
            f"Unknown model.sentence_encoder.kind {kind!r}; expected one of {list(SENTENCE_ENCODER_KINDS)}."
        )
    if kind == "hashing":
        _check_options(kind, options, reserved=("dim",))
        return HashingSentenceEncoder(dim=dim, **options)
    _check_options(kind, options, reserved=())
    if "name_or_path" not in options or options["name_or_path"] in (None, ""):
        raise ConfigurationError(
            "model.sentence_encoder.kind=transformers needs model.sentence_encoder.name_or_path "
            "(a local model folder or a cached hub id)."
        )
    encoder = TransformersSentenceEncoder(**options)
    if encoder.dim != int(dim):
        raise ConfigurationError(
            f"model.sentence_encoder.dim={dim} but the transformers model {encoder.name_or_path!r} has hidden size "
            f"{encoder.dim}; StoryDALL-E's story_linear input is sized from dim, so set "
            f"model.sentence_encoder.dim={encoder.dim} (or pick a model with hidden size {dim})."
        )
    return encoder
