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
If there are too few, we keep the decisions just below the jump and add the next-best entries
of groups that stay below their switch point. If that cannot reach the budget either (a coarse
model where most matrices are already structured), the group whose switch overshoots is held at
individual entries (listed in ``stats["held_at_entries"]``) and the search repeats. A miss of
more than 1 % after all that is reported with a warning.
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
from sensitune.planning.registry import Planner, register


#: the first candidate set holds about this many entries per budgeted parameter (estimated from a
#: sample); the result never depends on it, only the time: too few candidates cost exact scans
#: and a lower floor, too many a larger sort
CANDIDATES_PER_BUDGET = 4.0
#: entries sampled to estimate the initial floor
_SAMPLE = 1 << 20


@dataclass
class _Group:
    """One matrix, q/k/v slice or vector, with its highest scores sorted.

    Only the candidates (the entries scoring at least ``floor``) are sorted, stably, so their
    order (score, then index) is the tail of a stable full sort and every query about the top
    ranks answers exactly as a full sort would; a query reaching below the floor lowers it
    (:meth:`ensure`) and a count below it scans the raw scores.
    """

    name: str  # parameter name
    shape: tuple[int, ...]
    slice: str | None
    rows: tuple[int, int] | None  # rows of the slice in the full tensor
    is_matrix: bool
    structured_cost: int  # 0 = not eligible
    threshold: float  # c at or above which the group goes structured / whole
    whole_cost: int  # cost when c reaches the threshold
    vals: Tensor  # the group's scores in flat order (a view)
    offset: int  # flat index (into the full tensor) of vals[0]
    lowest: float
    highest: float
    cap: int | None = None  # set when the group is held below its switch point (see _block)
    floor: float = math.inf
    asc: Tensor | None = None  # the candidates' scores, ascending
    order: Tensor | None = None  # their flat indices (into the full tensor) in that order

    def set_floor(self, floor: float) -> None:
        """Make the entries scoring at least ``floor`` the (stably sorted) candidates."""
        if floor <= self.lowest:
            floor, vals, pos = -math.inf, self.vals, None
        else:
            keep = self.vals >= floor
            pos = keep.nonzero().view(-1)
            vals = self.vals[pos]
        self.asc, perm = torch.sort(vals, stable=True)
        self.order = (perm if pos is None else pos[perm]) + self.offset
        self.floor = floor

    def ensure(self, k: int) -> None:
        """Lower the floor until the top k entries are candidates."""
        n = self.vals.numel()
        k = min(k, n)
        if self.asc is None or self.asc.numel() < k:
            self.set_floor(-math.inf if k == n else float(torch.kthvalue(self.vals, n - k + 1).values))

    def top_scores(self, start: int, stop: int) -> Tensor:
        """Scores ranked start..stop-1 (rank 0 = highest), highest first."""
        self.ensure(stop)
        m = self.asc.numel()
        return self.asc[max(0, m - stop):m - start].flip(0)

    def top_indices(self, c: int) -> Tensor:
        self.ensure(c)
        return self.order[self.asc.numel() - c:] if c else self.order[:0]

    def count(self, t: float) -> int:
        if t <= self.lowest:
            c = self.vals.numel()
        elif t >= self.floor:
            c = self.asc.numel() - int(torch.searchsorted(self.asc, torch.tensor([t], dtype=self.asc.dtype))[0])
        else:  # below the candidates: exact, without sorting
            c = int(torch.count_nonzero(self.vals >= t))
        return c if self.cap is None else min(c, self.cap)

    def limit(self) -> int:
        """Most entries the group can take without switching to structured/whole."""
        if self.cap is not None:
            return self.cap
        return math.ceil(self.threshold) - 1 if self.threshold else self.vals.numel()

    def block(self) -> None:
        """Hold the group below its switch point: it keeps only individual entries."""
        self.cap, self.threshold = self.limit(), 0.0

    def cost(self, c: int) -> int:
        if self.threshold and c >= self.threshold:
            return self.whole_cost
        return c


