"""Parse a tuning budget: an absolute count (``400000``, ``"0.4M"``, ``"400k"``) or a share (``"0.5%"``).

A share is taken of the backbone's parameters with the head excluded, because the head's size
depends on the task's class count while the budget should mean the same thing on every task
(the SPT paper counts budgets the same way).
"""
from __future__ import annotations

import re

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
