"""k-bit quantisation-aware weights (1, 2, 4, 8 bits; 32 = plain float) for low-bit adapters.

Each weight matrix is standardised (μ = mean, σ = std, Ŵ = (W − μ)/(σ + 1e-5)), Ŵ is snapped
to the nearest level of a codebook designed for a standard normal, and the matrix used in the
forward pass is W_q = Q(Ŵ)·σ + μ. The backward pass is straight-through on Ŵ (no clipping)
while μ and σ stay differentiable, so the latent float weight keeps learning.

The codebook is *computed*, not typed in: its 2^b levels are the fixed point of "every level is
the probability-median of its bin under N(0, 1), and the bin edges are the midpoints between
neighbouring levels" (Jie et al., ICCV 2023). The same codebook tensors serve the training
forward (:func:`quantize_ste`) and the storage path (:func:`quantize_codes` /
:func:`dequantize`), so a model rebuilt from stored codes reproduces the trained forward bit
for bit.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.special import ndtr, ndtri

from sensitune.tuners.packing import pack_bits, unpack_bits

#: bit widths a quantised weight may use; 32 means "plain float, no quantisation"
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 4, 8, 32)
#: added to σ before dividing, so a constant matrix does not divide by zero
EPS = 1e-5
#: bytes of per-matrix statistics stored beside the packed codes (μ and σ as float32)
STATS_NBYTES = 8


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported width, else raise a ValueError that lists them."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS} (32 = plain float)")
    return bits


def _quantized_bits(bits: int) -> int:
    """Like :func:`check_bits` but excludes 32 (which has no codes)."""
    check_bits(bits)
    if bits == 32:
        raise ValueError("bits=32 is a plain float weight and has no codebook or codes; use 1, 2, 4 or 8")
    return bits


# ----------------------------------------------------------------------------- codebook
def _median_map(lower: Tensor) -> Tensor:
    """One step of the spec's fixed-point map, on the negative half of the (symmetric) codebook.

    Bin edges are midpoints of neighbouring levels, the last edge is 0 (the symmetry axis), and
    each level moves to Φ⁻¹ of the mean of its bin's edge probabilities, i.e. the bin's median.
    Working on the lower half keeps every probability ≤ 0.5, where Φ and Φ⁻¹ are accurate in
    float64 even far in the tail (the upper half would lose digits near p = 1).
    """
    edges = (lower[:-1] + lower[1:]) / 2
    zero = lower.new_zeros(1)
    p = torch.cat([zero, ndtr(edges), zero + 0.5])
    return ndtri((p[:-1] + p[1:]) / 2)


@lru_cache(maxsize=None)
def _codebook_f64(bits: int) -> tuple[Tensor, Tensor]:
    """Levels and thresholds (float64, CPU) for ``bits``, solved once per process.

    Plain fixed-point iteration converges in tens of steps for ≤ 4 bits but needs ~3·10^5 steps
    at 8 bits (the slowest mode is a global stretch of all 128 levels), so each fixed-point step
    is taken as a Newton step on the residual ``F(v) − v`` (same fixed point, quadratic
    convergence; the Jacobian of the map is tridiagonal and tiny). Starts from equal-probability
    quantiles.
    """
    half = 2 ** bits // 2
    lower = ndtri((torch.arange(half, dtype=torch.float64) + 0.5) / (2 * half))
    eye = torch.eye(half, dtype=torch.float64)
    for _ in range(100):
        residual = _median_map(lower) - lower
        if residual.abs().max().item() < 1e-13:
            break
        jac = torch.autograd.functional.jacobian(_median_map, lower) - eye
        lower = lower - torch.linalg.solve(jac, residual)
    else:  # pragma: no cover - the solve converges in < 10 steps for every supported width
        raise RuntimeError(f"codebook for {bits} bits did not converge")
    levels = torch.cat([lower, -lower.flip(0)])
    thresholds = (levels[:-1] + levels[1:]) / 2
    thresholds[half - 1] = 0.0  # exactly on the symmetry axis
    return levels, thresholds


@lru_cache(maxsize=64)
def _codebook_as(bits: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    levels, thresholds = _codebook_f64(bits)
    return levels.to(device=device, dtype=dtype), thresholds.to(device=device, dtype=dtype)


def codebook(bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 2^bits levels (ascending) of the standard-normal codebook for ``bits`` ∈ {1, 2, 4, 8}."""
    _quantized_bits(bits)
    levels, _ = _codebook_as(bits, dtype, torch.device(device or "cpu"))
    return levels.clone()


