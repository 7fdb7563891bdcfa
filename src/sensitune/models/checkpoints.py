"""Reading a user's checkpoint file and loading it strictly into a backbone.

Formats: ``.safetensors``; ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``
(never unpickling arbitrary objects from a user's file); the original Google ViT ``.npz``
through timm's own loader. Every key must fit: anything missing, left over or of the wrong
shape raises a ValueError naming the file, the keys and both shapes, except the head, which
is dropped when a fresh head is asked for.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz")
_NESTED = ("state_dict", "model")
_MAX_LISTED = 12


def is_checkpoint_path(value: str) -> bool:
    """True when ``pretrained`` names a file rather than ``auto``/``none``."""
    return value not in ("auto", "none") and (Path(value).suffix.lower() in SUFFIXES or Path(value).exists())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth/.pt/.bin`` file, unnested and without ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"checkpoint {path} holds Python objects that are not plain tensors; sensitune loads "
                f".pth files with torch.load(weights_only=True) and will not unpickle them. Save "
                f"model.state_dict() (or use safetensors) instead. ({str(exc).splitlines()[0]})") from exc
        except (RuntimeError, EOFError) as exc:
            raise ValueError(f"checkpoint {path} cannot be read by torch.load: {exc}") from exc
    else:
        raise ValueError(f"checkpoint {path}: unsupported suffix {suffix!r} (use one of {', '.join(SUFFIXES)})")
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in _NESTED:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path}: entries that are not tensors: {bad[:_MAX_LISTED]} "
                         f"(expected a state dict, possibly nested under {' or '.join(repr(k) for k in _NESTED)})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _under(key: str, prefix: str | None) -> bool:
    return bool(prefix) and (key == prefix or key.startswith(prefix + "."))


def head_classes(state_dict: Mapping[str, torch.Tensor], head: str | None) -> int | None:
    """Class count of the head stored in a state dict (rows of ``<head>.weight``), if any."""
    if not head:
        return None
    for leaf in ("weight", "bias"):
        t = state_dict.get(f"{head}.{leaf}")
        if t is not None and t.dim() >= 1:
            return int(t.shape[0])
    return None


def _resample_pos_embed(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Adapt a ViT position table to the model's grid (a checkpoint at 224 px used at 32 px)."""
    pe, target = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if pe is None or not isinstance(target, torch.Tensor) or grid is None or pe.shape == target.shape:
        return
    if pe.dim() != 3 or pe.shape[-1] != target.shape[-1]:
        return  # a real mismatch: reported by the strict check
    from timm.layers import resample_abs_pos_embed

    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    state_dict["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=n_prefix)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
              head: str | None, keep_head: bool) -> None:
    """Load ``state_dict`` into ``model`` requiring every non-head key to match in name and shape.

    ``keep_head=False`` drops the checkpoint's head tensors and leaves the model's freshly
    initialised head in place; ``keep_head=True`` requires the head to match as well.
    """
    state_dict = dict(state_dict)
    _resample_pos_embed(state_dict, model)
    expected = model.state_dict()
    if not keep_head:
        state_dict = {k: v for k, v in state_dict.items() if not _under(k, head)}
        expected = {k: v for k, v in expected.items() if not _under(k, head)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [(k, tuple(state_dict[k].shape), tuple(expected[k].shape))
             for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}:"]
        if wrong:
            lines.append(f"  {len(wrong)} shape mismatch(es) (key: checkpoint vs model): " + "; ".join(
                f"{k}: {a} vs {b}" for k, a, b in wrong[:_MAX_LISTED]))
        if missing:
            lines.append(f"  {len(missing)} key(s) missing from the checkpoint: {missing[:_MAX_LISTED]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) in the checkpoint: {unexpected[:_MAX_LISTED]}")
        raise ValueError("\n".join(lines))
    result = model.load_state_dict(state_dict, strict=False)
    leftover = [k for k in result.missing_keys if not _under(k, head) or keep_head]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"checkpoint {source}: load left keys {leftover} / {result.unexpected_keys}")


def load_npz(model: nn.Module, path: str | Path, *, keep_head: bool) -> None:
    """Original Google ViT ``.npz`` (``ViT-B_16.npz``) through timm's own loader.

    timm copies the head only when its class count matches; with ``keep_head`` we require it.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    loader = getattr(model, "load_pretrained", None)
    if not callable(loader):
        raise ValueError(f"checkpoint {path}: .npz checkpoints are supported for timm Vision Transformers "
                         f"only, not {type(model).__name__}")
    if keep_head:
        with np.load(path, allow_pickle=False) as w:
            bias = next((w[k] for k in w.files if k.endswith("head/bias")), None)
        n = getattr(getattr(model, "head", None), "out_features", None)
        if bias is None or bias.shape[-1] != n:
            raise ValueError(f"checkpoint {path}: no head with {n} classes to keep "
                             f"(head/bias {None if bias is None else bias.shape}); pass num_classes")
    head_module = getattr(model, "head", None)
    fresh_head = None
    if not keep_head and isinstance(head_module, nn.Module):
        fresh_head = {k: v.clone() for k, v in head_module.state_dict().items()}
    try:
        loader(str(path))
    except KeyError as exc:
        raise ValueError(f"checkpoint {path} lacks array {exc.args[0]!r} that "
                         f"{type(model).__name__} needs (not a ViT .npz of this architecture?)") from exc
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: {exc}") from exc
    if fresh_head is not None:  # timm copies a same-sized head; the caller asked for a fresh one
        head_module.load_state_dict(fresh_head)
