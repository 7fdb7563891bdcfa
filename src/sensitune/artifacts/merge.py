"""Fold a tuned model into a plain timm/torch model, and look at the base under a tuned model.

``sensitune.apply_plan`` tunes modules in place: it adds tensors beside a layer's own
(``weight_delta``, ``weight_delta_index``, ``lora``/``adapter`` ModuleDicts, ``adaptformer``, ``ssf``),
gives the layer an instance-level ``forward`` and keeps its state in ``_sensitune_tuning``; AdaptFormer
adds forward hooks. :func:`merge` folds the linear parts into the weights (sparse values, LoRA
``s·B·A`` with dequantised k-bit factors, a k-bit head's dequantised weight, SSF's scale and
shift) and then removes all
of that, so the result needs no sensitune code. Sequential adapters and AdaptFormer are
non-linear (GELU/ReLU between Down and Up): no weight can absorb them, so :func:`merge` refuses
a model that has any and says which units to blame.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch
from torch import nn

from sensitune.state import find_state
from sensitune.tuners.host import TUNING_ATTR, tuning_of

_INSTANCE_ATTRS = ("forward", TUNING_ATTR, "_sensitune_mlp_input")


def _added_tensors(m: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters and buffers apply_plan added to module ``m`` (sparse deltas)."""
    st = tuning_of(m)
    if st is None:
        return [], []
    params = [f"{leaf}_delta" for leaf in st.sparse if f"{leaf}_delta" in m._parameters]
    buffers = [f"{leaf}_delta_index" for leaf in st.sparse if f"{leaf}_delta_index" in m._buffers]
    return params, buffers


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def base_view(model: nn.Module, hide: Iterable[str] = (), norm_buffers: Iterable[str] = ()) -> Iterator[nn.Module]:
    """Temporarily hide what apply_plan added (and the named parameters ``hide``, and the BatchNorm
    buffers named in ``norm_buffers``), so ``model`` enumerates only the base tensors that identify it.

    Merged modules are unmerged for the duration (bit-exact originals) and merged again after.
    """
    from sensitune.tuners import merge as tuners_merge
    from sensitune.tuners import unmerge as tuners_unmerge
    from sensitune.tuners.modes import added_modules

    was_merged = any(st.merged for st in map(tuning_of, model.modules()) if st is not None)
    if was_merged:
        tuners_unmerge(model)
    hide, norm_buffers = set(hide), tuple(norm_buffers)
    hidden: list[tuple[dict, str, object]] = []
    positions: dict[int, dict[str, int]] = {}  # id(store) -> name -> index before hiding
    try:
        for mod_name, m in model.named_modules():
            for name in added_modules():
                if name in m._modules:
                    positions.setdefault(id(m._modules), {k: i for i, k in enumerate(m._modules)})
                    hidden.append((m._modules, name, m._modules.pop(name)))
            params, buffers = _added_tensors(m)
            prefix = f"{mod_name}." if mod_name else ""
            params += [n for n in list(m._parameters) if prefix + n in hide and n not in params]
            if norm_buffers and isinstance(m, nn.modules.batchnorm._BatchNorm):
                buffers += [n for n in norm_buffers if n in m._buffers and n not in buffers]
            for store, names in ((m._parameters, params), (m._buffers, buffers)):
                if names:
                    positions.setdefault(id(store), {k: i for i, k in enumerate(store)})
                for name in names:
                    hidden.append((store, name, store.pop(name)))
        yield model
    finally:
        stores: dict[int, dict] = {}
        for store, name, value in reversed(hidden):
            stores[id(store)] = store
            store[name] = value
        for key, store in stores.items():  # every name back in its place: the state-dict order is kept
            pos = positions[key]
            ordered = sorted(store.items(), key=lambda kv: pos.get(kv[0], len(pos)))
            store.clear()
            store.update(ordered)
        if was_merged:
            tuners_merge(model)


def replaced_tensors(plan) -> list[str]:
    """Base tensors a delta replaces outright (units of a mode that trains the base tensor itself, the head)."""
    return sorted({u.target for u in plan.units if u.spec.replaces_base} | set(plan.head))