def _groups(ctx: Context, sc: dict[str, Tensor], structured: str, rank: int, alpha: float, beta: float) -> list[_Group]:
    groups: list[_Group] = []
    for info in ctx.infos:
        if info.kind not in ("matrix", "vector") or info.name not in sc:
            continue
        s = sc[info.name].abs().reshape(-1)
        if info.kind == "vector":
            parts = [(None, None, s, 0)]
        else:
            cols = info.matrix_shape[1]
            # a row slice of a row-major matrix is a contiguous run of the flat scores
            parts = ([(sl.name, (sl.start, sl.stop), s[sl.start * cols:sl.stop * cols], sl.start * cols)
                      for sl in info.slices] if info.slices else [(None, None, s, 0)])
        for sl_name, rows_, vals, offset in parts:
            lowest, highest = (float(v) for v in torch.aminmax(vals))
            if info.kind == "vector":
                d = vals.numel()
                g = _Group(info.name, info.shape, None, None, False, 0, d / beta, d, vals, offset, lowest, highest)
            else:
                d_out = vals.numel() // info.matrix_shape[1] if rows_ is None else rows_[1] - rows_[0]
                d_in = info.matrix_shape[1]
                cost = rank * (d_in + d_out) if structured == "lora" else 2 * rank * d_out + rank + d_out
                eligible = (info.layer == "linear" or info.groups == 1) and cost < vals.numel()
                g = _Group(info.name, info.shape, sl_name, rows_, True, cost if eligible else 0,
                           cost / alpha if eligible else 0.0, cost, vals, offset, lowest, highest)
            groups.append(g)
    return groups


def _score_sample(groups: list[_Group]) -> tuple[torch.Tensor, int]:
    """A fixed sample of all groups' scores, sorted descending, and the total entry count."""
    n = sum(g.vals.numel() for g in groups)
    if n <= _SAMPLE:
        sample = torch.cat([g.vals for g in groups])
    else:
        gen = torch.Generator().manual_seed(0)
        sample = torch.cat([g.vals[torch.randint(g.vals.numel(), (max(1, round(_SAMPLE * g.vals.numel() / n)),),
                                                 generator=gen)] for g in groups])
    return torch.sort(sample, descending=True).values, n


def _sampled_floor(sample: torch.Tensor, n: int, entries: float) -> float:
    """A score about ``entries`` ranks from the top of all ``n`` entries, read off the sorted sample."""
    if entries >= n:
        return -math.inf
    k = math.ceil(entries / n * sample.numel())
    return -math.inf if k >= sample.numel() else float(sample[k])


def _candidates(groups: list[_Group], target: int) -> None:
    """Candidates deep enough that the bisection's answer lies among them: total(floor) ≥ target.

    Starts at CANDIDATES_PER_BUDGET × target entries and quadruples; with everything a
    candidate this is the full sort. The sample is drawn and sorted once.
    """
    entries = CANDIDATES_PER_BUDGET * target
    sample, n = _score_sample(groups) if entries < sum(g.vals.numel() for g in groups) else (None, 0)
    while True:
        floor = -math.inf if sample is None else _sampled_floor(sample, n, entries)
        for g in groups:
            if floor < g.floor:
                g.set_floor(floor)
        if floor == -math.inf or _total(groups, floor)[0] >= target:
            return
        entries *= 4


def _total(groups: list[_Group], t: float) -> tuple[int, list[int]]:
    counts = [g.count(t) for g in groups]
    return sum(g.cost(c) for g, c in zip(groups, counts)), counts


def _unstructured(groups: list[_Group], counts: list[int]) -> list[int]:
    return [k for k, g in enumerate(groups) if not (g.threshold and counts[k] >= g.threshold)]


