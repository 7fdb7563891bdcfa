"""The machinery a tuned module runs on: its state, its instance-level forward, swapped tensors.

Modules are tuned in place and keep their names, so the state dict of a tuned model is the
original one plus the new tensors beside their layers (``blocks.0.attn.qkv.weight_delta``,
``…qkv.weight_delta_index``, ``…qkv.lora.q.A``, ``…fc1.adapter.w.up_w``, ``blocks.3.adaptformer.down_w``,
``…norm1.ssf.scale``). The modes (:mod:`sensitune.tuners.modes`) record what they attached in the
module's :class:`Tuning` (``module._sensitune_tuning``, read with :func:`tuning_of`); a module
with any gets an instance-level
``forward`` that

1. swaps in W' = W + scatter(δ) (and quantised weights, and an SSF-scaled norm affine) for its
   parameters — except the weight of a Linear/Conv2d with a sparse delta, which goes through
   the fused sparse functions of :mod:`.sparse` so its dense gradient is never formed;
2. runs the layer;
3. adds LoRA deltas and sequential adapters (per q/k/v slice where the plan says so), then
   applies an SSF scale and shift to a Linear/Conv2d output.
AdaptFormer units are forward hooks on their block (:mod:`.adapter`).

Why not ``torch.nn.utils.parametrize``: it renames every touched parameter
(``weight`` → ``parametrizations.weight.original``) and its generic W' path forms the dense
weight gradient, which is exactly the cost the sparse functions avoid.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sensitune.tuners.lora import quantized
from sensitune.tuners.sparse import SparseConv2dFunction, SparseIndex, SparseLinearFunction, scatter_delta

#: the attribute of a tuned module that holds its :class:`Tuning`
TUNING_ATTR = "_sensitune_tuning"


@dataclass
class Tuning:
    """What apply_plan attached to one module (kept on the module as :data:`TUNING_ATTR`).

    Per module by nature: the sparse geometry, widths and merged flag belong to the layer whose
    forward reads them, and travel with it (a TaskBank swaps modules, not models). What belongs
    to the whole model is its :class:`sensitune.state.ModelState`.
    """

    sparse: dict[str, SparseIndex] = field(default_factory=dict)  # leaf -> geometry; values in <leaf>_delta
    bits: dict[str, int] = field(default_factory=dict)  # leaf -> quantised width (head weight)
    slices: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # lora/adapter key -> rows
    ssf: str | None = None  # "affine": scale/shift a norm's affine; "output": a Linear/Conv2d output
    merged: bool = False
    saved: dict[str, Tensor] = field(default_factory=dict)  # original tensors while merged


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


def _conv_input(m: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The conv's input after its own padding, and the padding still to apply in F.conv2d."""
    if type(m).__name__ == "Conv2dSame":
        from timm.layers.padding import pad_same

        return pad_same(x, m.kernel_size, m.stride, m.dilation), (0, 0)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ValueError(f"{type(m).__name__} with padding={m.padding!r}, mode {m.padding_mode!r} is not supported by sparse/LoRA units")
    return x, m.padding


