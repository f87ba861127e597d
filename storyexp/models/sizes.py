"""Named sizes as typed configs: a `source: sizes` block of the yaml parsed into a frozen dataclass, strictly.

Every network family declares its sizes as a frozen dataclass (`VQGANConfig`, `StoryDalleSizes`, `MegaSizes`,
`ARLDMSizes`, ...) and parses the yaml block with :func:`parse_sizes`, which

* names an unknown key, with the known ones:  ``model.network.sizes.widht is not a known size: known are ...``
* names a missing one:                        ``model.network.stage2.n_layers is missing``
* checks and converts the value types the dataclass declares (int, float, bool, str, tuples, optionals, nested
  dataclasses, read by their own `from_block(block, where)` when they define one), naming the key when a value
  does not fit,

always as one line (:class:`storyexp.errors.ConfigurationError`). Nothing here knows a particular network.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from storyexp.errors import ConfigurationError

T = TypeVar("T")


def plain(block: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolved); anything else unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        return block
    return OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else block


def _names(keys: Collection[str]) -> str:
    return ", ".join(keys)


def unknown_key_error(where: str, unknown: Collection[str], known: Collection[str], *, what: str = "size",
                      context: str = "", reasons: Mapping[str, str] | None = None) -> ConfigurationError:
    """The one-line error for keys a block does not take (`reasons`: why a key that looks right is not set here;
    `context`: a parenthesis after the noun, e.g. ``source: pretrained``)."""
    unknown = sorted(unknown)
    context = f" ({context})" if context else ""
    for key in unknown:
        if reasons and key in reasons:
            return ConfigurationError(f"{where}.{key} is not a {what} to set here{context}: {reasons[key]}.")
    if len(unknown) == 1:
        head = f"{where}.{unknown[0]} is not a known {what}{context}"
    else:
        head = f"{where}.{{{_names(unknown)}}} are not known {what}s{context}"
    return ConfigurationError(f"{head}: known are {_names(known)}.")


def missing_key_error(where: str, missing: Collection[str]) -> ConfigurationError:
    missing = list(missing)
    if len(missing) == 1:
        return ConfigurationError(f"{where}.{missing[0]} is missing.")
    return ConfigurationError(f"{where}.{{{_names(missing)}}} are missing.")


def parse_sizes(cls: type[T], block: Any, where: str, *, required: Collection[str] | None = None,
                reasons: Mapping[str, str] | None = None, also: Collection[str] = ()) -> T:
    """`block` (a mapping, or None when absent) -> `cls(...)`, strictly.

    Args:
        cls: a dataclass; its fields are the known keys, nested dataclass fields are parsed recursively.
        where: the block's path in the composed config (``model.network.stage2``), used in every message.
        required: dotted names that must be given even though the dataclass has a default (``hparams.ch``); fields
            without a default are always required.
        reasons: key -> why it is not set here (e.g. sizes derived from the tokenizer), for a clearer message.
        also: keys that may appear beside the sizes and are not theirs (ignored here, listed as known).
    """
    required = set(required or ())
    if block is None:
        if _needs_any(cls, required):
            raise ConfigurationError(f"{where} is missing.")
        block = {}
    block = plain(block)
    if not isinstance(block, Mapping):
        raise ConfigurationError(f"{where} must be a mapping of sizes, got {type(block).__name__} {block!r}.")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = [k for k in block if k not in names and k not in also]
    if unknown:
        raise unknown_key_error(where, [str(k) for k in unknown], names + list(also), reasons=reasons)
    missing = [f.name for f in fields if f.name not in block and (_no_default(f) or f.name in required)]
    if missing:
        raise missing_key_error(where, missing)
    values = {}
    for f in fields:
        if f.name not in block:
            continue
        inner = {r.split(".", 1)[1] for r in required if r.startswith(f.name + ".")}
        values[f.name] = _convert(block[f.name], hints[f.name], f"{where}.{f.name}", inner)
    try:
        return cls(**values)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass's own check, made one line and placed
        raise ConfigurationError(f"{where}: {err}".replace("\n", " ")) from None


def check_arguments(fn: Callable, block: Mapping[str, Any], where: str, *, exclude: Collection[str] = (),
                    what: str = "argument", reasons: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`block` as keyword arguments of `fn` (a class or function), every key one of its parameters (not `exclude`).

    For the open-ended blocks (extra UNet / AutoencoderKL arguments, pretrained-build options) that are passed
    through to a constructor rather than typed field by field.
    """
    block = dict(plain(block) or {})
    known = [name for name in parameter_names(fn) if name not in exclude]
    unknown = [k for k in block if k not in known]
    if unknown:
        raise unknown_key_error(where, unknown, known, what=what, reasons=reasons)
    return block


def parameter_names(fn: Callable) -> list[str]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _needs_any(cls, required: Collection[str]) -> bool:
    return bool(required) or any(_no_default(f) for f in dataclasses.fields(cls) if f.init)


def _convert(value: Any, hint: Any, where: str, required: set[str]) -> Any:
    """`value` as the declared type `hint`, or a one-line error naming `where`."""
    value = plain(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            try:
                return _convert(value, member, where, required)
            except ConfigurationError:
                continue
        raise _type_error(where, " or ".join(_type_name(m) for m in members), value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        own = getattr(hint, "from_block", None)  # a nested block with its own reading (open-ended, derived keys)
        return own(value, where) if own is not None else parse_sizes(hint, value, where, required=required)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, "bool", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(where, "int", value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(where, "float", value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, "str", value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, "list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]", set()) for i, v in enumerate(value))
        if len(args) != len(value):
            raise _type_error(where, f"list of {len(args)}", value)
        return tuple(_convert(v, a, f"{where}[{i}]", set()) for i, (v, a) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(where, "mapping", value)
        return dict(value)
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "list"
    if origin in (dict, Mapping):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _type_error(where: str, expected: str, value: Any) -> ConfigurationError:
    return ConfigurationError(f"{where} must be {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got {value!r}.")