def _hit(groups: list[_Group], target: int, counts_lo: list[int], total_lo: int, counts_hi: list[int],
         total_hi: int) -> tuple[list[int], int, int] | None:
    """Final per-group counts whose total is the target when possible.

    From above: keep the decisions at τ_lo and drop its lowest-scored unstructured picks.
    From below (if too few such picks): keep the decisions at τ_hi and add the next-best entries
    of groups that stay below their switching threshold (so no decision changes).
    None if neither reaches the target.
    """
    excess = total_lo - target
    if excess == 0:
        return list(counts_lo), 0, 0
    counts = list(counts_lo)
    unstructured = _unstructured(groups, counts)
    if sum(counts[k] for k in unstructured) >= excess:
        vals = torch.cat([groups[k].top_scores(0, counts[k]) for k in unstructured])
        owner = torch.cat([torch.full((counts[k],), j) for j, k in enumerate(unstructured)])
        drop = torch.sort(vals, stable=True).indices[:excess]
        removed = torch.bincount(owner[drop], minlength=len(unstructured))
        for j, k in enumerate(unstructured):
            counts[k] -= int(removed[j])
        return counts, excess, 0
    deficit = target - total_hi
    counts = list(counts_hi)
    room: list[tuple[int, Tensor]] = []
    for k in _unstructured(groups, counts):
        g = groups[k]
        cap = g.limit() - counts[k]
        if cap > 0:
            room.append((k, g.top_scores(counts[k], counts[k] + min(cap, deficit))))
    if sum(v.numel() for _, v in room) >= deficit:
        vals = torch.cat([v for _, v in room])
        owner = torch.cat([torch.full((v.numel(),), j) for j, (_, v) in enumerate(room)])
        take = torch.sort(vals, descending=True, stable=True).indices[:deficit]
        added = torch.bincount(owner[take], minlength=len(room))
        for j, (k, _) in enumerate(room):
            counts[k] += int(added[j])
        return counts, 0, deficit
    return None


def _bisect(groups: list[_Group], lo: float, hi: float, target: int) -> tuple[float, list[int], int, list[int], int]:
    """Thresholds t_lo < t_hi, adjacent in the ranking, with total(t_lo) >= target > total(t_hi)."""
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
    return t_lo, counts_lo, total_lo, counts_hi, total_hi


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
    lo = min(g.lowest for g in groups)
    hi = max(g.highest for g in groups)
    most, _ = _total(groups, lo)
    target = parse_budget(budget, ctx.backbone_params, most)

    blocked: list[str] = []
    for _ in range(len(groups) + 1):
        _candidates(groups, target)
        t_lo, counts_lo, total_lo, counts_hi, total_hi = _bisect(groups, lo, hi, target)
        hit = _hit(groups, target, counts_lo, total_lo, counts_hi, total_hi)
        if hit is not None:
            counts, trimmed, filled = hit
            break
        # the switch of one group overshoots by more than the individual picks can absorb:
        # keep that group at individual entries and search again
        switched = [k for k, g in enumerate(groups)
                    if g.threshold and counts_lo[k] >= g.threshold > counts_hi[k]]
        if not switched:
            counts, trimmed, filled = (counts_lo if total_lo - target <= target - total_hi else counts_hi), 0, 0
            break
        for k in switched:
            groups[k].block()
            blocked.append(groups[k].name + (f"[{groups[k].slice}]" if groups[k].slice else ""))
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
            sparse.setdefault(g.name, []).append(g.top_indices(c))
            n_entries += c
    for name, parts in sparse.items():
        units.append(Unit(name, "sparse", ctx.tensors[name], indices=torch.cat(parts)))
    stats = {"target": target, "total": final, "error": round(error, 6), "tau": sum(counts_lo),
             "threshold": t_lo, "structured": n_struct, "sparse_entries": n_entries, "whole_vectors": n_whole,
             "trimmed_entries": trimmed, "filled_entries": filled, "held_at_entries": blocked}
    opts = dict(structured=structured, rank=rank, alpha=alpha, beta=beta, dropout=dropout, drop_path=drop_path,
                bits=bits, scale=scale)
    return make(ctx, method, units + head_units(ctx, head, head_bits), budget=target, options=opts, stats=stats)


register(Planner("spt-lora", spt, scored=True, budget="required", bound={"structured": "lora"}))
register(Planner("spt-adapter", spt, scored=True, budget="required", bound={"structured": "adapter"}))
