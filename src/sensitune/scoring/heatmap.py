"""Where do the globally top-k scored entries sit? Rows = blocks, columns = kind of tensor.

This is SPT's figure: for a budget of k parameters, count how many of the k highest scores
fall in each (block, column) cell, where a column is a kind of matrix (``q``, ``k``, ``v`` rows
of a fused qkv, ``proj``, ``fc1``, ``fc2`` / ``conv_pw``, ``conv_dw``, ``conv_pwl`` …),
``norms`` or ``biases``. The facts about each tensor (block, role, kind, q/k/v slices) come
from :func:`sensitune.models.tunable_tensors`, recorded in the ScoreMap's ``meta["tensors"]``
when it was scored, so a report needs only the score file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sensitune.io import atomic_path
from sensitune.models import TensorInfo
from sensitune.models.tensors import _split_block

TOP = "(top)"  # row of tensors outside any numbered block: stem, final norm, conv_head …


def describe(infos: list[TensorInfo]) -> dict[str, dict]:
    """JSON-able facts of each tensor, stored in ``ScoreMap.meta["tensors"]``."""
    return {i.name: {"kind": i.kind, "layer": i.layer, "block": i.block, "role": i.role,
                     "slices": [[s.name, s.start, s.stop] for s in i.slices]} for i in infos}


def _facts(name: str, tensor: torch.Tensor, recorded: Mapping[str, dict] | None) -> dict:
    if recorded and name in recorded:
        return recorded[name]
    # A ScoreMap made by hand has no recorded facts: read block/role off the name the same way
    # tunable_tensors does; kind from the shape (a qkv split cannot be known without the model).
    module, _, leaf = name.rpartition(".")
    block, role = _split_block(module)
    is_norm = any(p in ("norm", "bn") or p.startswith(("norm", "bn", "ln")) for p in role.split(".") if p)
    kind = "matrix" if tensor.dim() >= 2 else "vector"
    layer = "norm" if is_norm and kind == "vector" else ("bias" if leaf == "bias" else "param")
    return {"kind": kind, "layer": layer, "block": block, "role": role, "slices": []}


def column_of(facts: dict, leaf: str) -> str:
    """Column label of a tensor (without q/k/v splitting)."""
    if facts["kind"] == "vector":
        return {"norm": "norms", "bias": "biases"}.get(facts["layer"], leaf)
    role = facts["role"]
    return role.rsplit(".", 1)[-1] if role else leaf


@dataclass
class Placement:
    """Counts of the top-k entries per (block, column), rows and columns in model order."""

    k: int
    total: int
    rows: list[str]
    columns: list[str]
    counts: torch.Tensor  # (rows, columns), int64
    sizes: torch.Tensor  # (rows, columns): entries in the cell, selected or not

    def table(self) -> str:
        """A plain-text table (counts of selected entries; '.' where the cell holds no tensor)."""
        width = max([len(c) for c in self.columns] + [7])
        first = max([len(r) for r in self.rows] + [5])
        lines = [f"{'block':<{first}} " + " ".join(f"{c:>{width}}" for c in self.columns) + f" {'total':>{width}}"]
        for r, row in enumerate(self.rows):
            cells = [f"{int(self.counts[r, c]):>{width}}" if self.sizes[r, c] else f"{'.':>{width}}"
                     for c in range(len(self.columns))]
            lines.append(f"{row:<{first}} " + " ".join(cells) + f" {int(self.counts[r].sum()):>{width}}")
        col_tot = [f"{int(v):>{width}}" for v in self.counts.sum(0)]
        lines.append(f"{'total':<{first}} " + " ".join(col_tot) + f" {int(self.counts.sum()):>{width}}")
        return "\n".join(lines)


def placement(scores: Mapping[str, torch.Tensor], k: int, tensors: Mapping[str, dict] | None = None) -> Placement:
    """Global top-``k`` entries over all tensors of ``scores``, counted per (block, column)."""
    names = list(scores)
    if not names:
        raise ValueError("the score map is empty: nothing to report")
    total = sum(scores[n].numel() for n in names)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"budget must be a positive number of entries, got {k!r}")
    k = min(k, total)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the score map contains NaN/inf scores; it cannot be ranked")
    chosen = torch.topk(flat, k, sorted=False).indices
    del flat
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    owner = torch.bucketize(chosen, offsets[1:], right=True)

    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], list[int]] = {}  # (row, column) -> [selected, size]
    for t, name in enumerate(names):
        tensor = scores[name]
        facts = _facts(name, tensor, tensors)
        row = facts["block"] or TOP
        if row not in rows:
            rows.append(row)
        local = chosen[owner == t] - offsets[t]
        parts: list[tuple[str, int, int]] = []  # (column, selected, size)
        if facts.get("slices") and tensor.dim() >= 2:
            cols = tensor.numel() // tensor.shape[0]
            row_idx = local // cols
            for s_name, start, stop in facts["slices"]:
                parts.append((s_name, int(((row_idx >= start) & (row_idx < stop)).sum()), (stop - start) * cols))
        else:
            parts.append((column_of(facts, name.rsplit(".", 1)[-1]), int(local.numel()), tensor.numel()))
        for col, sel, size in parts:
            if col not in columns:
                columns.append(col)
            cell = cells.setdefault((row, col), [0, 0])
            cell[0] += sel
            cell[1] += size
    counts = torch.zeros(len(rows), len(columns), dtype=torch.int64)
    sizes = torch.zeros_like(counts)
    for (row, col), (sel, size) in cells.items():
        counts[rows.index(row), columns.index(col)] = sel
        sizes[rows.index(row), columns.index(col)] = size
    return Placement(k, total, rows, columns, counts, sizes)


def plot(p: Placement, path: str | os.PathLike, title: str = "") -> Path:
    """Heat map PNG of ``p.counts`` (cells without a tensor left blank), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    data = p.counts.double().masked_fill(p.sizes == 0, float("nan")).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(p.columns), 1.2 + 0.32 * len(p.rows)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(p.columns)), p.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(p.rows)), p.rows)
    small = len(p.rows) * len(p.columns) <= 400
    top = max(int(p.counts.max()), 1)
    for r in range(len(p.rows)):
        for c in range(len(p.columns)):
            if small and p.sizes[r, c]:
                ax.text(c, r, _short(int(p.counts[r, c])), ha="center", va="center", fontsize=7,
                        color="k" if int(p.counts[r, c]) > 0.6 * top else "w")
    fig.colorbar(im, ax=ax, label="top-k entries")
    ax.set_title(title or f"where the top {p.k:,} of {p.total:,} scores sit")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def _short(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)
