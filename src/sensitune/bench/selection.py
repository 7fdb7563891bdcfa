"""Choosing a learning rate on validation data, and measuring how stable the choice is.

The rule: among the rates whose validation run finished and did not diverge, take the best
validation accuracy; the *smallest* rate within ``tie_tolerance`` points of it wins (near-ties are
noise, and the larger of near-tied rates is the one that diverges on retraining). A diverged or
failed rate is never chosen. The other usable rates, best first, are the fall-backs for a final
run that diverges at the chosen one.

Scope: ``"task"`` chooses per (task, method) from that task's validation images; ``"suite"``
chooses one rate per method from the mean over tasks of validation accuracy, excluding a rate
that failed or diverged on any task, so the choice rests on every task's images instead of 200.

Stability: the share of bootstrap redraws of the validation images (the same redrawn images for
every rate, i.e. paired) under which the rule picks the same rate — how likely a second draw of
validation data is to keep the choice.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SCOPES = ("task", "suite")


def usable(val_accuracy: Mapping[float, float | None], diverged: Mapping[float, str] | None = None) -> dict[float, float]:
    """The rates that may be chosen: a finite accuracy and no divergence."""
    diverged = diverged or {}
    return {lr: float(acc) for lr, acc in val_accuracy.items()
            if acc is not None and math.isfinite(acc) and lr not in diverged}


def rank_lrs(val_accuracy: Mapping[float, float], tie_tolerance: float = 1.0) -> list[float]:
    """The usable rates in the order they are tried: the rule's choice, then the others by
    accuracy (best first; equal accuracies to the smaller rate)."""
    if not val_accuracy:
        raise ValueError("every learning rate of the grid failed or diverged on validation")
    best = max(val_accuracy.values())
    chosen = min(lr for lr, acc in val_accuracy.items() if acc >= best - tie_tolerance)
    rest = sorted((lr for lr in val_accuracy if lr != chosen), key=lambda lr: (-val_accuracy[lr], lr))
    return [chosen, *rest]


def choose_lr(val_accuracy: Mapping[float, float | None], tie_tolerance: float = 1.0,
              diverged: Mapping[float, str] | None = None) -> float:
    """The smallest lr whose val accuracy is within ``tie_tolerance`` points of the best usable one."""
    return rank_lrs(usable(val_accuracy, diverged), tie_tolerance)[0]


def suite_accuracy(per_task: Mapping[str, Mapping[float, float | None]],
                   diverged: Mapping[str, Mapping[float, str]] | None = None) -> dict[float, float]:
    """Mean over tasks of validation accuracy per rate, for the rates usable on every task."""
    diverged = diverged or {}
    ok = [usable(v, diverged.get(t)) for t, v in per_task.items()]
    if not ok:
        return {}
    common = set.intersection(*(set(o) for o in ok))
    return {lr: float(np.mean([o[lr] for o in ok])) for lr in sorted(common)}


def _rule_on_matrix(acc: np.ndarray, lrs: Sequence[float], tie_tolerance: float) -> np.ndarray:
    """Index into ``lrs`` (sorted ascending) the rule picks for each column of ``acc`` (rates x draws)."""
    best = acc.max(axis=0, keepdims=True)
    return np.argmax(acc >= best - tie_tolerance - 1e-9, axis=0)  # first = smallest rate


def bootstrap_stability(correct: Mapping[str, Mapping[float, np.ndarray]], chosen: Mapping[str, float] | float,
                        scope: str, tie_tolerance: float = 1.0, rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """Share of ``rounds`` paired bootstrap redraws of the validation images that keep the choice.

    ``correct[task][lr]``: 0/1 per validation image (the same images for every lr of a task), for
    the usable rates only. ``chosen``: per task (scope ``task``) or one rate (scope ``suite``).
    Returns {task: share} for scope task, {"suite": share} for scope suite.
    """
    if scope not in SCOPES:
        raise ValueError(f"selection scope {scope!r}: choose one of {SCOPES}")
    rng = np.random.default_rng(seed)
    lrs_common = sorted(set.intersection(*(set(v) for v in correct.values()))) if correct else []
    suite_sum = None
    out: dict[str, float] = {}
    for task, by_lr in correct.items():
        lrs = sorted(by_lr) if scope == "task" else lrs_common
        if not lrs:
            continue
        mat = np.stack([np.asarray(by_lr[lr], dtype=np.float64) for lr in lrs])  # rates x images
        idx = rng.integers(0, mat.shape[1], size=(rounds, mat.shape[1]))
        acc = 100.0 * mat[:, idx].mean(axis=2)  # rates x rounds
        if scope == "task":
            pick = np.asarray(lrs)[_rule_on_matrix(acc, lrs, tie_tolerance)]
            out[task] = float(np.mean(pick == chosen[task]))  # type: ignore[index]
        else:
            suite_sum = acc if suite_sum is None else suite_sum + acc
    if scope == "suite" and suite_sum is not None:
        pick = np.asarray(lrs_common)[_rule_on_matrix(suite_sum / len(correct), lrs_common, tie_tolerance)]
        out["suite"] = float(np.mean(pick == chosen))
    return out
