"""SPT allocation (spt.md §2): global top-τ sensitivity → structured modules, sparse entries, whole vectors.

Groups are the scored matrices (each q/k/v slice of a fused qkv is its own matrix) and vectors.
For a threshold τ, c = the group's entries among the global top-τ; then
* matrix eligible for a structured module: if c ≥ cost/α it gets LoRA (cost r·(d_in+d_out)) or
  an Adapter (cost 2·r·d_out + r + d_out) and its picks are dropped; else its c entries train;
* vector: if c ≥ d/β the whole vector trains; else its c entries.
Eligible: Linear matrices and convs with groups = 1 whose structured cost is below their size.
Depthwise (grouped) convs are never structured — a LoRA/adapter on a C × k² kernel saves nothing —
so their picks always train as entries.

Hitting the budget: every group's final cost is non-decreasing in τ, so the total is too, but
it jumps (a matrix switching to LoRA adds cost − c at once). We bisect the score threshold to
the smallest τ whose total reaches the budget, then drop the lowest-scored *unstructured*
picks until the total equals the budget (dropping picks never changes any group's decision).
Only if too few unstructured picks exist do we keep the closer of the two neighbouring totals
and warn when it misses by more than 1 %.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from sensitune.planning.budget import parse_budget
from sensitune.planning.common import Context, checked_scores, head_units, make
from sensitune.planning.plan import Plan, Unit


@dataclass
class _Group:
    name: str  # parameter name
    shape: tuple[int, ...]
    slice: str | None
    rows: tuple[int, int] | None  # rows of the slice in the full tensor
    is_matrix: bool
    structured_cost: int  # 0 = not eligible
    threshold: float  # c at or above which the group goes structured / whole
    whole_cost: int  # cost when c reaches the threshold
    scores_desc: Tensor  # the group's scores, descending
    order: Tensor  # flat indices (into the full tensor) in that order
    asc: Tensor  # ascending copy for counting

    def count(self, t: float) -> int:
        return self.asc.numel() - int(torch.searchsorted(self.asc, torch.tensor([t], dtype=self.asc.dtype))[0])

    def cost(self, c: int) -> int:
        if self.threshold and c >= self.threshold:
            return self.whole_cost
        return c


def _groups(ctx: Context, sc: dict[str, Tensor], structured: str, rank: int, alpha: float, beta: float) -> list[_Group]:
    groups: list[_Group] = []
    for info in ctx.infos:
        if info.kind not in ("matrix", "vector") or info.name not in sc:
            continue
        s = sc[info.name].abs()
        if info.kind == "vector":
            parts = [(None, None, s.reshape(-1), torch.arange(info.numel))]
        else:
            rows, cols = info.matrix_shape
            m = s.reshape(rows, cols)
            flat = torch.arange(info.numel).reshape(rows, cols)
            parts = ([(sl.name, (sl.start, sl.stop), m[sl.start:sl.stop].reshape(-1), flat[sl.start:sl.stop].reshape(-1))
                      for sl in info.slices] if info.slices else [(None, None, m.reshape(-1), flat.reshape(-1))])
        for sl_name, rows_, vals, idx in parts:
            vals_desc, perm = torch.sort(vals, descending=True, stable=True)
            if info.kind == "vector":
                d = vals.numel()
                g = _Group(info.name, info.shape, None, None, False, 0, d / beta, d, vals_desc, idx[perm],
                           vals_desc.flip(0).contiguous())
            else:
                d_out = vals.numel() // info.matrix_shape[1] if rows_ is None else rows_[1] - rows_[0]
                d_in = info.matrix_shape[1]
                cost = rank * (d_in + d_out) if structured == "lora" else 2 * rank * d_out + rank + d_out
                eligible = (info.layer == "linear" or info.groups == 1) and cost < vals.numel()
                g = _Group(info.name, info.shape, sl_name, rows_, True, cost if eligible else 0,
                           cost / alpha if eligible else 0.0, cost, vals_desc, idx[perm], vals_desc.flip(0).contiguous())
            groups.append(g)
    return groups


def _total(groups: list[_Group], t: float) -> tuple[int, list[int]]:
    counts = [g.count(t) for g in groups]
    return sum(g.cost(c) for g, c in zip(groups, counts)), counts


def spt(ctx: Context, scores: Mapping[str, Tensor], budget: object = None, structured: str = "lora", rank: int = 8,
        alpha: float = 10.0, beta: float = 5.0, dropout: float | None = None, drop_path: float | None = None,
        bits: int = 32, scale: float = 1.0, head: bool = True, head_bits: int = 32) -> Plan:
    method = f"spt-{structured}"
    if structured not in ("lora", "adapter"):
        raise ValueError(f"spt: structured must be 'lora' or 'adapter', got {structured!r}")
    if budget is None:
        raise ValueError(f"{method} needs a budget (e.g. budget='0.4M' or '0.5%')")
    if rank < 1 or alpha <= 0 or beta <= 0:
        raise ValueError(f"{method}: rank, alpha and beta must be positive (got {rank}, {alpha}, {beta})")
    # SPT-LoRA: dropout 0.1 on x and drop-path 0.1 on ΔY (spt.md §3); the adapter has neither
    dropout = (0.1 if structured == "lora" else 0.0) if dropout is None else dropout
    drop_path = (0.1 if structured == "lora" else 0.0) if drop_path is None else drop_path
    sc = checked_scores(ctx, scores, method)
    groups = _groups(ctx, sc, structured, rank, alpha, beta)
    if not groups:
        raise ValueError(f"{method}: none of the scored tensors is a weight matrix or vector of this model")
    lo = min(float(g.asc[0]) for g in groups)
    hi = max(float(g.asc[-1]) for g in groups)
    most, _ = _total(groups, lo)
    target = parse_budget(budget, ctx.backbone_params, most)

    # bisection: total(t_lo) >= target > total(t_hi); the total is non-increasing in t
    t_lo, t_hi = lo, math.nextafter(hi, math.inf)
    total_lo, counts_lo = _total(groups, t_lo)
    total_hi, counts_hi = _total(groups, t_hi)
    for _ in range(200):
        if sum(counts_lo) - sum(counts_hi) <= 1:
            break
        mid = (t_lo + t_hi) / 2
        if not t_lo < mid < t_hi:
            break  # adjacent floats: ties
        total, counts = _total(groups, mid)
        if total >= target:
            t_lo, total_lo, counts_lo = mid, total, counts
        else:
            t_hi, total_hi, counts_hi = mid, total, counts

    counts = list(counts_lo)
    excess = total_lo - target
    unstructured = [k for k, g in enumerate(groups) if g.cost(counts[k]) == counts[k]]
    n_unstructured = sum(counts[k] for k in unstructured)
    trimmed = 0
    if excess > 0 and n_unstructured >= excess:
        # drop the `excess` lowest-scored unstructured picks (each group's picks are its top c)
        vals = torch.cat([groups[k].scores_desc[:counts[k]] for k in unstructured])
        owner = torch.cat([torch.full((counts[k],), j) for j, k in enumerate(unstructured)])
        drop = torch.sort(vals, stable=True).indices[:excess]
        removed = torch.bincount(owner[drop], minlength=len(unstructured))
        for j, k in enumerate(unstructured):
            counts[k] -= int(removed[j])
        trimmed = excess
    elif excess > 0 and target - total_hi < excess:
        counts = list(counts_hi)
    final = sum(g.cost(c) for g, c in zip(groups, counts))
    error = (final - target) / target
    if abs(error) > 0.01:
        warnings.warn(f"{method}: allocation reaches {final:,} parameters for a budget of {target:,} "
                      f"({100 * error:+.2f}%): the structured modules are too coarse for this budget")

    units: list[Unit] = []
    sparse: dict[str, list[Tensor]] = {}
    n_struct = n_whole = n_entries = 0
    lr_opts = dict(rank=rank, bits=bits, scale=scale, dropout=dropout, drop_path=drop_path)
    for g, c in zip(groups, counts):
        if c == 0:
            continue
        if g.threshold and c >= g.threshold:
            if g.is_matrix:
                units.append(Unit(g.name, structured, g.shape, slice=g.slice, slice_rows=g.rows, **lr_opts))
                n_struct += 1
            else:
                units.append(Unit(g.name, "full", g.shape))
                n_whole += 1
        else:
            sparse.setdefault(g.name, []).append(g.order[:c])
            n_entries += c
    for name, parts in sparse.items():
        units.append(Unit(name, "sparse", ctx.tensors[name], indices=torch.cat(parts)))
    stats = {"target": target, "total": final, "error": round(error, 6), "tau": sum(counts_lo),
             "threshold": t_lo, "structured": n_struct, "sparse_entries": n_entries, "whole_vectors": n_whole,
             "trimmed_entries": trimmed}
    opts = dict(structured=structured, rank=rank, alpha=alpha, beta=beta, dropout=dropout, drop_path=drop_path,
                bits=bits, scale=scale)
    return make(ctx, method, units + head_units(ctx, head, head_bits), budget=target, options=opts, stats=stats)