def thresholds(bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 2^bits − 1 bin edges (midpoints of neighbouring levels), ascending."""
    _quantized_bits(bits)
    _, edges = _codebook_as(bits, dtype, torch.device(device or "cpu"))
    return edges.clone()


# ----------------------------------------------------------------------------- quantisation
def standardize(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Ŵ, μ, σ) with μ = mean, σ = std (unbiased) and Ŵ = (W − μ)/(σ + EPS); differentiable."""
    if not torch.is_floating_point(weight):
        raise TypeError(f"quantised weights must be floating point, got {weight.dtype}")
    if weight.numel() < 2:
        raise ValueError(f"cannot standardise a weight with {weight.numel()} element(s); need at least 2")
    mu = weight.mean()
    sigma = weight.std()
    return (weight - mu) / (sigma + EPS), mu, sigma


def _codes_of(w_hat: Tensor, bits: int) -> Tensor:
    """Index of the nearest level for each entry (a value exactly on an edge takes the lower level)."""
    _, edges = _codebook_as(bits, w_hat.dtype, w_hat.device)
    return torch.bucketize(w_hat.detach(), edges)


class _SnapToCodebook(torch.autograd.Function):
    """Forward: the nearest codebook level. Backward: the incoming gradient unchanged (STE).

    A custom Function (rather than ``Ŵ + (Q(Ŵ) − Ŵ).detach()``) makes the forward value exactly
    the level, which is what lets stored codes reproduce the training forward bit for bit.
    """

    @staticmethod
    def forward(ctx, w_hat: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        levels, _ = _codebook_as(bits, w_hat.dtype, w_hat.device)
        return levels[_codes_of(w_hat, bits)]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def quantize_ste(weight: Tensor, bits: int) -> Tensor:
    """The weight a quantisation-aware layer uses in its forward: Q(Ŵ)·σ + μ, STE on Ŵ.

    ``bits=32`` returns ``weight`` itself (a plain float layer). Shape and dtype are kept.
    """
    check_bits(bits)
    if bits == 32:
        return weight
    w_hat, mu, sigma = standardize(weight)
    return _SnapToCodebook.apply(w_hat, bits) * sigma + mu


@torch.no_grad()
def quantize_codes(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, μ, σ): the level index (uint8, weight's shape) of every entry and 0-d statistics.

    ``dequantize(codes, μ, σ, bits)`` equals ``quantize_ste(weight, bits)`` exactly.
    """
    _quantized_bits(bits)
    w_hat, mu, sigma = standardize(weight.detach())
    return _codes_of(w_hat, bits).to(torch.uint8), mu, sigma


def dequantize(
    codes: Tensor, mu: Tensor, sigma: Tensor, bits: int, shape: Sequence[int] | None = None
) -> Tensor:
    """levels[codes]·σ + μ in the dtype of ``mu``, reshaped to ``shape`` (default: codes' shape).

    Uses the same cached codebook and the same two operations as :func:`quantize_ste`, so the
    result is bit-identical to the training forward's weight.
    """
    _quantized_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if not torch.is_floating_point(mu) or mu.dtype != sigma.dtype:
        raise TypeError(f"mu and sigma must share a floating dtype, got {mu.dtype} and {sigma.dtype}")
    levels, _ = _codebook_as(bits, mu.dtype, codes.device)
    if codes.numel() and int(codes.max()) >= levels.numel():
        raise ValueError(f"code {int(codes.max())} is out of range for {bits} bits (max {levels.numel() - 1})")
    weight = levels[codes.long()] * sigma.to(codes.device) + mu.to(codes.device)
    return weight if shape is None else weight.reshape(tuple(shape))


# ----------------------------------------------------------------------------- storage
def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes one matrix of ``numel`` entries takes on disk at ``bits`` (spec §4).

    Quantised: the bit-packed codes, ceil(numel·bits/8), plus μ and σ as float32 (8 B).
    32 bits: the float32 values, 4·numel.
    """
    check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if bits == 32:
        return 4 * numel
    return math.ceil(numel * bits / 8) + STATS_NBYTES


def head_nbytes(in_features: int, num_classes: int, bits: int = 32, bias: bool = True) -> int:
    """Bytes of a linear classifier head: float32 weight (+ bias), or a quantised matrix (+ float32 bias)."""
    return packed_nbytes(in_features * num_classes, bits) + (4 * num_classes if bias else 0)


def storage_nbytes(
    matrices: Iterable[tuple[Sequence[int], int]],
    head: tuple[int, int] | None = None,
    bi_head: bool = False,
) -> int:
    """Bytes per task: Σ packed_nbytes over ``(shape, bits)`` matrices plus the head.

    ``head=(in_features, num_classes)`` adds a float32 weight + bias, or with ``bi_head`` a 1-bit
    matrix without bias (the spec's "Bi-Head").
    """
    total = sum(packed_nbytes(math.prod(shape), bits) for shape, bits in matrices)
    if head is not None:
        d, c = head
        total += head_nbytes(d, c, bits=1, bias=False) if bi_head else head_nbytes(d, c)
    return total


def pack_quantized(weight: Tensor, bits: int) -> dict[str, Tensor]:
    """A weight as tensors to store (e.g. in safetensors): what :func:`unpack_quantized` reads.

    Quantised widths: ``codes`` (bit-packed uint8), ``mu``/``sigma`` (float32, shape [1]),
    ``shape`` and ``bits`` (int64). ``bits=32``: ``weight`` (float32 as is), ``shape``, ``bits``.
    The stored bytes of codes + μ + σ are exactly :func:`packed_nbytes`.
    """
    check_bits(bits)
    shape = torch.tensor(list(weight.shape), dtype=torch.int64)
    tag = torch.tensor([bits], dtype=torch.int64)
    if bits == 32:
        return {"weight": weight.detach().to(torch.float32).contiguous().clone(), "shape": shape, "bits": tag}
    if weight.dtype != torch.float32:
        raise TypeError(f"pack_quantized stores float32 statistics; quantise a float32 weight, got {weight.dtype}")
    codes, mu, sigma = quantize_codes(weight, bits)
    return {
        "codes": pack_bits(codes.reshape(-1), bits),
        "mu": mu.reshape(1).clone(),
        "sigma": sigma.reshape(1).clone(),
        "shape": shape,
        "bits": tag,
    }


def unpack_quantized(stored: dict[str, Tensor], name: str = "weight") -> Tensor:
    """The float32 weight a :func:`pack_quantized` dict stands for (``name`` only labels errors).

    Feed the result to a layer as a plain float weight (bits=32): it is exactly the W_q the
    quantised layer used, so the reloaded forward is bit-identical. (Quantising it again would
    not be: the mean and std of W_q differ from those of the latent weight.)
    """
    for key in ("shape", "bits"):
        if key not in stored:
            raise KeyError(f"{name}: stored quantised weight lacks {key!r} (has {sorted(stored)})")
    bits = check_bits(int(stored["bits"].reshape(-1)[0]))
    shape = tuple(int(s) for s in stored["shape"].tolist())
    numel = math.prod(shape)
    if bits == 32:
        weight = stored.get("weight")
        if weight is None:
            raise KeyError(f"{name}: a 32-bit weight needs 'weight' (has {sorted(stored)})")
        if tuple(weight.shape) != shape:
            raise ValueError(f"{name}: weight has shape {tuple(weight.shape)} but 'shape' says {shape}")
        return weight.to(torch.float32)
    missing = [k for k in ("codes", "mu", "sigma") if k not in stored]
    if missing:
        raise KeyError(f"{name}: stored {bits}-bit weight lacks {missing} (has {sorted(stored)})")
    codes = unpack_bits(stored["codes"], bits, numel)
    return dequantize(codes, stored["mu"].reshape(()), stored["sigma"].reshape(()), bits, shape)


# ----------------------------------------------------------------------------- layers
class QuantLinear(nn.Linear):
    """A linear layer whose weight is quantised to ``bits`` in every forward (STE backward).

    ``QuantLinear(d, C, bits=1, bias=False)`` is the spec's "Bi-Head"; :func:`bi_head` builds it
    from an existing head. The latent weight stays float32 and is what the optimiser updates.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 1, bias: bool = True, **kw) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.bits = check_bits(bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, quantize_ste(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def bi_head(head: nn.Linear, bits: int = 1, bias: bool = False) -> QuantLinear:
    """A quantised replacement for ``head`` (same shape, device, dtype), initialised from its weight."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"bi_head expects an nn.Linear head, got {type(head).__name__}")
    q = QuantLinear(head.in_features, head.out_features, bits=bits, bias=bias,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        q.weight.copy_(head.weight)
        if bias and head.bias is not None:
            q.bias.copy_(head.bias)
    return q
