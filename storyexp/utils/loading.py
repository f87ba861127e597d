"""The one loader for every file a user hands in, and the one strict state-dict check.

Checkpoints (`ckpt_path`), original weights (`init_from_*`, minDALL-E / min-dalle / taming / BLIP / AR-LDM files) and
the project's own caches all load through `load_file`:

- `*.safetensors` with safetensors (no code can run);
- anything else with `torch.load(weights_only=True)`: tensors, plain containers and numbers only, plus the few
  types Lightning checkpoints hold (`SAFE_GLOBALS`). A pickle that would import anything else is refused before
  any of it runs.
- Lightning 1.x checkpoints (taming-transformers' `last.ckpt`, written by PL 1.0) name a callback class as the key
  of their `callbacks` state. Those classes are allowed by name only (`NAME_ONLY_GLOBALS`): the name loads as an
  inert stand-in class, pytorch_lightning is never imported (1.x is not installed), and a file that tries to
  build an object of such a class is refused like any other.

Every failure is one `StoryexpError` line naming the file and what to do: missing (`MissingResourceError`), refused
(`UnsafeFileError`), unreadable (`UnreadableFileError`). Lightning itself reads checkpoints through
`StoryexpCheckpointIO`, i.e. through this same function.

`check_state_dict` is the strict key / shape check every loader uses before copying weights
(`CheckpointMismatchError`, one line listing the first problems of each kind).

torch's own `weights_only` unpickler and safetensors do the safe reading; what is added here is the one place that
calls them and the one-line errors.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from storyexp.errors import MissingResourceError, StoryexpError

__all__ = [
    "NAME_ONLY_GLOBALS",
    "CheckpointMismatchError",
    "NameOnlyGlobal",
    "StoryexpCheckpointIO",
    "UnreadableFileError",
    "UnsafeFileError",
    "check_state_dict",
    "load_file",
]

class NameOnlyGlobal:
    """Base of the stand-ins a name in `NAME_ONLY_GLOBALS` loads as: a class whose only content is the name
    (`pickled_name`). Building one (what a pickle would do to make an object of the named class) raises, so the
    file is refused (`UnsafeFileError`)."""

    pickled_name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any):  # noqa: ARG003
        raise pickle.UnpicklingError(f"{_BUILT_NAME_ONLY} {cls.pickled_name}")


_BUILT_NAME_ONLY = "storyexp reads this class by name only; the file builds an object of"

# Classes that Lightning 1.0-1.4 pickle *as classes* (never as objects): `Trainer.on_save_checkpoint` stores each
# callback's state under `type(callback)`, so the pickle holds `GLOBAL pytorch_lightning.callbacks.<module>.<Name>`
# with no call after it (taming-transformers' VQGAN `last.ckpt`, PL 1.0, has ModelCheckpoint; Lightning >= 1.5 uses
# string keys). torch's `weights_only` unpickler resolves a GLOBAL from `add_safe_globals`-style `(object, name)`
# pairs, which lets the name resolve to a stand-in without importing pytorch_lightning. Considered: importing the real
# classes (PL 1.x is not installed, and allowing a real class lets a pickle build it), `weights_only=False` (runs any
# code), re-pickling through `pickle.Unpickler.find_class` (a second unpickler beside torch's).
NAME_ONLY_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)


def _name_only(full_name: str) -> tuple[type, str]:
    stand_in = type(f"NameOnly[{full_name}]", (NameOnlyGlobal,), {"pickled_name": full_name, "__module__": __name__})
    return stand_in, full_name


# Types (or `(object, "module.Name")` pairs) that `load_file` lets a pickle reference besides tensors and plain
# containers: the one place to allow a type. Today only the name-only Lightning 1.x callback classes.
SAFE_GLOBALS: list[Any] = [_name_only(name) for name in NAME_ONLY_GLOBALS]


class UnsafeFileError(StoryexpError):
    """A file that would execute code (import a non-tensor Python object) when unpickled."""


class UnreadableFileError(StoryexpError, ValueError):
    """A file that is neither a PyTorch checkpoint nor a safetensors file, or a corrupt one."""


class CheckpointMismatchError(StoryexpError, RuntimeError):
    """A state dict whose keys or shapes do not fit the model."""


def load_file(path: str | Path, what: str = "File", *, map_location: Any = "cpu", how_to_get: str = "",
              mmap: bool = False) -> Any:
    """Load a user-supplied `.pt` / `.pth` / `.ckpt` / `.bin` / `.safetensors` file safely.

    `what` names the file in messages ("Checkpoint (ckpt_path)"); `how_to_get` is added when it is missing.
    `mmap=True` maps a zip-format torch file instead of reading it (large checkpoints inspected before use).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(what, path, how_to_get)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device=str(map_location))
        except Exception as err:  # safetensors raises its own error types for every kind of damage
            raise UnreadableFileError(
                f"{what} {path} is not a readable safetensors file ({_first_line(err)}); pass a file written by "
                "safetensors.torch.save_file (a torch.save file must not be named *.safetensors)."
            ) from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as err:
        built = re.search(re.escape(_BUILT_NAME_ONLY) + r" ([\w.]+)", str(err))
        if built:
            raise UnsafeFileError(
                f"{what} {path} was refused: loading it would build a {built.group(1)} object (storyexp reads that "
                "class only as a name, as Lightning 1.x checkpoints use it), i.e. run code from the file; re-save the "
                "weights as a state dict (torch.save(model.state_dict(), ...)) or as safetensors."
            ) from None
        if "Weights only load failed" in str(err):
            imports = _imported_globals(path)
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            if not imports and found:
                imports = [found.group(1)]
            if imports:
                raise UnsafeFileError(
                    f"{what} {path} was refused: loading it would import {', '.join(imports)}, i.e. run code from "
                    "the file. storyexp loads only tensors and plain values; re-save the weights as a state dict "
                    "(torch.save(model.state_dict(), ...)) or as safetensors."
                ) from None
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(err))
            raise UnreadableFileError(
                f"{what} {path} is not a PyTorch checkpoint that can be loaded safely "
                f"({detail.group(1) if detail else _first_line(err)}); pass a file written by torch.save or "
                "safetensors."
            ) from None
        raise UnreadableFileError(f"{what} {path} is not a PyTorch checkpoint ({_first_line(err)}).") from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, OSError, zipfile.BadZipFile,
            UnicodeDecodeError) as err:
        reason = _first_line(err) if _looks_like_torch(path) else "neither a zip archive nor a pickle"
        raise UnreadableFileError(
            f"{what} {path} is not a PyTorch checkpoint or is damaged ({reason}); pass a file written by "
            "torch.save or safetensors."
        ) from None


