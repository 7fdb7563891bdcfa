"""Named methods: a method = a scorer + a planner + their options + training defaults.

``sensitune train --method spt-lora`` resolves here. Every preset says whether it takes a
budget, so a budget given to a method that has none is refused instead of silently ignored,
and a method that needs scores always computes them (no silent fallback to another method).
Learning rates are the defaults of the specs' recipes (AdamW, wd 1e-4, 0 on 1-D tensors);
the benchmark harness selects lr on val200 where it matters.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

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
        return budget


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
