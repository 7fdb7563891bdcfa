"""Sparse deltas: a trainable values vector at fixed positions of a frozen tensor, W' = W + scatter(δ).

The point is cost: the optimizer sees only δ (nnz scalars), and for Linear and pointwise Conv2d
layers the backward never forms the dense gradient of W. The custom autograd functions below
compute the forward with W' (materialised per call: one O(numel) add, no state kept) and in
the backward

* the input gradient with W' (the same matmul a frozen layer needs anyway), and
* grad δ_k = Σ_t G[t, row_k] · X[t, col_k] by gathering the rows/columns the entries touch:
  O(tokens·nnz) work, in token chunks so the gathered buffers stay cache-sized; with K entries in
  every row (GPS) G is broadcast instead of gathered. When many entries share a row, one small
  matmul over the touched rows (G[:, U]ᵀ X, |U| × d_in) followed by a gather is cheaper;
  :func:`_values_grad` picks.

Other Conv2d layers (depthwise, strided stems) compute the dense kernel gradient transiently
with ``torch.nn.grad.conv2d_weight`` and gather from it: those kernels are tiny (C × k²), so
this costs less than unfolding the input. Vectors and any other tensor go through
``index_add`` (autograd's gather backward); their dense gradient is O(numel) and cheap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: cap on the elements of one gather chunk (keeps the transient T × chunk buffers small)
_CHUNK_ELEMENTS = 1 << 18
#: use the touched-rows matmul when nnz ≥ this share of |U|·d_in (a matmul is ~this many times
#: cheaper per multiply-add than a gathered elementwise product on CPU; see benchmarks/bench_tuners.py)
ROW_MATMUL_SHARE = 1 / 16


def scatter_delta(weight: Tensor, values: Tensor, index: Tensor) -> Tensor:
    """W + scatter(values) at flat ``index`` (differentiable in values: its backward is a gather)."""
    return weight.reshape(-1).index_add(0, index, values.to(weight.dtype)).view_as(weight)


class SparseIndex:
    """Precomputed geometry of a sparse unit on a matrix: rows, columns, touched rows, layout."""

    def __init__(self, index: Tensor, cols_per_row: int, rows_total: int | None = None) -> None:
        self.index = index
        self.rows = torch.div(index, cols_per_row, rounding_mode="floor")
        self.cols = index - self.rows * cols_per_row
        self.urows, self.uinv = torch.unique(self.rows, return_inverse=True)
        self.use_rows = index.numel() >= ROW_MATMUL_SHARE * self.urows.numel() * cols_per_row
        # GPS layout: every row of the matrix has the same number K of entries (index is sorted)
        n_rows = rows_total if rows_total is not None else int(self.rows.max()) + 1 if index.numel() else 0
        self.per_row = 0
        if n_rows and index.numel() % n_rows == 0 and self.urows.numel() == n_rows:
            k = index.numel() // n_rows
            if torch.equal(torch.bincount(self.rows, minlength=n_rows), torch.full((n_rows,), k)):
                self.per_row = k

    def to(self, device: torch.device) -> "SparseIndex":
        if self.index.device != device:
            for name in ("index", "rows", "cols", "urows", "uinv"):
                setattr(self, name, getattr(self, name).to(device))
        return self


def _values_grad(g: Tensor, x: Tensor, geo: SparseIndex) -> Tensor:
    """grad δ_k = Σ_t G[t, row_k] · X[t, col_k] from G (T × out) and X (T × in), tokens first.

    Chunks of tokens keep the gathered T × nnz buffers cache-sized. With K entries in every row
    (GPS) G needs no gather: it broadcasts against the gathered X viewed as T × out × K.
    """
    if geo.use_rows:
        dw_rows = g.index_select(1, geo.urows).t() @ x  # |U| × d_in
        return dw_rows[geo.uinv, geo.cols]
    tokens, nnz = g.shape[0], geo.index.numel()
    step = max(1, _CHUNK_ELEMENTS // max(1, nnz))
    if geo.per_row:
        k = geo.per_row
        out = g.new_zeros(g.shape[1], k)
        for s in range(0, tokens, step):
            xg = x[s:s + step].index_select(1, geo.cols).view(-1, g.shape[1], k)
            out += (g[s:s + step].unsqueeze(-1) * xg).sum(0)
        return out.view(-1)
    out = g.new_zeros(nnz)
    for s in range(0, tokens, step):
        out += (g[s:s + step].index_select(1, geo.rows) * x[s:s + step].index_select(1, geo.cols)).sum(0)
    return out


class SparseLinearFunction(torch.autograd.Function):
    """y = x W'ᵀ + b with W' = W + scatter(δ); grads for x, b and δ only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, geo: SparseIndex) -> Tensor:  # type: ignore[override]
        w = scatter_delta(weight, values, geo.index)
        ctx.save_for_backward(x, weight, values)
        ctx.geo = geo
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, values = ctx.saved_tensors
        geo: SparseIndex = ctx.geo
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the frozen weight under a sparse delta must not require grad (apply_plan freezes it)")
        gx = gb = gv = None
        if ctx.needs_input_grad[0]:
            gx = gy @ scatter_delta(weight, values, geo.index)
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        if ctx.needs_input_grad[3]:
            gv = _values_grad(g2, x.reshape(-1, x.shape[-1]), geo)
        return gx, None, gb, gv, None


class SparseConv2dFunction(torch.autograd.Function):
    """F.conv2d with W' = W + scatter(δ); ``x`` arrives already padded if the layer pads "same"."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, geo: SparseIndex,  # type: ignore[override]
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        w = scatter_delta(weight, values, geo.index)
        ctx.save_for_backward(x, weight, values)
        ctx.geo, ctx.conv = geo, (stride, padding, dilation, groups)
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, values = ctx.saved_tensors
        geo: SparseIndex = ctx.geo
        stride, padding, dilation, groups = ctx.conv
        if ctx.needs_input_grad[1]:
            raise RuntimeError("the frozen weight under a sparse delta must not require grad (apply_plan freezes it)")
        gx = gb = gv = None
        if ctx.needs_input_grad[0]:
            w = scatter_delta(weight, values, geo.index)
            gx = torch.nn.grad.conv2d_input(x.shape, w, gy, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        if ctx.needs_input_grad[3]:
            pointwise = weight.shape[2:] == (1, 1) and groups == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            if pointwise:  # a Linear over channels with tokens = N·H·W
                g2 = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
                x2 = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                gv = _values_grad(g2, x2, geo)
            else:
                dw = torch.nn.grad.conv2d_weight(x, weight.shape, gy, stride, padding, dilation, groups)
                gv = dw.reshape(-1).index_select(0, geo.index)
        return gx, None, gb, gv, None, None, None, None, None
