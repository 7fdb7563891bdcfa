"""Atomic checkpoints that let a killed run continue exactly where it stopped.

A checkpoint holds only what training changes: the trainable parameters and the buffers
(BatchNorm statistics), the optimizer, the scheduler, the grad scaler, every RNG state, the
position (epoch, step in epoch, global step) and the metrics history. It is written to a
temporary file in the same folder and renamed over the old one, so a crash at any moment
leaves either the previous checkpoint or the new one, never a torn file. Loading uses
``torch.load(weights_only=True)``: no arbitrary pickle is ever executed.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitune.io import atomic_path, atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)

FORMAT = "sensitune-checkpoint/1"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file + rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: parameters with requires_grad, plus all buffers."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model`` in place; every trainable tensor must be present and match."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ValueError(f"{source} lacks trainable tensors of this model: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (was it made with another method or plan?)")
    with torch.no_grad():
        for name, value in state.items():
            target = params.get(name, buffers.get(name))
            if target is None:
                raise ValueError(f"{source} holds {name!r}, which this model does not have")
            if target.shape != value.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, seq, posf = state["python"]
    random.setstate((version, tuple(seq), posf))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, **content: Any) -> None:
    """Write a checkpoint atomically; ``content`` must be tensors / plain Python values."""
    atomic_torch_save({"format": FORMAT, **content}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign or corrupted file
        raise ValueError(f"{path} is not a readable sensitune checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sensitune checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'!r})")
    return ckpt
