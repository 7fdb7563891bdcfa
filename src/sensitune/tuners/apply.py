"""apply_plan: the only code that changes a model or flips requires_grad.

Modules are tuned in place and keep their names, so the state dict of a tuned model is the
original one plus the new tensors beside their layers (``blocks.0.attn.qkv.weight_delta``,
``…qkv.weight_delta_index``, ``…qkv.lora.q.A``, ``…fc1.adapter.w.up_w``, ``blocks.3.adaptformer.down_w``).
A layer with a sparse delta, a LoRA, a sequential adapter or a quantised weight gets an
instance-level ``forward`` that

1. swaps in W' = W + scatter(δ) (and quantised weights) for its parameters — except the weight
   of a Linear/Conv2d, which goes through the fused sparse functions of :mod:`.sparse` so its
   dense gradient is never formed;
2. runs the layer;
3. adds LoRA deltas and sequential adapters (per q/k/v slice where the plan says so).
AdaptFormer units are forward hooks on their block (:mod:`.adapter`).

Why not ``torch.nn.utils.parametrize``: it renames every touched parameter
(``weight`` → ``parametrizations.weight.original``) and its generic W' path forms the dense
weight gradient, which is exactly the cost the sparse functions avoid.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sensitune.planning.plan import Plan, Unit
from sensitune.tuners.adapter import Bottleneck, attach_adaptformer, block_dims, cnn_block_geometry, is_vit_block
from sensitune.tuners.lora import LoRA, quantized
from sensitune.tuners.sparse import SparseConv2dFunction, SparseIndex, SparseLinearFunction, scatter_delta

_PLAN_ATTR = "_sensitune_plan"


@dataclass
class _Tuning:
    """What apply_plan attached to one module (kept on the module as ``_sensitune``)."""

    sparse: dict[str, SparseIndex] = field(default_factory=dict)  # leaf -> geometry; values in <leaf>_delta
    bits: dict[str, int] = field(default_factory=dict)  # leaf -> quantised width (head weight)
    slices: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # lora/adapter key -> rows
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


def _lora_in_weight(module: nn.Module, st: _Tuning) -> bool:
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
    st: _Tuning = self._sensitune
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
    return _add_rows(y, deltas, dim) if deltas else y


def _state(module: nn.Module) -> _Tuning:
    st = module.__dict__.get("_sensitune")
    if st is None:
        st = _Tuning()
        module.__dict__["_sensitune"] = st
        module.forward = MethodType(_tuned_forward, module)
    return st


def _get_module(modules: dict[str, nn.Module], name: str, unit: Unit) -> nn.Module:
    if name not in modules:
        raise ValueError(f"plan unit {unit.target!r}: module {name!r} not found in the model")
    return modules[name]


def _conv_geometry(m: nn.Conv2d) -> dict:
    """The conv's geometry for a LoRA down-projection that reads the same (pre-padded) input."""
    pad = (0, 0) if type(m).__name__ == "Conv2dSame" else m.padding
    return {"in_channels": m.in_channels, "kernel": tuple(m.kernel_size), "stride": m.stride,
            "padding": pad, "dilation": m.dilation}


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Tune ``model`` in place as ``plan`` says and return it.

    Afterwards exactly the parameters in ``plan.parameters()`` require grad (every original
    tensor not named by a full/head unit is frozen), and their total size is
    ``plan.num_trainable(include_head=True)``. Raises ValueError for a plan made for another
    model, or when the model already carries a plan.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan expects a Plan, got {type(plan).__name__}")
    if getattr(model, _PLAN_ATTR, None) is not None:
        raise ValueError("this model already has a plan applied; apply plans to a fresh model")
    plan.check_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for u in plan.units:
        mod = _get_module(modules, u.module, u)
        if u.mode in ("full", "head"):
            param = mod._parameters[u.leaf]
            param.requires_grad_(True)
            if u.mode == "head" and u.bits < 32 and param.dim() > 1:
                _state(mod).bits[u.leaf] = u.bits
        elif u.mode == "sparse":
            param = mod._parameters[u.leaf]
            idx = u.indices.to(param.device)
            cols = param.numel() // param.shape[0] if param.dim() > 1 else param.numel()
            _state(mod).sparse[u.leaf] = SparseIndex(idx, cols, param.shape[0] if param.dim() > 1 else 1)
            mod.register_parameter(f"{u.leaf}_delta", nn.Parameter(torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)))
            mod.register_buffer(f"{u.leaf}_delta_index", idx.clone())
        elif u.mode in ("lora", "adapter"):
            if u.leaf != "weight" or not isinstance(mod, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"plan unit {u.target!r}: {u.mode} needs the weight of a Linear or Conv2d, "
                                 f"got {type(mod).__name__}.{u.leaf}")
            st = _state(mod)
            w = mod.weight
            d_out, d_in = u.matrix_shape
            kw = {"device": w.device, "dtype": w.dtype}
            if u.mode == "lora":
                if _is_conv(mod) and mod.groups != 1:
                    raise ValueError(f"plan unit {u.target!r}: LoRA on a grouped conv (groups={mod.groups}) is not supported")
                conv = _conv_geometry(mod) if _is_conv(mod) else None
                new: nn.Module = LoRA(d_in, d_out, u.rank, scale=u.scale, dropout=u.dropout,
                                      drop_path=u.drop_path, bits=u.bits, conv=conv, **kw)
            else:
                new = Bottleneck(d_out, d_out, u.rank, act="gelu", bias=True, scale=u.scale, dropout=u.dropout,
                                 drop_path=u.drop_path, bits=u.bits, channel_dim=1 if _is_conv(mod) else -1, **kw)
            if u.mode not in mod._modules:
                mod.add_module(u.mode, nn.ModuleDict())
            mod._modules[u.mode][u.key] = new.train(mod.training)
            st.slices[u.key] = u.slice_rows
        elif u.mode == "adaptformer":
            d_in, d_out = block_dims(mod)
            if (d_in, d_out) != tuple(u.shape):
                raise ValueError(f"plan unit {u.target!r}: block maps {d_in}->{d_out}, plan says {u.shape}")
            ref = next(mod.parameters())
            cnn = not is_vit_block(mod)
            stride = cnn_block_geometry(mod)[2] if cnn else 1
            ad = Bottleneck(d_in, d_out, u.rank, act="relu", bias=False, scale=u.scale, dropout=u.dropout,
                            drop_path=u.drop_path, bits=u.bits, channel_dim=1 if cnn else -1, stride=stride,
                            device=ref.device, dtype=ref.dtype)
            attach_adaptformer(mod, ad.train(mod.training))
    object.__setattr__(model, _PLAN_ATTR, plan)
    _verify(model, plan)
    return model


