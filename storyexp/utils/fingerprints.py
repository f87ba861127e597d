"""Content fingerprints for lean checkpoints: the pretrained files a model's frozen parts come from, and the frozen
tensors themselves.

A lean checkpoint (`StorySystem.saved_state_keys`) leaves out the frozen weights: they are rebuilt from the config
when it is loaded. Its record (`checkpoint["storyexp"]["frozen"]`) says where they came from, so a load that rebuilds
other weights is refused instead of silently producing another model:

    file_record(path)       {"path", "bytes", "sha256"} of a file, or of a folder (every file under it, by relative
                            path); "bytes" / "sha256" are None for a path that is not on disk (a hub id)
    tensors_sha256(items)   one sha256 over (key, dtype, shape, bytes) of each tensor, in the order given

File hashes are memoised per process by (path, size, mtime): a 5 GB folder is read once, however many checkpoints
record it, and a file changed in place (new size or mtime) is read again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

RECORD_KEY = "storyexp"  # checkpoint[RECORD_KEY]: the model record (callbacks.model_record) and the frozen record
CHUNK = 1 << 24  # 16 MiB reads

_FILE_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes, memoised by (resolved path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                h.update(block)
        _FILE_MEMO[key] = h.hexdigest()
    return _FILE_MEMO[key]


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file or a folder (a folder: one sha256 over each file's relative path and
    sha256, sorted by path, so moving the folder keeps the hash); None values for a path that is not on disk."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if path.is_dir():
        h, total = hashlib.sha256(), 0
        for file in _folder_files(path):
            h.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
            total += file.stat().st_size
        return {"path": str(path), "bytes": total, "sha256": h.hexdigest()}
    return {"path": str(path), "bytes": None, "sha256": None}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device), for hashing."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensors_sha256(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One sha256 over the named tensors in the order given: each key, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key, tensor in items:
        h.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\n".encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


def short(sha256: str | None) -> str:
    return (sha256 or "none")[:12]