@contextlib.contextmanager
def _swapped(module: nn.Module, overrides: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily make ``module.<leaf>`` return a computed tensor (as torch.func.functional_call does)."""
    saved = {k: module._parameters[k] for k in overrides}
    try:
        for k, v in overrides.items():
            module._parameters[k] = v  # type: ignore[assignment]
        yield
    finally:
        for k, v in saved.items():
            module._parameters[k] = v


def _add_rows(y: Tensor, deltas: list[tuple[tuple[int, int] | None, Tensor]], dim: int) -> Tensor:
    """y plus deltas on row ranges of ``dim`` (None = all rows), out of place."""
    whole = [d for rows, d in deltas if rows is None]
    for d in whole:
        y = y + d
    parts = [(rows, d) for rows, d in deltas if rows is not None]
    if not parts:
        return y
    parts.sort(key=lambda p: p[0][0])
    pieces, pos = [], 0
    for (a, b), d in parts:
        if a > pos:
            pieces.append(y.narrow(dim, pos, a - pos))
        pieces.append(y.narrow(dim, a, b - a) + d)
        pos = b
    if pos < y.shape[dim]:
        pieces.append(y.narrow(dim, pos, y.shape[dim] - pos))
    return torch.cat(pieces, dim)


def _lora_in_weight(module: nn.Module, st: Tuning) -> bool:
    """Whether a conv's LoRA runs folded into its weight, W' = W + s·B·A, instead of as a side branch.

    Exact (ΔY is linear in x when no dropout/drop-path is active) and cheaper for convs: the
    side branch costs two extra convs, an add and an input-gradient path over full activation
    maps, while the folded form pays one dense kernel gradient, a small matmul on CPU
    (EfficientNet-Lite0 step, CPU time: LoRA −19 %, SPT-LoRA −15 %; benchmarks/results/tuners.md).
    Linear layers keep the branch (their dense weight gradient is the expensive part there),
    and so does a weight that is also sparse or quantised.
    """
    return ("lora" in module._modules and not st.merged and _is_conv(module) and "weight" not in st.sparse
            and "weight" not in st.bits and all(lora.is_linear() for lora in module.lora.values()))


def _tuned_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    st: Tuning = self.__dict__[TUNING_ATTR]
    base_forward = type(self).forward
    fused_weight = (not st.merged and "weight" in st.sparse and isinstance(self, (nn.Linear, nn.Conv2d)))
    overrides: dict[str, Tensor] = {}
    if not st.merged:
        for leaf, geo in st.sparse.items():
            if leaf == "weight" and fused_weight:
                continue
            param = self._parameters[leaf]
            geo.to(param.device)
            overrides[leaf] = scatter_delta(param, getattr(self, f"{leaf}_delta"), geo.index)
    for leaf, bits in st.bits.items():
        if not st.merged:
            overrides[leaf] = quantized(overrides.get(leaf, self._parameters[leaf]), bits)
    folded = _lora_in_weight(self, st)
    if folded:
        w = self.weight
        w2 = _add_rows(w.reshape(w.shape[0], -1), [(st.slices[k], lora.delta_matrix()) for k, lora in self.lora.items()], 0)
        overrides["weight"] = w2.view_as(w)
    if st.ssf == "affine" and not st.merged:
        overrides.update(self.ssf.affine(self._parameters["weight"], self._parameters["bias"]))
    x = args[0] if args else next(iter(kwargs.values()))
    x_conv = None
    with _swapped(self, overrides):
        if fused_weight:
            geo = st.sparse["weight"].to(self.weight.device)
            if isinstance(self, nn.Linear):
                y = SparseLinearFunction.apply(x, self.weight, self.bias, self.weight_delta, geo)
            else:
                x_conv, pad = _conv_input(self, x)
                y = SparseConv2dFunction.apply(x_conv, self.weight, self.bias, self.weight_delta, geo,
                                               self.stride, pad, self.dilation, self.groups)
        else:
            y = base_forward(self, *args, **kwargs)
    deltas: list[tuple[tuple[int, int] | None, Tensor]] = []
    dim = 1 if _is_conv(self) else -1
    if "lora" in self._modules and not st.merged and not folded:
        if _is_conv(self) and x_conv is None:
            x_conv, _ = _conv_input(self, x)
        for key, lora in self.lora.items():
            deltas.append((st.slices[key], lora(x_conv if _is_conv(self) else x)))
    if "adapter" in self._modules:
        for key, ad in self.adapter.items():
            rows = st.slices[key]
            ys = y if rows is None else y.narrow(dim, rows[0], rows[1] - rows[0])
            deltas.append((rows, ad(ys)))
    if deltas:
        y = _add_rows(y, deltas, dim)
    if st.ssf == "output" and not st.merged:
        y = self.ssf(y, dim)
    return y


def tuning_of(module: nn.Module) -> Tuning | None:
    """The module's :class:`Tuning`, or None for a module apply_plan did not touch."""
    return module.__dict__.get(TUNING_ATTR)


def tuning_state(module: nn.Module) -> Tuning:
    """The module's :class:`Tuning`, created (with the instance-level forward) on first use."""
    st = tuning_of(module)
    if st is None:
        st = Tuning()
        module.__dict__[TUNING_ATTR] = st
        # a partial, not a bound method: pickle stores a bound method as getattr(module, name),
        # which the unpickled module does not have; deepcopy copies either correctly
        module.forward = partial(_tuned_forward, module)
    return st


def conv_geometry(m: nn.Conv2d) -> dict:
    """The conv's geometry for a LoRA down-projection that reads the same (pre-padded) input."""
    pad = (0, 0) if type(m).__name__ == "Conv2dSame" else m.padding
    return {"in_channels": m.in_channels, "kernel": tuple(m.kernel_size), "stride": m.stride,
            "padding": pad, "dilation": m.dilation}
