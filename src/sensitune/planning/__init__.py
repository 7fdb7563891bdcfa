"""Planning: turn scores (or a preset) into a :class:`Plan` saying where and how a model is tuned.

``make_plan(model, scores, method, budget=None, **options)``; methods:
``spt-lora``, ``spt-adapter`` (budget), ``gps`` (K), ``topk-sparse`` (budget) use scores;
``linear``, ``full``, ``bitfit``, ``lora``, ``adapter``, ``adaptformer``, ``bi-lora``,
``bi-adaptformer``, ``ssf`` do not. A budget is a count (``400000``, ``"0.4M"``, ``"400k"``) or a share
of the backbone's parameters, head excluded (``"0.5%"``). The planners and their typed options are
the entries of :data:`PLANNERS` (:mod:`sensitune.planning.registry`); a new one is registered there.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from sensitune.planning import spt as _spt  # noqa: F401  (each planner module registers its planners)
from sensitune.planning import gps as _gps  # noqa: F401
from sensitune.planning import simple as _simple  # noqa: F401
from sensitune.planning.budget import check_budget, parse_budget
from sensitune.planning.plan import Plan, Unit
from sensitune.planning.registry import PLANNERS, Planner, get_planner, register

METHODS: tuple[str, ...] = tuple(PLANNERS)


def make_plan(model: nn.Module, scores: Mapping[str, Tensor] | None, method: str, budget: Any = None,
              **options: Any) -> Plan:
    """A Plan for ``model`` by the planner ``method`` (see :data:`PLANNERS`). An unknown planner,
    an option it does not take, a value of the wrong type or a budget it cannot use raise
    ValueError naming the valid ones, before any planning."""
    return get_planner(method)(model, scores, budget, **options)


__all__ = ["METHODS", "PLANNERS", "Plan", "Planner", "Unit", "check_budget", "get_planner", "make_plan", "parse_budget",
           "register"]
