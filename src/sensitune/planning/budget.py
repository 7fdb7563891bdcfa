"""Parse a tuning budget: an absolute count (``400000``, ``"0.4M"``, ``"400k"``) or a share (``"0.5%"``).

A share is taken of the backbone's parameters with the head excluded, because the head's size
depends on the task's class count while the budget should mean the same thing on every task
(the SPT paper counts budgets the same way).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

#: how a planner is sized: by its options alone (``none``) or by a budget it cannot do without
BudgetUse = Literal["none", "required"]

_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "b": 1e9, "B": 1e9}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGbB%]?)\s*$")


def parse_budget(budget: int | float | str, backbone_params: int, available: int | None = None) -> int:
    """The budget as a number of parameters.

    ``backbone_params`` is what a ``"%"`` share refers to; ``available`` (default: the same) is
    the most the method can tune. Zero, negative or larger-than-available budgets raise ValueError.
    """
    available = backbone_params if available is None else available
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a count or a share, got {budget!r}")
    if isinstance(budget, (int, float)):
        value = float(budget)
        text = repr(budget)
    elif isinstance(budget, str):
        m = _PATTERN.match(budget)
        if not m:
            raise ValueError(f"budget {budget!r} is not a count (400000, '0.4M', '400k') or a share ('0.5%')")
        number, suffix = float(m.group(1)), m.group(2)
        value = number * backbone_params / 100.0 if suffix == "%" else number * _SUFFIX[suffix]
        text = budget
    else:
        raise ValueError(f"budget must be an int, float or string, got {type(budget).__name__}")
    count = int(round(value))
    if count <= 0:
        raise ValueError(f"budget {text} is {count} parameters; it must be > 0")
    if count > available:
        raise ValueError(f"budget {text} = {count:,} parameters exceeds the {available:,} this method can tune on this model")
    return count


def check_budget_syntax(budget: Any) -> None:
    """Refuse a budget that no model could satisfy: not a count or share, under one parameter,
    or a share outside (0, 100] % (the range against the model is checked once it is built)."""
    if isinstance(budget, float) and not math.isfinite(budget):
        raise ValueError(f"budget {budget!r} is not a finite number")
    text = budget.strip() if isinstance(budget, str) else None
    if text is not None and text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = None
        if share is not None and not (math.isfinite(share) and 0 < share <= 100):
            raise ValueError(f"budget {budget!r} is a share of the backbone's parameters: it must be above 0% "
                             f"and at most 100%")
    # syntax and "at least one parameter", on a notional backbone so large no share rounds to 0
    parse_budget(budget, 10**15, 10**30)


def check_budget(budget: Any, use: BudgetUse, who: str, alternatives: str = "", sized_by: str = "its options") -> Any:
    """The one budget check, shared by :func:`sensitune.planning.make_plan` and
    :meth:`sensitune.methods.Method.check_budget` so the two never disagree: a budget for a
    planner sized by its options, no budget for one that needs it, or a malformed one raise.
    ``alternatives`` is appended to the "takes no budget" message (e.g. the budgeted methods),
    ``sized_by`` says there what fixes the size instead."""
    if budget is not None and use == "none":
        raise ValueError(f"{who} takes no budget (its size is fixed by {sized_by})" + alternatives)
    if budget is None and use == "required":
        raise ValueError(f"{who} needs a budget, e.g. 0.4M, 400k or 0.5% (of the backbone, head excluded)")
    if budget is not None:
        check_budget_syntax(budget)
    return budget
