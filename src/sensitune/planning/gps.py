"""GPS selection (gps.md §3) and global top-k sparse selection.

GPS: for every weight matrix (Linear, and Conv viewed as out × in·kh·kw; each q/k/v row of a
fused qkv is a row like any other) keep the top-K entries of each row by |score|; every bias
and the head train fully; norms, embeddings (patch/pos/cls) stay frozen.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from sensitune.planning.budget import parse_budget
from sensitune.planning.common import Context, checked_scores, head_units, make
from sensitune.planning.plan import Plan, Unit
from sensitune.planning.registry import Planner, register


def gps(ctx: Context, scores: Mapping[str, Tensor], budget: object = None, K: int = 1, head: bool = True,
        head_bits: int = 32) -> Plan:
    if budget is not None:
        raise ValueError("gps is sized by K (entries per row), not by a budget; pass K=... instead")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"gps: K must be an integer >= 1, got {K!r}")
    sc = checked_scores(ctx, scores, "gps")
    matrices = [i for i in ctx.infos if i.kind == "matrix"]
    missing = [i.name for i in matrices if i.name not in sc]
    if missing:
        raise ValueError(f"gps: scores lack {len(missing)} weight matrices (e.g. {missing[:3]})")
    units: list[Unit] = []
    for info in matrices:
        rows, cols = info.matrix_shape
        if K > cols:
            raise ValueError(f"gps: K={K} is larger than a row of {info.name} ({rows} x {cols})")
        s = sc[info.name].reshape(rows, cols).abs()
        top = torch.topk(s, K, dim=1, sorted=False).indices
        flat = (top + torch.arange(rows).unsqueeze(1) * cols).reshape(-1)
        units.append(Unit(info.name, "sparse", info.shape, indices=flat))
    biases = [Unit(i.name, "full", i.shape) for i in ctx.infos if i.kind == "vector" and i.layer == "bias"]
    return make(ctx, "gps", units + biases + head_units(ctx, head, head_bits), options={"K": K},
                stats={"matrices": len(units), "rows": sum(u.num_params for u in units) // K})


def topk_sparse(ctx: Context, scores: Mapping[str, Tensor], budget: object = None, head: bool = True,
                head_bits: int = 32) -> Plan:
    """The global top-``budget`` entries by |score| over all scored matrices and vectors, as sparse units."""
    if budget is None:
        raise ValueError("topk-sparse needs a budget (e.g. budget='0.4M')")
    sc = checked_scores(ctx, scores, "topk-sparse")
    cands = [i for i in ctx.infos if i.kind in ("matrix", "vector") and i.name in sc]
    if not cands:
        raise ValueError("topk-sparse: no scored matrix or vector tensors")
    available = sum(i.numel for i in cands)
    n = parse_budget(budget, ctx.backbone_params, available)
    flat = torch.cat([sc[i.name].reshape(-1).abs() for i in cands])
    chosen = torch.topk(flat, n, sorted=False).indices
    offsets = torch.tensor([0] + [i.numel for i in cands]).cumsum(0)
    owner = torch.searchsorted(offsets, chosen, right=True) - 1
    units = []
    for k, info in enumerate(cands):
        idx = chosen[owner == k] - offsets[k]
        if idx.numel():
            units.append(Unit(info.name, "sparse", info.shape, indices=idx))
    return make(ctx, "topk-sparse", units + head_units(ctx, head, head_bits), budget=n)


register(Planner("gps", gps, scored=True))
register(Planner("topk-sparse", topk_sparse, scored=True, budget="required"))
