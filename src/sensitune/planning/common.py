"""Helpers shared by the planners: the model's tensors, score checks, head units, targets."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from sensitune.models import TensorInfo, tunable_tensors
from sensitune.planning.plan import Plan, Unit, model_shapes


@dataclass
class Context:
    """What every planner needs to know about the model."""

    model: nn.Module
    infos: list[TensorInfo]
    tensors: dict[str, tuple[int, ...]]
    head: list[str]

    @property
    def by_name(self) -> dict[str, TensorInfo]:
        return {i.name: i for i in self.infos}

    @property
    def backbone_params(self) -> int:
        return sum(i.numel for i in self.infos if i.kind != "head")


def context(model: nn.Module) -> Context:
    infos = tunable_tensors(model)
    return Context(model, infos, model_shapes(model), [i.name for i in infos if i.kind == "head"])


def head_units(ctx: Context, train_head: bool = True, bits: int = 32) -> list[Unit]:
    """Units training the head's parameters (bits < 32 quantises the head's weight matrix)."""
    if not train_head:
        return []
    if bits != 32 and bits not in (1, 2, 4, 8):
        raise ValueError(f"head_bits={bits} is not one of 1, 2, 4, 8, 32")
    return [Unit(i.name, "head", i.shape, bits=bits if len(i.shape) > 1 else 32)
            for i in ctx.infos if i.kind == "head"]


def make(ctx: Context, method: str, units: list[Unit], budget: int | None = None,
         options: dict | None = None, stats: dict | None = None) -> Plan:
    return Plan(method=method, units=units, tensors=ctx.tensors, head=ctx.head, budget=budget,
                options=dict(options or {}), stats=dict(stats or {}))


def checked_scores(ctx: Context, scores: Mapping[str, Tensor] | None, method: str) -> dict[str, Tensor]:
    """The score tensors as float32 CPU tensors; unknown names or wrong shapes raise ValueError."""
    if scores is None:
        raise ValueError(f"method {method!r} needs scores (a ScoreMap or a mapping name -> tensor)")
    out: dict[str, Tensor] = {}
    for name in scores.keys():
        if name not in ctx.tensors:
            raise ValueError(f"scores name {name!r}, which is not a parameter of this model (scores for another model?)")
        s = torch.as_tensor(scores[name])
        if tuple(s.shape) != ctx.tensors[name]:
            raise ValueError(f"score for {name!r} has shape {tuple(s.shape)}, the parameter has {ctx.tensors[name]}")
        if not torch.isfinite(s.sum()) and not torch.isfinite(s).all():  # the sum is the cheap check
            raise ValueError(f"score for {name!r} contains NaN or inf")
        out[name] = s.detach().to("cpu", torch.float32)
    return out


def is_pointwise(info: TensorInfo) -> bool:
    return info.layer == "conv" and info.groups == 1 and len(info.shape) == 4 and info.shape[2:] == (1, 1)


def default_matrix_targets(ctx: Context) -> list[TensorInfo]:
    """Attention and MLP matrices on ViTs (every Linear outside head/embeddings), pointwise convs on CNNs."""
    return [i for i in ctx.infos if i.kind == "matrix" and (i.layer == "linear" or is_pointwise(i))]


def match_targets(ctx: Context, targets: str | Iterable[str] | None, candidates: list[TensorInfo],
                  method: str) -> list[TensorInfo]:
    """Candidates whose module name matches the ``targets`` regex (re.search); None keeps all."""
    if targets is None:
        chosen = candidates
    else:
        pattern = targets if isinstance(targets, str) else "|".join(f"(?:{t})" for t in targets)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{method}: targets {pattern!r} is not a valid regular expression ({exc})") from exc
        pool = [i for i in ctx.infos if i.kind == "matrix"]
        chosen = [i for i in pool if rx.search(i.module)]
        bad = [i.name for i in chosen if i.layer not in ("linear", "conv")]
        if bad:
            raise ValueError(f"{method}: targets match tensors that are not Linear/Conv weights: {bad[:3]}")
        if not chosen:
            raise ValueError(f"{method}: targets {pattern!r} match no weight matrix of this model "
                             f"(module names look like {[i.module for i in pool[:3]]})")
    if not chosen:
        raise ValueError(f"{method}: this model has no matrices to tune by default; pass targets=REGEX")
    return chosen
