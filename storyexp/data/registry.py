"""The one dataset registry: every dataset is a :class:`DatasetSpec`, declared by its own reader module.

A dataset is two files:

* ``storyexp/data/raw_<name>.py``, the reader, ending with ``SPEC = register(DatasetSpec(name=..., ...))``;
* ``storyexp/conf/data/<name>.yaml``, whose ``name`` is the spec's name (``_target_: storyexp.data.StoryDataModule``).

Everything that depends on the dataset (which reader opens its raw folder, how to recognise one, how tall a
stored frame is, what the converter writes, its label order, where to get it) is looked up here by name;
nothing else in :mod:`storyexp.data` branches on dataset names.

On the first look-up the modules of :data:`BUILTIN_MODULES` (which fix the order names are listed in) and
every other ``storyexp/data/raw_*.py`` are imported, each registering its ``SPEC``; a reader module outside
this package registers itself when it is imported. No torch or lightning here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storyexp.errors import ConfigurationError

from .story import Story

__all__ = [
    "BUILTIN_MODULES",
    "DatasetSpec",
    "Generator",
    "datasets_with_raw_layout",
    "get_dataset",
    "known_datasets",
    "raw_layout_of",
    "register",
    "unregister",
]

#: Reader modules imported first, in the order their names are listed to users (then any other raw_*.py).
BUILTIN_MODULES = (
    "storyexp.data.demo",
    "storyexp.data.raw_pororo",
    "storyexp.data.raw_flintstones",
    "storyexp.data.raw_ssid",
)

#: ``open_raw(root, split, frame_choice=...) -> Sequence[Story]``: one split of the raw folder, one frame per
#: caption chosen by `frame_choice` (see :mod:`storyexp.data.frames`; readers storing one frame ignore it).
RawOpener = Callable[..., Sequence[Story]]


@dataclass(frozen=True)
class Generator:
    """How a dataset that the project makes itself (the demo set) is written and checked.

    Attributes:
        defaults: the generation parameters and their default values (``data.demo`` in the config).
        ensure: ``ensure(path, **params) -> path``: write the set at `path` unless it already holds it with
            these parameters (atomically; never overwrites a file it did not generate).
        check: ``check(path, **params)``: raise :class:`~storyexp.data.story.StoryDataError` when the file at
            `path` was generated with other parameters.
    """

    defaults: Mapping[str, int]
    ensure: Callable[..., Path]
    check: Callable[..., None]

    def params(self, given: Mapping[str, Any] | None) -> dict[str, int]:
        """The defaults updated with `given`; an unknown key is a :class:`ConfigurationError`."""
        params = dict(self.defaults)
        if given:
            unknown = sorted(set(given) - set(self.defaults))
            if unknown:
                raise ConfigurationError(
                    f"unknown generation parameter(s) {unknown}; expected {sorted(self.defaults)}"
                )
            params.update({k: int(v) for k, v in dict(given).items()})
        return params


@dataclass(frozen=True)
class DatasetSpec:
    """Everything storyexp needs to know about one dataset.

    Attributes:
        name: the value of ``data.name`` (and of the converter's DATASET argument).
        title: how the dataset is called in messages (``"PororoSV"``).
        open_raw: opens one split of the raw folder as distributed (:data:`RawOpener`); ``None`` when the
            dataset only exists as HDF5 files (the demo set).
        is_raw: whether a path is a raw folder of this dataset; never raises. Used to tell a user who points
            one dataset's config at another dataset's folder which one it is.
        open_stored: what the converter stores for one split: ``open_stored(root, split) -> Sequence[Story]``
            with the frames as they are to be stored (whole Pororo strips, Flintstones clips stacked
            vertically). ``None``: the stories of ``open_raw(root, split, frame_choice="fixed")``.
        frame_height: stored frames taller than this are stacks of ``frame_height``-px frames, one of which is
            picked per caption (``None``: frames are stored one per caption).
        text_key: name of the caption dataset the converter writes (AR-LDM's: ``text``, ``ssid`` for SSID).
        characters: label order (empty for a dataset without character labels).
        download: where to get the raw data and how to lay it out, shown when the data is missing.
        generator: set for a dataset the project generates itself (:class:`Generator`).
    """

    name: str
    title: str = ""
    open_raw: RawOpener | None = None
    is_raw: Callable[[Path], bool] | None = None
    open_stored: Callable[[Path, str], Sequence[Story]] | None = None
    frame_height: int | None = None
    text_key: str = "text"
    characters: tuple[str, ...] = ()
    download: str = ""
    generator: Generator | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError(f"dataset name must be a plain word, got {self.name!r}")
        object.__setattr__(self, "characters", tuple(str(c) for c in self.characters))
        if not self.title:
            object.__setattr__(self, "title", self.name)

    @property
    def convertible(self) -> bool:
        """Whether ``python -m storyexp.data.convert`` can write it from a raw folder."""
        return self.open_raw is not None

    @property
    def convert_command(self) -> str | None:
        if not self.convertible:
            return None
        return f"python -m storyexp.data.convert {self.name} <raw dir> <out>.h5"

    def looks_like_raw(self, path: str | os.PathLike) -> bool:
        if self.is_raw is None:
            return False
        try:
            return bool(self.is_raw(Path(path).expanduser()))
        except (OSError, TypeError, ValueError):
            return False

    def open_for_storage(self, root: Path, split: str) -> Sequence[Story]:
        if self.open_stored is not None:
            return self.open_stored(root, split)
        assert self.open_raw is not None
        return self.open_raw(root, split, frame_choice="fixed")


_REGISTRY: dict[str, DatasetSpec] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the built-in reader modules (each registers its ``SPEC``) and list them first, in order."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # before importing: a module being imported may look names up
    modules = list(BUILTIN_MODULES)
    package = Path(__file__).parent
    modules += sorted(f"{__package__}.{p.stem}" for p in package.glob("raw_*.py")
                      if f"{__package__}.{p.stem}" not in modules)  # a new reader module is found by its name
    builtin = [importlib.import_module(module).SPEC for module in modules]
    others = {name: spec for name, spec in _REGISTRY.items() if all(spec is not b for b in builtin)}
    _REGISTRY.clear()
    _REGISTRY.update({spec.name: spec for spec in builtin})
    _REGISTRY.update(others)


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` to the registry (and return it, so a module can write ``SPEC = register(DatasetSpec(...))``).

    Registering a second, different spec under a taken name is a :class:`ConfigurationError` unless
    ``replace=True``; registering the same spec again (a module imported twice) is a no-op.
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register() takes a DatasetSpec, got {type(spec).__name__}")
    have = _REGISTRY.get(spec.name)
    if have is not None and have != spec and not replace:
        raise ConfigurationError(f"dataset {spec.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> DatasetSpec | None:
    """Remove a dataset (tests that register a temporary one); returns the removed spec, if any."""
    _load_builtins()
    return _REGISTRY.pop(name, None)


def known_datasets() -> tuple[str, ...]:
    """The registered dataset names, built-in ones first."""
    _load_builtins()
    return tuple(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of dataset `name`; an unknown name is a one-line :class:`ConfigurationError` listing the known."""
    _load_builtins()
    spec = _REGISTRY.get(str(name))
    if spec is None:
        raise ConfigurationError(f"unknown dataset {name!r}; known datasets: {', '.join(_REGISTRY)}")
    return spec


def datasets_with_raw_layout() -> tuple[str, ...]:
    """Names of the datasets the converter can read from a raw folder."""
    _load_builtins()
    return tuple(name for name, spec in _REGISTRY.items() if spec.convertible)


def raw_layout_of(path: str | os.PathLike) -> list[str]:
    """Names of the datasets whose raw layout `path` has (usually none or one)."""
    _load_builtins()
    return [name for name, spec in _REGISTRY.items() if spec.looks_like_raw(path)]
