"""On-disk conventions of a task delta: file names, integer widths, atomic folder writes, sizes.

A delta is a folder with exactly two files, ``delta.safetensors`` (tensors) and ``delta.json``
(everything else). Both formats are inert data: reading them can never run code.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

TENSORS_FILE = "delta.safetensors"
META_FILE = "delta.json"
FORMAT_NAME = "sensitune-delta"
FORMAT_VERSION = 1

#: integer dtypes used for stored indices, narrowest first, with the largest index each can hold
_INDEX_DTYPES: tuple[tuple[torch.dtype, int], ...] = (
    (torch.uint8, 2**8 - 1),
    (torch.int16, 2**15 - 1),
    (torch.int32, 2**31 - 1),
    (torch.int64, 2**63 - 1),
)
INDEX_DTYPES = tuple(d for d, _ in _INDEX_DTYPES)


class DeltaError(ValueError):
    """A delta folder that cannot be read or does not fit the model (message names the key)."""


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer dtype that holds every flat index of a tensor with ``numel`` entries."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    for dtype, largest in _INDEX_DTYPES:
        if numel - 1 <= largest:
            return dtype
    raise ValueError(f"numel={numel} is too large for int64 indices")  # pragma: no cover


def index_bits(numel: int) -> int:
    """Bits one flat index into ``numel`` entries needs at least: ceil(log2(numel)), ≥ 1."""
    return max(1, math.ceil(math.log2(numel))) if numel > 1 else 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_json_atomic(path: Path, obj: Any, *, compact: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` through a temp file in the same folder + rename.

    Indented for people by default; ``compact`` (no whitespace) where the file's size counts.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if compact:
                json.dump(obj, fh, separators=(",", ":"))
            else:
                json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicDir:
    """Build a folder in a sibling temp folder and move it into place only when complete.

    ``with AtomicDir(out) as tmp: ...write files into tmp...``. On success an existing ``out``
    is replaced (renamed aside, then removed), so a reader never sees a half-written delta; on
    error the temp folder is removed and ``out`` is untouched.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            if not self.target.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise FileExistsError(f"{self.target} exists and is not a folder")
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DeltaError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DeltaError(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    return obj


def json_safe(obj: Any) -> Any:
    """Turn tuples, paths and tensors-with-one-value into plain JSON values (recursively)."""
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
