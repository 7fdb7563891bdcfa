"""apply_plan: the only code that changes a model or flips requires_grad.

Each unit is attached by its mode's spec (:mod:`sensitune.tuners.modes`), which uses the
per-module machinery of :mod:`.host`; merging asks every mode to fold what it attached.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from sensitune.state import find_state, state_of
from sensitune.tuners.host import Tuning, tuning_of
from sensitune.tuners.modes import get_mode, registered
from sensitune.tuners.plan import Plan, Unit


def _get_module(modules: dict[str, nn.Module], name: str, unit: Unit) -> nn.Module:
    if name not in modules:
        raise ValueError(f"plan unit {unit.target!r}: module {name!r} not found in the model")
    return modules[name]


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Tune ``model`` in place as ``plan`` says and return it.

    Afterwards exactly the parameters in ``plan.parameters()`` require grad (every original
    tensor not named by a full/head unit is frozen), and their total size is
    ``plan.num_trainable(include_head=True)``. Raises ValueError for a plan made for another
    model, or when the model already carries a plan.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan expects a Plan, got {type(plan).__name__}")
    if applied_plan(model) is not None:
        raise ValueError("this model already has a plan applied; apply plans to a fresh model")
    plan.check_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for u in plan.units:
        u.spec.attach(_get_module(modules, u.module, u), u)
    state_of(model).plan = plan
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
    """The plan applied to ``model`` (None if none); kept in its :class:`sensitune.state.ModelState`."""
    st = find_state(model)
    return st.plan if st is not None else None


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, role) of everything the applied plan trains, in plan order.

    Roles (see :meth:`Plan.parameters`): use them to build optimizer groups, e.g. no weight
    decay for ``bias``, ``sparse`` and any 1-D tensor.
    """
    plan = applied_plan(model)
    if plan is None:
        raise ValueError("no plan has been applied to this model (call apply_plan first)")
    return [(name, model.get_parameter(name), role) for name, role, _ in plan.parameters()]


def _tuned_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Tuning]]:
    for name, m in model.named_modules():
        st = tuning_of(m)
        if st is not None:
            yield name, m, st


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every mode's linear part into the base weights, in place (sparse deltas, LoRA,
    quantised head weights, SSF), in registry order.

    The originals are kept so :func:`unmerge` restores them bit-exactly. Adapters and
    AdaptFormer are non-linear and stay as modules (their outputs are unaffected).
    """
    modes = [get_mode(name) for name in registered()]
    for _, m, st in _tuned_modules(model):
        if st.merged:
            continue
        for mode in modes:
            mode.fold(m, st)
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