# Globals a refused file may reference that are not the reason it was refused (torch's own rebuild functions and
# storage types, OrderedDict): left out of the message so that it names what would actually have run.
_HARMLESS_GLOBAL = re.compile(r"^(torch\..*|collections\.OrderedDict|_codecs\.encode)$")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _imported_globals(path: Path, limit: int = 3) -> list[str]:
    """The first `limit` non-torch globals the pickle(s) in `path` reference, read with `pickletools.genops`
    (which parses opcodes and executes nothing). Only for the message of a file torch has already refused."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                streams = [archive.read(n) for n in names[:1]]
        else:
            streams = [path.read_bytes()[: 64 << 20]]
    except Exception:  # noqa: BLE001 (diagnosis only: the file is refused either way)
        return []
    found: list[str] = []
    for data in streams:
        buffer = io.BytesIO(data)
        while buffer.tell() < len(data) and len(found) < limit:  # legacy torch files hold several pickles
            try:
                _scan_pickle(buffer, found)
            except Exception:  # noqa: BLE001 (the raw tensor bytes after a legacy file's pickles)
                break
    return found[:limit]


def _scan_pickle(buffer: io.BytesIO, found: list[str]) -> None:
    memo: dict[int, object] = {}
    strings: list[str] = []
    last: object = None
    for op, arg, _ in pickletools.genops(buffer):
        name = op.name
        if name in _STRING_OPS:
            last = arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None
            strings.append(last)
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
            strings.append(last)
            continue
        elif name == "GLOBAL" or name == "INST":
            _note(found, *str(arg).split(" ", 1))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            _note(found, strings[-2], strings[-1])
        last = None
        if name == "STOP":
            return


def _note(found: list[str], module: object, qualname: object) -> None:
    module = {"__builtin__": "builtins"}.get(module, module)  # protocol <= 2 writes Python 2's name
    full = f"{module}.{qualname}"
    if (isinstance(module, str) and isinstance(qualname, str) and not _HARMLESS_GLOBAL.match(full)
            and full not in NAME_ONLY_GLOBALS and full not in found):  # allowed names are not why it was refused
        found.append(full)


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _looks_like_torch(path: Path) -> bool:
    """A zip archive (torch >= 1.6) or a protocol >= 2 pickle (the legacy format); empty files count as torch's."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return not head or head.startswith((b"PK", b"\x80"))


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's first line, short enough for a one-line message."""
    text = str(err).strip().splitlines()
    line = text[0].strip() if text and text[0].strip() else type(err).__name__
    if len(line) > 160:
        stop = line.find(". ")
        line = line[:stop] if 0 < stop < 160 else line[:157] + "..."
    return line


def check_state_dict(target: Mapping[str, torch.Tensor], state: Mapping[str, Any], what: str, *,
                     ignore_unexpected: bool = False, ignore_missing=lambda key: False, hint: str = "",
                     shown: int = 5) -> list[str]:
    """Raise one `CheckpointMismatchError` naming every kind of problem (missing keys, unexpected keys, shape
    mismatches), with counts and the first `shown` of each, when `state` does not fit `target` exactly.

    `what` names the file ("VQGAN checkpoint /path/last.ckpt"); `hint` replaces the default advice at the end.
    Missing keys for which `ignore_missing(key)` holds are allowed; they are returned (sorted), so that the caller
    fills them as its format defines (min-dalle's absent LayerNorm scales are ones) or keeps the model's values.
    """
    absent = set(target) - set(state)
    excused = sorted(k for k in absent if ignore_missing(k))
    missing = sorted(absent.difference(excused))
    unexpected = [] if ignore_unexpected else sorted(set(state) - set(target))
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(target[k].shape)})"
        for k in set(target) & set(state)
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(target[k].shape)
    )
    parts = [f"{title} ({len(items)}): {', '.join(items[:shown])}{', ...' if len(items) > shown else ''}"
             for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("shape mismatches", mismatched)) if items]
    if parts:
        hint = hint or "use the file that belongs to the configured model, or configure the model's sizes to match it"
        raise CheckpointMismatchError(f"{what} does not fit the model: {'; '.join(parts)}; {hint}.")
    return excused


class StoryexpCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with reading through `load_file` (resume, test and predict from `ckpt_path`) and
    atomic writing."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):  # noqa: ARG002 (always weights only)
        return load_file(path, "Checkpoint (ckpt_path)", map_location=map_location or "cpu")

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        """Written to a temporary file beside ``path`` and renamed onto it: a kill mid-write never leaves a
        truncated checkpoint (Lightning's own save writes the target file in place)."""
        from storyexp.utils.io import atomic_write

        atomic_write(path, lambda tmp: super(StoryexpCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                        storage_options))
