"""`model.network.source`: the one switch every network family's builder reads.

    source: pretrained   the published networks, read from the files the original authors distribute
    source: sizes        the same networks randomly initialised (seeded) from a typed sizes config (the tiny test
                         models and the demo; nothing is downloaded)

Each family (``storyexp.models.<family>.build``) subclasses :class:`NetworkBuilder`, giving `from_pretrained` and
`from_sizes` (each returns the family's parts) and `finish` (the steps both sources share, e.g. adding the
dataset's character tokens); `build(network)` checks the source once and dispatches. Builders live beside the
networks they build and know nothing of Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from storyexp.errors import ConfigurationError
from storyexp.models.sizes import plain

SOURCES = ("pretrained", "sizes")

Parts = TypeVar("Parts")
Built = TypeVar("Built")


def check_source(network: Mapping[str, Any]) -> str:
    """`network.source`, or one ConfigurationError line naming the valid ones."""
    source = network.get("source") if isinstance(network, Mapping) else None
    if source not in SOURCES:
        raise ConfigurationError(f"model.network.source={source!r} is not valid: it must be one of "
                                 f"{', '.join(SOURCES)}.")
    return source


def network_seed(network: Mapping[str, Any]) -> int:
    """`network.seed` (0 when absent): the seed of every random initialisation a builder makes."""
    return int(network.get("seed", 0) or 0)


def original_name_tokens(network: Mapping[str, Any], init_key: str) -> bool:
    """`network.original_name_tokens`: whether character names are tokenized as the original trained them.

    true: the original's matching (AR-LDM: CLIP turns only a lower-case mention into the name token, as the
    transformers 4.24 slow tokenizer did; StoryDALL-E on minDALL-E: the name also matches inside a longer word,
    "eddy" in "teddy", as the plain `add_tokens` did). false: this project's (any case; whole words only).
    null (the default): true exactly when the network starts from an original checkpoint (`init_key`, which an
    original file given as `ckpt_path` sets too), so an imported checkpoint sees the token ids it was trained on.
    """
    value = network.get("original_name_tokens")
    if value is None:
        return bool(network.get(init_key))
    if not isinstance(value, bool):
        raise ConfigurationError(f"model.network.original_name_tokens={value!r} is not valid: it must be true, false "
                                 "or null (null: true when the network starts from an original checkpoint).")
    return value


class NetworkBuilder(ABC, Generic[Parts, Built]):
    """`build(network)`: check `network.source`, build the parts from that source, then `finish` them."""

    def build(self, network: Mapping[str, Any]) -> Built:
        network = dict(plain(network) or {})
        source = check_source(network)
        parts = self.from_pretrained(network) if source == "pretrained" else self.from_sizes(network)
        return self.finish(parts, network)

    @abstractmethod
    def from_pretrained(self, network: dict[str, Any]) -> Parts:
        """The published networks from their files (`source: pretrained`)."""

    @abstractmethod
    def from_sizes(self, network: dict[str, Any]) -> Parts:
        """Random (seeded) networks of the typed sizes in `network` (`source: sizes`)."""

    def finish(self, parts: Parts, network: dict[str, Any]) -> Built:
        """What both sources share once the parts exist (default: nothing)."""
        return parts  # type: ignore[return-value]
