"""Which tensors of a model can be tuned, and what they are.

Every later stage (scoring, planning, tuners, reports) enumerates parameters through
:func:`tunable_tensors`, so the whole project agrees on what is a weight *matrix* (Linear,
Conv viewed as ``out x in*kh*kw``), a *vector* (bias, norm parameter), an *embedding*
(cls/position/patch embeddings) and the *head*, and on the row slices of fused tensors such as
timm's ``qkv`` (``q``, ``k``, ``v``).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import torch
from torch import nn

Kind = Literal["matrix", "vector", "embedding", "head", "other"]

#: parameter names (last component) that are embeddings in ViT-style models
_EMBEDDING_PARAMS = {"cls_token", "pos_embed", "reg_token", "dist_token", "mask_token", "position_embeddings"}
#: module names (any component) whose parameters are embeddings
_EMBEDDING_MODULES = {"patch_embed", "embeddings", "patch_embeddings"}


@dataclass(frozen=True)
class RowSlice:
    """A named block of rows of a fused matrix, e.g. the ``k`` part of ``qkv`` (rows start:stop)."""

    name: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TensorInfo:
    """Facts about one parameter that every stage needs.

    ``block`` groups tensors for reports (``blocks.3``; empty for stem and top-level tensors),
    ``role`` is the owning module's path inside the block (``attn.qkv``, ``mlp.fc1``, ``conv_pw``).
    """

    name: str
    module: str
    kind: Kind
    layer: str  # "linear", "conv", "norm", "bias", "embedding", "param"
    shape: tuple[int, ...]
    block: str
    role: str
    slices: tuple[RowSlice, ...] = field(default=())
    groups: int = 1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_weight(self) -> bool:
        return self.name.rsplit(".", 1)[-1] == "weight"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the tensor seen as a matrix: a conv kernel is out x in*kh*kw."""
        if len(self.shape) == 1:
            return (1, self.shape[0])
        return (self.shape[0], self.numel // self.shape[0])

    def slice(self, name: str) -> RowSlice:
        for s in self.slices:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no row slice {name!r} (it has {[s.name for s in self.slices]})")


@contextlib.contextmanager
def kept_training_flags(model: nn.Module) -> Iterator[None]:
    """Restore every module's own ``training`` flag on exit, even on error. ``model.train(mode)``
    sets them all alike, which would lose the norm layers kept in eval mode while training."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """View a weight as the matrix the methods reason about (out x in*kh*kw); 1-D stays 1 x n."""
    if tensor.dim() == 1:
        return tensor.view(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def find_head(model: nn.Module) -> str | None:
    """Name of the classification head module.

    timm models answer ``get_classifier()``; Hugging Face image classifiers call it
    ``classifier``; otherwise the last Linear registered is taken as the head.
    """
    modules = dict(model.named_modules())
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        for name, mod in modules.items():
            if mod is head and name:
                return name
    for name in ("classifier", "head", "fc"):
        mod = modules.get(name)
        if isinstance(mod, nn.Linear):
            return name
        if isinstance(mod, nn.Module) and any(isinstance(m, nn.Linear) for m in mod.modules()):
            return name
    last = None
    for name, mod in modules.items():
        if isinstance(mod, nn.Linear):
            last = name
    return last


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    return "norm" in type(module).__name__.lower()


def _split_block(module_name: str) -> tuple[str, str]:
    """``blocks.3.attn.qkv`` -> (``blocks.3``, ``attn.qkv``): the block ends at the last numeric part."""
    parts = module_name.split(".") if module_name else []
    last_num = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    if last_num < 0:
        return "", module_name
    return ".".join(parts[: last_num + 1]), ".".join(parts[last_num + 1 :])


def _fused_slices(module_name: str, module: nn.Module) -> tuple[RowSlice, ...]:
    """Row slices of fused attention projections (timm ``qkv``: rows q | k | v)."""
    if not isinstance(module, nn.Linear) or not re.search(r"(^|\.)qkv$", module_name):
        return ()
    out = module.out_features
    if out % 3:
        return ()
    d = out // 3
    return tuple(RowSlice(n, i * d, (i + 1) * d) for i, n in enumerate("qkv"))


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def tunable_tensors(model: nn.Module, head: str | None = "auto") -> list[TensorInfo]:
    """Describe every parameter of ``model`` in registration order.

    ``head``: the head module's name, ``"auto"`` to find it (:func:`find_head`) or None for
    a model without a head. Parameters shared between modules are listed once.
    """
    head_name = find_head(model) if head == "auto" else head
    owners: dict[str, tuple[str, nn.Module]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            owners[full] = (mod_name, mod)

    infos: list[TensorInfo] = []
    for name, param in model.named_parameters():
        mod_name, mod = owners[name]
        leaf = name.rsplit(".", 1)[-1]
        block, role = _split_block(mod_name)
        shape = tuple(param.shape)
        slices: tuple[RowSlice, ...] = ()
        groups = 1
        components = set(mod_name.split("."))
        if _under(mod_name, head_name):
            kind, layer = "head", "linear" if isinstance(mod, nn.Linear) else "param"
        elif leaf in _EMBEDDING_PARAMS or components & _EMBEDDING_MODULES or isinstance(mod, nn.Embedding):
            kind, layer = "embedding", "embedding"
        elif _is_norm(mod):
            kind, layer = "vector", "norm"
        elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and leaf == "weight":
            kind = "matrix"
            layer = "linear" if isinstance(mod, nn.Linear) else "conv"
            slices = _fused_slices(mod_name, mod)
            groups = getattr(mod, "groups", 1)
        elif param.dim() == 1:
            kind, layer = "vector", "bias" if leaf == "bias" else "param"
        else:
            kind, layer = "other", "param"
        infos.append(TensorInfo(name, mod_name, kind, layer, shape, block, role, slices, groups))
    return infos


def select(infos: Iterable[TensorInfo], *kinds: Kind) -> list[TensorInfo]:
    """The infos of the given kinds, in order."""
    return [i for i in infos if i.kind in kinds]
