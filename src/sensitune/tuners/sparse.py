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

Other Conv2d layers form the (tiny, C × k²) dense kernel gradient transiently and gather from
it: depthwise kernels as one depthwise correlation of the input with the output gradient
(:func:`_depthwise_kernel_grad`, up to ~20× faster on CPU than oneDNN's depthwise weight
gradient), the rest (strided stems, dense or grouped k×k) with ``torch.nn.grad.conv2d_weight``.
A per-entry depthwise gradient (gathered channels × shifted input, O(nnz·N·H·W)) was slower
than this correlation on every EfficientNet-Lite0 layer even for GPS K=1 (one entry per channel).
Vectors and any other tensor go through ``index_add`` (autograd's gather backward); their
dense gradient is O(numel) and cheap.
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
            # compared on the index's own device (torch.equal refuses a CUDA and a CPU tensor)
            if bool((torch.bincount(self.rows, minlength=n_rows) == k).all()):
                self.per_row = k

    def to(self, device: torch.device) -> "SparseIndex":
        if self.index.device != device:
            for name in ("index", "rows", "cols", "urows", "uinv"):
                setattr(self, name, getattr(self, name).to(device))
        return self


def _values_grad(g: Tensor, x: Tensor, geo: SparseIndex) -> Tensor:
    """grad δ_k = Σ_{b,l} G[b, row_k, l] · X[b, col_k, l] from G (B × out × L) and X (B × in × L).

    Channels sit in the middle so both a Linear (B = tokens, L = 1) and an NCHW pointwise conv
    (B = batch, L = H·W) are views, never permuted copies; gathering along dim 1 copies whole
    contiguous L-runs. Chunks of B keep the gathered buffers cache-sized. With K entries in
    every row (GPS) G needs no gather: it broadcasts against the gathered X viewed as
    B × out × K × L. With many entries per touched row, one matmul over the touched rows
    (G[:, U]ᵀ X, |U| × d_in) followed by a gather is cheaper.
    """
    if geo.use_rows:
        gu = g.index_select(1, geo.urows).transpose(1, 2).reshape(-1, geo.urows.numel())
        dw_rows = gu.t() @ x.transpose(1, 2).reshape(-1, x.shape[1])  # |U| × d_in
        return dw_rows[geo.uinv, geo.cols]
    batch, d_out, length = g.shape
    nnz = geo.index.numel()
    acc = torch.promote_types(torch.promote_types(g.dtype, x.dtype), torch.float32)  # sum chunks in ≥ float32
    step = max(1, _CHUNK_ELEMENTS // max(1, nnz * length))
    if geo.per_row:
        k = geo.per_row
        out = g.new_zeros(d_out, k, dtype=acc)
        for s in range(0, batch, step):
            xg = x[s:s + step].index_select(1, geo.cols).view(-1, d_out, k, length)
            out += (g[s:s + step].unsqueeze(2) * xg).sum((0, 3))
        return out.view(-1)
    out = g.new_zeros(nnz, dtype=acc)
    for s in range(0, batch, step):
        out += (g[s:s + step].index_select(1, geo.rows) * x[s:s + step].index_select(1, geo.cols)).sum((0, 2))
    return out


def _depthwise_kernel_grad(x: Tensor, gy: Tensor, weight_shape: torch.Size, stride: tuple[int, int],
                           padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Dense kernel gradient of a depthwise conv (one input channel per group) as one correlation.

    dW[o, 0, p, q] = Σ_{n,h,w} G[n, o, h, w] · X[n, o // m, h·s + p·d, w·s + q·d] (m = C_out/C_in)
    is a depthwise conv of X viewed as one image with N·C_in channels, with the G planes as
    its kernels, run with stride d and dilation s, then summed over n: the same multiply-adds
    as ``torch.nn.grad.conv2d_weight``, but oneDNN's depthwise weight-gradient kernel is up to
    ~20× slower on CPU (5×5 kernels at 4-14 px, see benchmarks/results/tuners.md). Grouped
    convs with several input channels per group would need G repeated per input channel; the
    dense oneDNN kernel is faster there.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight_shape
    oh, ow = gy.shape[2:]
    r = F.conv2d(x.reshape(1, n * c_in, h, w), gy.reshape(n * c_out, 1, oh, ow), None,
                 dilation, padding, stride, n * c_in)
    return r.view(n, c_out, r.shape[2], r.shape[3])[:, :, :kh, :kw].sum(0).unsqueeze(1)


def _conv_values_grad(x: Tensor, gy: Tensor, weight_shape: torch.Size, geo: SparseIndex, stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
    """The values' gradient of a sparse conv kernel, by the cheapest exact route for its geometry."""
    pointwise = (tuple(weight_shape[2:]) == (1, 1) and groups == 1 and tuple(stride) == (1, 1)
                 and tuple(padding) == (0, 0))
    if pointwise and not geo.use_rows:  # a Linear over channels, tokens = N·H·W
        n, c = x.shape[:2]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # tokens-first is the free view of channels-last tensors
            return _values_grad(gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1], 1),
                                x.permute(0, 2, 3, 1).reshape(-1, c, 1), geo)
        return _values_grad(gy.reshape(n, gy.shape[1], -1), x.reshape(n, c, -1), geo)
    if groups > 1 and weight_shape[1] == 1:
        dw = _depthwise_kernel_grad(x, gy, weight_shape, stride, padding, dilation)
    else:
        dw = torch.nn.grad.conv2d_weight(x, weight_shape, gy, stride, padding, dilation, groups)
    return dw.reshape(-1).index_select(0, geo.index)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls/convs in on ``x``'s device, or None when it is off there."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if x.is_floating_point() and torch.is_autocast_enabled(dev) else None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


class _SparseFunction(torch.autograd.Function):
    """Shared autocast handling of the fused sparse functions (a device-aware ``torch.amp.custom_fwd/bwd``).

    Under autocast the forward casts x, W' and b to the autocast dtype of x's device, as
    autocast does for the dense F.linear/F.conv2d, and runs with autocast off; the backward
    runs with autocast off in that dtype too (gy, the saved x and W' agree), and hands back
    each gradient in its input's dtype (values stay float32 like the trainable tensors).
    """

    @staticmethod
    def _prepare(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, geo: SparseIndex):
        if weight.requires_grad:
            raise RuntimeError("the frozen weight under a sparse delta must not require grad (apply_plan freezes it)")
        ctx.cast = _autocast_dtype(x)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, values.dtype)
        ctx.geo = geo
        x = _cast(x, ctx.cast)
        ctx.save_for_backward(x, weight, values)
        return x, _cast(scatter_delta(weight, values, geo.index), ctx.cast), _cast(bias, ctx.cast)

    @staticmethod
    def _grads(ctx, gx: Tensor | None, gb: Tensor | None, gv: Tensor | None):
        x_dtype, b_dtype, v_dtype = ctx.dtypes
        return (None if gx is None else gx.to(x_dtype), None if gb is None else gb.to(b_dtype),
                None if gv is None else gv.to(v_dtype))


class SparseLinearFunction(_SparseFunction):
    """y = x W'ᵀ + b with W' = W + scatter(δ); grads for x, b and δ only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, geo: SparseIndex) -> Tensor:  # type: ignore[override]
        x, w, bias = _SparseFunction._prepare(ctx, x, weight, bias, values, geo)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, values = ctx.saved_tensors
        geo: SparseIndex = ctx.geo
        gy = _cast(gy, ctx.cast)
        gx = gb = gv = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gx = gy @ _cast(scatter_delta(weight, values, geo.index), ctx.cast)
            g2 = gy.reshape(-1, gy.shape[-1])
            if ctx.needs_input_grad[2]:
                gb = g2.sum(0)
            if ctx.needs_input_grad[3]:
                gv = _values_grad(g2.unsqueeze(-1), x.reshape(-1, x.shape[-1]).unsqueeze(-1), geo)
        gx, gb, gv = _SparseFunction._grads(ctx, gx, gb, gv)
        return gx, None, gb, gv, None


class SparseConv2dFunction(_SparseFunction):
    """F.conv2d with W' = W + scatter(δ); ``x`` arrives already padded if the layer pads "same"."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, geo: SparseIndex,  # type: ignore[override]
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        x, w, bias = _SparseFunction._prepare(ctx, x, weight, bias, values, geo)
        ctx.conv = (stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, values = ctx.saved_tensors
        geo: SparseIndex = ctx.geo
        stride, padding, dilation, groups = ctx.conv
        gy = _cast(gy, ctx.cast)
        gx = gb = gv = None
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w = _cast(scatter_delta(weight, values, geo.index), ctx.cast)
                # with the saved input, not torch.nn.grad.conv2d_input's zero-stride stand-in, on which
                # oneDNN's input gradient of Lite0's depthwise convs took 1.6x the CPU time (tuners.md)
                gx = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0],
                                                         groups, (True, False, False))[0]
            if ctx.needs_input_grad[2]:
                gb = gy.sum((0, 2, 3))
            if ctx.needs_input_grad[3]:
                gv = _conv_values_grad(x, gy, weight.shape, geo, stride, padding, dilation, groups)
        gx, gb, gv = _SparseFunction._grads(ctx, gx, gb, gv)
        return gx, None, gb, gv, None, None, None, None, None
