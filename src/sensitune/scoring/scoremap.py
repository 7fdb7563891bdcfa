"""``ScoreMap``: parameter name -> score tensor of the parameter's shape, plus metadata.

It is the value between scoring and planning, so it is deliberately a plain
``Mapping[str, Tensor]`` (float32, CPU) that planning can consume without knowing how the
scores were made; ``meta`` records how (method, samples, batches, mean loss, options, model
fingerprint) so a saved file is self-describing. On disk it is one safetensors file whose
string metadata holds ``meta`` as JSON.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sensitune.io import atomic_save_file

FORMAT = "sensitune.scoremap/1"


class ScoreMap(Mapping[str, torch.Tensor]):
    """Scores by parameter name (each float32, on CPU, the parameter's shape) and ``meta``."""

    def __init__(self, scores: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None):
        self._scores: dict[str, torch.Tensor] = {}
        for name, value in scores.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"score for {name!r} must be a tensor, got {type(value).__name__}")
            self._scores[name] = value.detach().to(device="cpu", dtype=torch.float32)
        self.meta: dict[str, Any] = dict(meta or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def numel(self) -> int:
        """Number of scored entries."""
        return sum(t.numel() for t in self._scores.values())

    def __repr__(self) -> str:
        return f"ScoreMap(method={self.meta.get('method')!r}, tensors={len(self)}, entries={self.numel})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file atomically (:func:`sensitune.io.atomic_save_file`)."""
        path = Path(path)
        # safetensors sorts tensors by name; the registration order is kept beside them
        metadata = {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True, default=_jsonable),
                    "order": json.dumps(list(self._scores))}
        tensors = {k: v.contiguous() for k, v in self._scores.items()}
        atomic_save_file(tensors, path, metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreMap":
        """Read a file written by :meth:`save`; refuses other safetensors files with a clear message."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"score file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sensitune score file (metadata format is "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
        try:
            meta = json.loads(metadata.get("meta", "{}"))
            order = json.loads(metadata.get("order", "[]"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: score metadata is not valid JSON ({exc})") from exc
        if sorted(order) != sorted(tensors):
            order = sorted(tensors)
        return cls({k: tensors[k] for k in order}, meta)


def _jsonable(value: Any) -> Any:
    """Options may hold tuples, paths or callables: store something readable, never fail."""
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    return repr(value)
