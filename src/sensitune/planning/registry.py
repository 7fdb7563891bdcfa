"""The planners, registered by name: what :func:`sensitune.planning.make_plan` can be asked for.

A :class:`Planner` is a function plus what the caller must know before calling it: whether it
plans from scores, whether it is sized by a budget, the arguments its name fixes
(``spt-lora`` is ``spt`` with ``structured="lora"``) and its typed options, read once from the
function's signature. Each planner module registers its own entries (timm's
``@register_model`` style), so a new planner is one function and one :func:`register` call;
:mod:`sensitune.methods` names planners by these names and checks options against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sensitune.options import Registry, check_call_options, declared_options
from sensitune.planning.budget import BudgetUse, check_budget

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from sensitune.planning.plan import Plan

#: arguments the caller (make_plan) passes itself: never user options
CALLER_ARGS = frozenset({"ctx", "scores", "budget", "method"})


@dataclass(frozen=True)
class Planner:
    """One registered planner.

    ``fn(ctx, [scores, budget,] **bound, **options) -> Plan``; ``scored``: it plans from scores
    (and takes ``scores, budget`` after ``ctx``); ``budget``: ``"required"`` when it is sized by
    a budget, ``"none"`` when its options fix its size; ``bound``: arguments fixed by the name;
    ``forwards``: the function ``fn`` hands its ``**kw`` to (their options count as ``fn``'s).
    ``options`` (name -> type hint) is read from the signatures at registration.
    """

    name: str
    fn: Callable[..., "Plan"]
    scored: bool = False
    budget: BudgetUse = "none"
    bound: Mapping[str, Any] = field(default_factory=dict)
    forwards: Callable[..., "Plan"] | None = None
    options: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget == "required" and not self.scored:
            raise ValueError(f"planner {self.name!r}: a budget is allocated by scores; a scoreless planner takes none")
        declared = declared_options(self.fn, CALLER_ARGS | set(self.bound), self.forwards)
        if declared is None:
            raise ValueError(f"planner {self.name!r}: its options cannot be read off its signature (**kw without "
                             f"forwards=...)")
        object.__setattr__(self, "options", declared)

    def check(self, options: Mapping[str, Any], who: str | None = None) -> None:
        """Refuse an option this planner does not take, or a value of the wrong type (listing the valid ones)."""
        check_call_options(who or f"planner {self.name!r}", f"planner {self.name}", self.options, options)

    def check_budget(self, budget: Any, who: str | None = None, alternatives: str = "") -> Any:
        return check_budget(budget, self.budget, who or f"method {self.name!r}", alternatives,
                            f"its options: {', '.join(self.options)}" if self.options else "the model")

    def __call__(self, model: "nn.Module", scores: Mapping[str, Any] | None, budget: Any, **options: Any) -> "Plan":
        """The plan for ``model``, after checking the options and the budget (the function is never
        called with bad ones)."""
        from sensitune.planning.common import context

        self.check(options)
        budget = self.check_budget(budget)
        if self.scored:
            return self.fn(context(model), scores, budget, **self.bound, **options)
        return self.fn(context(model), **self.bound, **options)


#: the planner modules register on import of :mod:`sensitune.planning`
PLANNERS: Registry[Planner] = Registry("planner", "method", "sensitune.planning")


def register(planner: Planner) -> Planner:
    """Add ``planner`` under its name; a name registered twice is a programming error."""
    return PLANNERS.add(planner)


def get_planner(name: str) -> Planner:
    """The planner called ``name``; an unknown name lists the registered ones and the closest."""
    return PLANNERS.lookup(name)
