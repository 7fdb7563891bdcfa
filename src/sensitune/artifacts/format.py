"""On-disk conventions of a task delta: file names, integer widths, atomic folder writes, sizes.

A delta is a folder with exactly two files, ``delta.safetensors`` (tensors) and ``delta.json``
(everything else). Both formats are inert data: reading them can never run code.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sensitune.io import INDEX_DTYPES as _INDEX_DTYPES
from sensitune.io import index_bits, index_dtype, json_safe, write_json
from sensitune.io import read_json as _read_json

TENSORS_FILE = "delta.safetensors"
META_FILE = "delta.json"
FORMAT_NAME = "sensitune-delta"
FORMAT_VERSION = 3  # written: 2 with bit-packed sparse indices; 1 (a tensor per trained tensor + a manifest) and 2 still read
WRITABLE_VERSIONS = (2, 3)
READABLE_VERSIONS = (1, 2, 3)

INDEX_DTYPES = tuple(d for d, _ in _INDEX_DTYPES)


class DeltaError(ValueError):
    """A delta folder that cannot be read or does not fit the model (message names the key)."""


class BaseMismatchError(DeltaError):
    """The delta was trained on other base weights than the model given (its fingerprints differ).

    Its own class because it is the one refusal a caller may decide to override: ``force=True``
    applies the delta anyway (the same base re-initialised on another CPU, say, differs in the
    last bits). ``want`` and ``have`` are the delta's and the model's fingerprints.
    """

    def __init__(self, message: str, *, want: str, have: str) -> None:
        super().__init__(message)
        self.want, self.have = want, have


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_json_atomic(path: Path, obj: Any, *, compact: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; indented for people, ``compact`` where size counts."""
    write_json(path, obj, compact=compact)


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
    """The JSON object in ``path``; anything else is a DeltaError naming the file."""
    return _read_json(path, error=DeltaError)
