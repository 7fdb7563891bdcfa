"""Named methods: a method = a scorer + a planner + their options + training defaults.

``sensitune train --method spt-lora`` resolves here. Every preset says whether it takes a
budget, so a budget given to a method that has none is refused instead of silently ignored,
and a method that needs scores always computes them (no silent fallback to another method).
Learning rates are the defaults of the specs' recipes (AdamW, wd 1e-4, 0 on 1-D tensors);
the benchmark harness selects lr on val200 where it matters.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

Budget = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class Method:
    """One named recipe. ``plan`` is the ``make_plan`` method, ``scorer`` the ``score`` method."""

    name: str
    description: str
    plan: str
    scorer: str | None = None
    budget: Budget = "none"
    default_budget: str | None = None
    plan_options: dict[str, Any] = field(default_factory=dict)
    score_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig defaults

    def check_budget(self, budget: Any) -> Any:
        """The budget to plan with; raises when this method takes none or needs one."""
        if budget is not None and self.budget == "none":
            raise ValueError(f"method {self.name!r} takes no budget (its size is fixed by its options); "
                             f"drop --budget, or use a budgeted method: {', '.join(budgeted())}")
        if budget is None:
            budget = self.default_budget
        if budget is None and self.budget == "required":
            raise ValueError(f"method {self.name!r} needs a budget, e.g. --budget 0.4M, 400k or 0.5%")
        if budget is not None:
            check_budget_syntax(budget)
        return budget

    def check_options(self, plan_options: dict[str, Any] | None = None,
                      score_options: dict[str, Any] | None = None) -> None:
        """Refuse an option its planner (or scorer) does not take, or a value of the wrong type,
        before any work: the names and types come from the planner's signature, and the error
        lists the valid ones."""
        check_call_options(f"method {self.name!r}", "planner " + self.plan, planner_options(self.plan),
                           {**self.plan_options, **(plan_options or {})})
        if self.scorer is not None:
            check_call_options(f"method {self.name!r}", "scorer " + self.scorer, scorer_options(self.scorer),
                               {**self.score_options, **(score_options or {})})


def check_budget_syntax(budget: Any) -> None:
    """Refuse a budget that no model could satisfy: not a count or share, under one parameter,
    or a share outside (0, 100] % (the range against the model is checked once it is built)."""
    from sensitune.planning.budget import parse_budget

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


# -- option declarations, read off the planner and scorer signatures ------------------------------------
#: planner name -> (module, function, parameters the pipeline passes itself, function its **kw go to)
_PLANNERS: dict[str, tuple[str, str, frozenset[str], str | None]] = {
    **{n: ("sensitune.planning.spt", "spt", frozenset({"ctx", "scores", "budget", "structured"}), None)
       for n in ("spt-lora", "spt-adapter")},
    "gps": ("sensitune.planning.gps", "gps", frozenset({"ctx", "scores", "budget"}), None),
    "topk-sparse": ("sensitune.planning.gps", "topk_sparse", frozenset({"ctx", "scores", "budget"}), None),
    **{n: ("sensitune.planning.simple", n.replace("-", "_"), frozenset({"ctx", "method"}), None)
       for n in ("linear", "full", "bitfit", "lora", "adapter", "adaptformer", "ssf")},
    "bi-lora": ("sensitune.planning.simple", "bi_lora", frozenset({"ctx", "method"}), "lora"),
    "bi-adaptformer": ("sensitune.planning.simple", "bi_adaptformer", frozenset({"ctx", "method"}), "adaptformer"),
}
#: scorer name -> (module, function); ``model`` and ``data`` are the pipeline's
_SCORERS: dict[str, tuple[str, str]] = {
    "sensitivity": ("sensitune.scoring.sensitivity", "sensitivity_scores"),
    "gps": ("sensitune.scoring.gradient", "gps_scores"),
    "fisher": ("sensitune.scoring.baselines", "fisher_scores"),
    "magnitude": ("sensitune.scoring.baselines", "magnitude_scores"),
    "random": ("sensitune.scoring.baselines", "random_scores"),
}


def _parameters(fn: Callable, fixed: frozenset[str]) -> tuple[dict[str, Any], bool]:
    """``{name: type hint}`` of ``fn``'s keyword options minus ``fixed``, and whether it takes ``**kw``."""
    hints = typing.get_type_hints(fn)
    params: dict[str, Any] = {}
    var_kw = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and p.name not in fixed:
            params[p.name] = hints.get(p.name, Any)
    return params, var_kw


