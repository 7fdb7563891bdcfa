"""Preset plans that need no scores: linear, full, bitfit, lora, adapter, adaptformer, bi-lora, bi-adaptformer, ssf.

Defaults (each overridable by keyword):
* ``lora``/``adapter``: rank 8, scale 1, targets = every Linear weight outside head and
  embeddings (ViT: qkv, proj, fc1, fc2) and every pointwise (1×1, groups = 1) conv (CNNs);
  ``targets=REGEX`` selects by module name; ``slices="qkv"`` or ``"qv"`` splits fused qkv
  matrices into per-slice modules (the default treats qkv as one matrix, as PEFT does).
* ``adaptformer``: rank 8, scale 1, dropout 0.1 on every ViT block (parallel to the MLP
  branch) or every EfficientNet inverted-residual / depthwise-separable block (parallel to the
  block; see :mod:`sensitune.tuners.adapter`); ``targets=REGEX`` over block names.
* ``bi-lora``: LoRA on the q and v slices of fused qkv (models without qkv: the default
  targets), rank 32, 1 bit, dropout 0.1, scale 1.0 (the engine searches s).
* ``bi-adaptformer``: AdaptFormer rank 32, 1 bit, dropout 0.1.
* ``ssf``: SSF (Lian et al., 2022) after every Linear/Conv2d that has a bias and every norm layer
  with an affine weight and bias, outside the head (ViT: patch embedding, qkv, proj, fc1, fc2,
  norm1, norm2, the final norm; CNNs without conv biases: every BatchNorm); ``targets=REGEX``
  selects by module name. Bias-free convs are left out: merging needs a bias to fold β into.
Every preset trains the head (``head=False`` to freeze it, ``head_bits`` to quantise it).
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from sensitune.planning.common import Context, default_matrix_targets, head_units, make, match_targets
from sensitune.planning.plan import Plan, Unit
from sensitune.planning.registry import Planner, register
from sensitune.tuners.adapter import block_dims, is_vit_block
from sensitune.tuners.modes.ssf import ssf_kind

#: class names of CNN blocks that get a parallel AdaptFormer
CNN_BLOCKS = {"DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "CondConvResidual"}


def linear(ctx: Context, head: bool = True, head_bits: int = 32) -> Plan:
    """Linear probe: only the head trains."""
    units = head_units(ctx, head, head_bits)
    if not units:
        raise ValueError("linear: the model has no head to train")
    return make(ctx, "linear", units, options={"head_bits": head_bits})


def full(ctx: Context, head: bool = True, head_bits: int = 32) -> Plan:
    """Full fine-tuning: every parameter trains."""
    units = [Unit(i.name, "full", i.shape) for i in ctx.infos if i.kind != "head"]
    return make(ctx, "full", units + head_units(ctx, head, head_bits))


def bitfit(ctx: Context, head: bool = True, head_bits: int = 32) -> Plan:
    """BitFit: every bias (including norm biases) and the head."""
    units = [Unit(i.name, "full", i.shape) for i in ctx.infos
             if i.kind != "head" and i.name.rsplit(".", 1)[-1] == "bias"]
    if not units:
        raise ValueError("bitfit: the model has no bias parameters")
    return make(ctx, "bitfit", units + head_units(ctx, head, head_bits))


def _matrix_units(ctx: Context, mode: str, method: str, *, rank: int, targets: Any, slices: str | None,
                  bits: int, scale: float, dropout: float, drop_path: float, default_qkv_only: bool = False) -> list[Unit]:
    if slices not in (None, "qkv", "qv", "q", "k", "v", "qk", "kv"):
        raise ValueError(f"{method}: slices={slices!r}; use None (whole matrices) or a subset of 'qkv' such as 'qv'")
    if targets is None and default_qkv_only:
        fused = [i for i in ctx.infos if i.kind == "matrix" and i.slices]
        candidates = fused or default_matrix_targets(ctx)
    else:
        candidates = default_matrix_targets(ctx) if targets is None else []
    chosen = match_targets(ctx, targets, candidates, method)
    units: list[Unit] = []
    for info in chosen:
        if mode == "lora" and info.layer == "conv" and info.groups != 1:
            raise ValueError(f"{method}: {info.name} is a grouped conv (groups={info.groups}); LoRA needs groups=1")
        common = dict(rank=rank, bits=bits, scale=scale, dropout=dropout, drop_path=drop_path)
        if slices and info.slices:
            for s in info.slices:
                if s.name in slices:
                    units.append(Unit(info.name, mode, info.shape, slice=s.name, slice_rows=(s.start, s.stop), **common))
        else:
            units.append(Unit(info.name, mode, info.shape, **common))
    return units


def lora(ctx: Context, rank: int = 8, targets: Any = None, slices: str | None = None, bits: int = 32,
         scale: float = 1.0, dropout: float = 0.0, drop_path: float = 0.0, head: bool = True,
         head_bits: int = 32, method: str = "lora") -> Plan:
    units = _matrix_units(ctx, "lora", method, rank=rank, targets=targets, slices=slices, bits=bits, scale=scale,
                          dropout=dropout, drop_path=drop_path, default_qkv_only=method == "bi-lora")
    opts = dict(rank=rank, targets=targets, slices=slices, bits=bits, scale=scale, dropout=dropout, drop_path=drop_path)
    return make(ctx, method, units + head_units(ctx, head, head_bits), options=opts)


def adapter(ctx: Context, rank: int = 8, targets: Any = None, slices: str | None = None, bits: int = 32,
            scale: float = 1.0, dropout: float = 0.0, drop_path: float = 0.0, head: bool = True,
            head_bits: int = 32) -> Plan:
    units = _matrix_units(ctx, "adapter", "adapter", rank=rank, targets=targets, slices=slices, bits=bits,
                          scale=scale, dropout=dropout, drop_path=drop_path)
    opts = dict(rank=rank, targets=targets, slices=slices, bits=bits, scale=scale, dropout=dropout, drop_path=drop_path)
    return make(ctx, "adapter", units + head_units(ctx, head, head_bits), options=opts)


def adaptformer_blocks(model: nn.Module, targets: Any = None) -> list[tuple[str, nn.Module]]:
    """Blocks an AdaptFormer attaches to: ViT blocks (norm2 + mlp) or else EfficientNet-style CNN blocks."""
    mods = [(n, m) for n, m in model.named_modules() if n]
    if targets is not None:
        rx = re.compile(targets if isinstance(targets, str) else "|".join(targets))
        chosen = [(n, m) for n, m in mods if rx.search(n) and (is_vit_block(m) or type(m).__name__ in CNN_BLOCKS)]
        if not chosen:
            raise ValueError(f"adaptformer: targets {rx.pattern!r} match no ViT block (norm2 + mlp) or CNN block "
                             f"({sorted(CNN_BLOCKS)})")
        return chosen
    vit = [(n, m) for n, m in mods if is_vit_block(m)]
    return vit or [(n, m) for n, m in mods if type(m).__name__ in CNN_BLOCKS]


def adaptformer(ctx: Context, rank: int = 8, targets: Any = None, bits: int = 32, scale: float = 1.0,
                dropout: float = 0.1, drop_path: float = 0.0, head: bool = True, head_bits: int = 32,
                method: str = "adaptformer") -> Plan:
    blocks = adaptformer_blocks(ctx.model, targets)
    if not blocks:
        raise ValueError(f"{method}: the model has no ViT blocks (norm2 + mlp) or CNN blocks ({sorted(CNN_BLOCKS)})")
    units = [Unit(name, "adaptformer", block_dims(block), rank=rank, bits=bits, scale=scale, dropout=dropout,
                  drop_path=drop_path) for name, block in blocks]
    opts = dict(rank=rank, targets=targets, bits=bits, scale=scale, dropout=dropout, drop_path=drop_path)
    return make(ctx, method, units + head_units(ctx, head, head_bits), options=opts)


def bi_lora(ctx: Context, rank: int = 32, bits: int = 1, scale: float = 1.0, dropout: float = 0.1,
            slices: str | None = "qv", **kw: Any) -> Plan:
    return lora(ctx, rank=rank, bits=bits, scale=scale, dropout=dropout, slices=slices, method="bi-lora", **kw)


def bi_adaptformer(ctx: Context, rank: int = 32, bits: int = 1, scale: float = 1.0, dropout: float = 0.1,
                   **kw: Any) -> Plan:
    return adaptformer(ctx, rank=rank, bits=bits, scale=scale, dropout=dropout, method="bi-adaptformer", **kw)


def ssf_modules(ctx: Context, targets: Any = None) -> list[tuple[str, int]]:
    """(module name, channels) of every module an SSF can follow and fold into, outside the head."""
    head_modules = {n.rsplit(".", 1)[0] for n in ctx.head}
    rx = None
    if targets is not None:
        pattern = targets if isinstance(targets, str) else "|".join(f"(?:{t})" for t in targets)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"ssf: targets {pattern!r} is not a valid regular expression ({exc})") from exc
    out = []
    for name, module in ctx.model.named_modules():
        if not name or name in head_modules or (rx is not None and not rx.search(name)):
            continue
        try:
            ssf_kind(module)
        except ValueError:
            continue
        out.append((name, int(module._parameters["bias"].shape[0])))
    if not out:
        raise ValueError("ssf: no Linear/Conv2d with a bias or norm layer with an affine weight and bias"
                         + (f" matches targets {rx.pattern!r}" if rx is not None else " in this model"))
    return out


def ssf(ctx: Context, targets: Any = None, head: bool = True, head_bits: int = 32) -> Plan:
    """SSF: a per-channel scale and shift after the chosen operations (see :mod:`sensitune.tuners.ssf`)."""
    units = [Unit(name, "ssf", (c,)) for name, c in ssf_modules(ctx, targets)]
    return make(ctx, "ssf", units + head_units(ctx, head, head_bits), options={"targets": targets})


register(Planner("linear", linear))
register(Planner("full", full))
register(Planner("bitfit", bitfit))
register(Planner("lora", lora))
register(Planner("adapter", adapter))
register(Planner("adaptformer", adaptformer))
register(Planner("bi-lora", bi_lora, forwards=lora))
register(Planner("bi-adaptformer", bi_adaptformer, forwards=adaptformer))
register(Planner("ssf", ssf))
