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