def base_fingerprint(model: nn.Module, plan=None, *, delta_has_norm_stats: bool = True) -> str:
    """The fingerprint a delta records of its base: ``weights_fingerprint`` over the tensors the
    delta relies on but does not carry.

    Excluded: what apply_plan added, tensors the plan replaces in full (they are in the delta),
    the head, BatchNorm's ``num_batches_tracked`` (no effect on outputs) and, when
    ``delta_has_norm_stats``, BatchNorm running statistics (the delta carries them). A delta
    without them runs on the base's statistics, so they are part of its fingerprint. The same
    function on the untuned base gives the same value, so the check needs no record from before
    training.
    """
    from sensitune.models import weights_fingerprint
    from sensitune.tuners import applied_plan

    plan = plan if plan is not None else applied_plan(model)
    hide = replaced_tensors(plan) if plan is not None else []
    norm_buffers = _BN_STATS if delta_has_norm_stats else ("num_batches_tracked",)
    with base_view(model, hide=hide, norm_buffers=norm_buffers):
        return weights_fingerprint(model)


def norm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> running_mean / running_var of every BatchNorm that tracks running statistics."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for leaf in ("running_mean", "running_var"):
                buf = m._buffers.get(leaf)
                if buf is not None:
                    out[f"{name}.{leaf}" if name else leaf] = buf.detach()
    return out


def nonlinear_units(plan) -> list[str]:
    """Units no weight can absorb (adapters, AdaptFormer: their mode is not mergeable), as
    ``mode:target[slice]`` labels."""
    return [f"{u.mode}:{u.target}" + (f"[{u.slice}]" if u.slice else "")
            for u in plan.units if not u.spec.mergeable]


def is_plain(model: nn.Module) -> list[str]:
    """Problems that make ``model`` need sensitune's tuning code (empty list = plain)."""
    problems = []
    for name, m in model.named_modules():
        where = name or "<root>"
        mod = type(m).__module__
        # tuning code must be gone; a backbone's own wrapper (sensitune.models, e.g. the Hugging
        # Face logits wrapper) is part of the base model and stays
        if mod.startswith("sensitune.") and not mod.startswith("sensitune.models"):
            problems.append(f"{where}: class {type(m).__module__}.{type(m).__name__}")
        for attr in _INSTANCE_ATTRS:
            if attr in m.__dict__:
                problems.append(f"{where}: instance attribute {attr!r}")
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
            problems.append(f"{where}: forward hooks")
        if getattr(m, "parametrizations", None) is not None:
            problems.append(f"{where}: parametrizations")
    return problems


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """A plain copy of tuned ``model`` with its delta folded into the weights.

    The copy has the base model's classes, parameter names and state-dict keys (so it loads
    into a freshly built timm model with ``strict=True``) and gives the same outputs as
    ``model`` within float rounding. ``model`` itself is left unchanged. Raises ValueError for
    adapter/AdaptFormer units (non-linear, cannot be folded).
    """
    from sensitune.tuners import applied_plan, get_mode, registered
    from sensitune.tuners import merge as tuners_merge

    plan = applied_plan(model)
    if plan is not None:
        blocked = nonlinear_units(plan)
        if blocked:
            raise ValueError(
                f"cannot merge {len(blocked)} non-linear unit(s) into the base weights "
                f"({', '.join(blocked[:4])}{', …' if len(blocked) > 4 else ''}): adapters have an activation "
                f"between Down and Up. Use load_delta (or export --format delta) for this task instead.")
    out = copy.deepcopy(model)
    tuners_merge(out)
    modes = [get_mode(name) for name in registered()]
    for m in out.modules():
        for mode in modes:
            if mode.added_module is None or mode.added_module not in m._modules:
                continue
            if not mode.mergeable:
                raise ValueError(f"cannot merge: a non-linear {mode.added_module!r} module sits under {type(m).__name__}")
            del m._modules[mode.added_module]  # folded into the weights by tuners.merge
        params, buffers = _added_tensors(m)
        for name in params:
            del m._parameters[name]
        for name in buffers:
            del m._buffers[name]
        for attr in _INSTANCE_ATTRS:
            m.__dict__.pop(attr, None)
    state = find_state(out)
    if state is not None:  # the copy is a plain model: it keeps its source, not the tuning
        state.forget_tuning()
    for p in out.parameters():
        p.requires_grad_(True)
    problems = is_plain(out)
    if problems:  # pragma: no cover - a tuner feature merge does not know yet
        raise RuntimeError(f"merge left non-plain parts: {problems[:5]}")
    return out
