"""Planning: turn scores (or a preset) into a :class:`Plan` saying where and how a model is tuned.

``make_plan(model, scores, method, budget=None, **options)``; methods:
``spt-lora``, ``spt-adapter`` (budget), ``gps`` (K), ``topk-sparse`` (budget) use scores;
``linear``, ``full``, ``bitfit``, ``lora``, ``adapter``, ``adaptformer``, ``bi-lora``,
``bi-adaptformer``, ``ssf`` do not. A budget is a count (``400000``, ``"0.4M"``, ``"400k"``) or a share
of the backbone's parameters, head excluded (``"0.5%"``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor, nn

from sensitune.planning import gps as _gps
from sensitune.planning import simple as _simple
from sensitune.planning import spt as _spt
from sensitune.planning.budget import parse_budget
from sensitune.planning.common import context
from sensitune.planning.plan import Plan, Unit

_SCORED: dict[str, Callable[..., Plan]] = {
    "spt-lora": lambda ctx, s, b, **o: _spt.spt(ctx, s, b, structured="lora", **o),
    "spt-adapter": lambda ctx, s, b, **o: _spt.spt(ctx, s, b, structured="adapter", **o),
    "gps": _gps.gps,
    "topk-sparse": _gps.topk_sparse,
}
_PRESETS: dict[str, Callable[..., Plan]] = {
    "linear": _simple.linear, "full": _simple.full, "bitfit": _simple.bitfit, "lora": _simple.lora,
    "adapter": _simple.adapter, "adaptformer": _simple.adaptformer, "bi-lora": _simple.bi_lora,
    "bi-adaptformer": _simple.bi_adaptformer, "ssf": _simple.ssf,
}
METHODS: tuple[str, ...] = tuple(_SCORED) + tuple(_PRESETS)


def make_plan(model: nn.Module, scores: Mapping[str, Tensor] | None, method: str, budget: Any = None,
              **options: Any) -> Plan:
    """A Plan for ``model``. Unknown methods or options raise ValueError naming the valid ones."""
    ctx = context(model)
    if method in _SCORED:
        fn = _SCORED[method]
        try:
            return fn(ctx, scores, budget, **options)
        except TypeError as exc:
            raise ValueError(f"{method}: bad option ({exc})") from exc
    if method in _PRESETS:
        if budget is not None:
            raise ValueError(f"method {method!r} takes no budget (its size follows from its options)")
        try:
            return _PRESETS[method](ctx, **options)
        except TypeError as exc:
            raise ValueError(f"{method}: bad option ({exc})") from exc
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Plan", "Unit", "make_plan", "parse_budget"]