def planner_options(plan: str) -> dict[str, Any] | None:
    """The options planner ``plan`` takes (name -> type hint); None when they cannot be listed."""
    entry = _PLANNERS.get(plan)
    if entry is None:
        return None
    module, name, fixed, forwards = entry
    mod = importlib.import_module(module)
    params, var_kw = _parameters(getattr(mod, name), fixed)
    if forwards is not None:  # a preset that hands **kw on: its own options plus the target's
        more, _ = _parameters(getattr(mod, forwards), fixed)
        params = {**more, **params}
    elif var_kw:
        return None
    return params


def scorer_options(scorer: str) -> dict[str, Any] | None:
    """The options scorer ``scorer`` takes (name -> type hint); None when they cannot be listed."""
    entry = _SCORERS.get(scorer)
    if entry is None:
        return None
    params, var_kw = _parameters(getattr(importlib.import_module(entry[0]), entry[1]), frozenset({"model", "data"}))
    return None if var_kw else params


def _hint_name(hint: Any) -> str:
    if hint is Any:
        return "any"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_hint_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def value_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits type hint ``hint`` (int/float/bool/str/None and unions of them;
    any other hint is left to the function itself)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(value_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def check_call_options(who: str, what: str, declared: dict[str, Any] | None, given: dict[str, Any]) -> None:
    """Raise ValueError for an option ``declared`` lacks or a value of the wrong type, listing
    the valid names (with types)."""
    if declared is None:
        return
    listing = ", ".join(f"{k} ({_hint_name(h)})" for k, h in declared.items())
    for key, value in given.items():
        if key not in declared:
            close = ([d for d in declared if d.lower() == str(key).lower()]
                     or difflib.get_close_matches(str(key), list(declared), n=1))
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{who}: unknown option {key!r}{hint}; the {what} takes: {listing or 'no options'}")
        if not value_matches(value, declared[key]):
            raise ValueError(f"{who}: option {key}={value!r} has the wrong type: the {what} expects "
                             f"{_hint_name(declared[key])}")


_SPT_SCORE = {"batches": 16, "batch_size": 32}  # SPT: 16 batches of 32 images, list order

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear probe: only the head trains", "linear", train={"lr": 1e-2}),
    Method("full", "full fine-tuning: every parameter trains", "full", train={"lr": 1e-4}),
    Method("bitfit", "BitFit: every bias and the head", "bitfit", train={"lr": 5e-3}),
    Method("lora", "LoRA rank 8 on every attention/MLP matrix (pointwise convs on CNNs)", "lora",
           train={"lr": 1e-3}),
    Method("adapter", "sequential bottleneck adapters (rank 8) on the same matrices as lora", "adapter",
           train={"lr": 1e-3}),
    Method("adaptformer", "AdaptFormer: parallel bottleneck (rank 8) beside every block's MLP", "adaptformer",
           train={"lr": 1e-3}),
    Method("spt-lora", "SPT: sensitivity-ranked budget; LoRA on sensitive matrices, sparse entries elsewhere",
           "spt-lora", scorer="sensitivity", budget="optional", default_budget="0.5%",
           score_options=_SPT_SCORE, train={"lr": 1e-3}),
    Method("spt-adapter", "SPT with adapters as the structured module", "spt-adapter", scorer="sensitivity",
           budget="optional", default_budget="0.5%", score_options=_SPT_SCORE, train={"lr": 1e-3}),
    Method("gps", "GPS: top-K gradient entries per row of every matrix (SupCon gradients), biases, head",
           "gps", scorer="gps", train={"lr": 2e-3, "weight_decay": 0.0}),
    Method("topk-sparse", "global top-k most sensitive entries, trained sparsely", "topk-sparse",
           scorer="sensitivity", budget="optional", default_budget="0.5%", score_options=_SPT_SCORE,
           train={"lr": 2e-3}),
    Method("bi-lora", "1-bit LoRA (rank 32) on the q and v slices of qkv", "bi-lora", train={"lr": 1e-3}),
    Method("bi-adaptformer", "1-bit AdaptFormer (rank 32)", "bi-adaptformer", train={"lr": 1e-3}),
    Method("ssf", "SSF: per-channel scale and shift after every biased Linear/Conv and norm layer", "ssf",
           train={"lr": 5e-3}),
]}


def budgeted() -> list[str]:
    return [n for n, m in METHODS.items() if m.budget != "none"]


def get_method(name: str | Method) -> Method:
    """The preset called ``name``; an unknown name lists the presets and the closest one."""
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(METHODS)}") from None


def describe() -> str:
    """One line per method, for ``--help``."""
    width = max(map(len, METHODS))
    return "\n".join(f"{m.name:<{width}}  {m.description}"
                     + (f" [budget, default {m.default_budget}]" if m.budget != "none" else "")
                     for m in METHODS.values())
