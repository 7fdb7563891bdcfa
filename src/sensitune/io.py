"""Small file helpers every stage shares: atomic writes, JSON, integer widths of stored indices.

One implementation each, so "writes are atomic" holds everywhere in the same way: a write goes
to a temporary file in the target's own folder (same filesystem), is flushed and fsynced, and
is renamed over the target with ``os.replace`` — a reader sees the old file or the new one,
never a torn one, and a failed write leaves the old file and no temporary behind.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

#: integer dtypes used for stored flat indices, narrowest first, with the largest index each holds
INDEX_DTYPES: tuple[tuple[torch.dtype, int], ...] = (
    (torch.uint8, 2**8 - 1),
    (torch.int16, 2**15 - 1),
    (torch.int32, 2**31 - 1),
    (torch.int64, 2**63 - 1),
)


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer dtype that holds every flat index into a tensor of ``numel`` entries."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    for dtype, largest in INDEX_DTYPES:
        if numel - 1 <= largest:
            return dtype
    raise ValueError(f"numel={numel} is too large for int64 indices")


def index_bits(numel: int) -> int:
    """Bits one flat index into ``numel`` entries needs at least: ceil(log2(numel)), >= 1 (exact
    integer arithmetic: a float log2 rounds 2**49 + 1 down to 49 bits)."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    return max(1, (numel - 1).bit_length())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write into; renamed onto ``path`` when the block succeeds.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``, PIL). The
    parent folder is created; on error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)


def json_safe(obj: Any) -> Any:
    """Tuples, paths and tensors as plain JSON values, recursively (anything else unknown: its str)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def dumps_json(obj: Any, *, compact: bool = False, indent: int = 2) -> str:
    """``obj`` as JSON text: indented for people, or ``compact`` (no whitespace) where size counts."""
    if compact:
        return json.dumps(json_safe(obj), separators=(",", ":"))
    return json.dumps(json_safe(obj), indent=indent)


def write_json(path: str | os.PathLike, obj: Any, *, compact: bool = False, indent: int = 2) -> None:
    """Write ``obj`` as JSON (see :func:`dumps_json`) to ``path`` atomically, newline-terminated."""
    atomic_write_text(path, dumps_json(obj, compact=compact, indent=indent) + "\n")


def read_json(path: str | os.PathLike, *, error: Callable[[str], Exception] = ValueError,
              object_only: bool = True) -> Any:
    """The JSON value in ``path``; invalid JSON (or, with ``object_only``, a non-object) raises ``error``."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if object_only and not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    return obj