def _verify(model: nn.Module, plan: Plan) -> None:
    """Exactly the plan's parameters require grad, with the sizes it states (a bug here is ours)."""
    expected = {name: numel for name, _, numel in plan.parameters()}
    actual = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:3]
        extra = sorted(set(actual) - set(expected))[:3]
        wrong = [(n, expected[n], actual[n]) for n in expected if n in actual and expected[n] != actual[n]][:3]
        raise RuntimeError(f"apply_plan produced unexpected trainables: missing {missing}, extra {extra}, size {wrong}")


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan applied to ``model`` (None if none)."""
    return getattr(model, _PLAN_ATTR, None)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, role) of everything the applied plan trains, in plan order.

    Roles (see :meth:`Plan.parameters`): use them to build optimizer groups, e.g. no weight
    decay for ``bias``, ``sparse`` and any 1-D tensor.
    """
    plan = applied_plan(model)
    if plan is None:
        raise ValueError("no plan has been applied to this model (call apply_plan first)")
    return [(name, model.get_parameter(name), role) for name, role, _ in plan.parameters()]


def _tuned_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, _Tuning]]:
    for name, m in model.named_modules():
        st = m.__dict__.get("_sensitune")
        if st is not None:
            yield name, m, st


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold sparse deltas, LoRA and quantised head weights into the base weights (in place).

    The originals are kept so :func:`unmerge` restores them bit-exactly. Adapters and
    AdaptFormer are non-linear and stay as modules (their outputs are unaffected).
    """
    for _, m, st in _tuned_modules(model):
        if st.merged:
            continue
        for leaf, geo in st.sparse.items():
            p = m._parameters[leaf]
            st.saved.setdefault(leaf, p.detach().clone())
            p.copy_(scatter_delta(p, getattr(m, f"{leaf}_delta"), geo.index.to(p.device)))
        if "lora" in m._modules:
            w = m.weight
            st.saved.setdefault("weight", w.detach().clone())
            w2 = w.view(w.shape[0], -1)
            for key, lora in m.lora.items():
                rows = st.slices[key] or (0, w.shape[0])
                w2[rows[0]:rows[1]] += lora.delta_weight()
        for leaf, bits in st.bits.items():
            p = m._parameters[leaf]
            st.saved.setdefault(leaf, p.detach().clone())
            p.copy_(quantized(p, bits))
        st.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore the exact original base weights and the separate deltas."""
    for _, m, st in _tuned_modules(model):
        if not st.merged:
            continue
        for leaf, original in st.saved.items():
            m._parameters[leaf].copy_(original)
        st.saved.clear()
        st.merged = False
    return model
