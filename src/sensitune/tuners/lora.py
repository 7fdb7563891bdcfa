"""LoRA: ΔY = s · B·A·dropout(x), optionally with k-bit weights (Bi-LoRA) and drop-path on ΔY.

For a Linear (or a q/k/v row slice of a fused qkv) A is r × d_in and B is d_out × r. For a
Conv2d, A is a conv with the layer's own kernel, stride, padding and dilation into r channels
and B a 1×1 conv back to d_out, so B·A viewed as matrices (out × in·kh·kw) is the weight delta
and merging is exact. A starts kaiming-uniform; B starts at zero, or, when quantised, from a
truncated normal with std 1e-3 (a quantised matrix of zeros has σ = 0 and no direction).
SPT's LoRA uses s = 1 (no α/r scaling); PEFT-style α/r is just another ``scale``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn


def quantized(weight: Tensor, bits: int) -> Tensor:
    """``weight`` as the forward uses it: k-bit with a straight-through backward, or as is at 32 bits."""
    if bits == 32:
        return weight
    from sensitune.tuners.quant import quantize_ste  # lazy: the low-bit path is optional

    return quantize_ste(weight, bits)


def init_up(weight: Tensor, bits: int) -> None:
    """Zero for a float up-projection, trunc-normal std 1e-3 for a quantised one (σ must be > 0)."""
    with torch.no_grad():
        if bits == 32:
            weight.zero_()
        else:
            nn.init.trunc_normal_(weight, std=1e-3, a=-2e-3, b=2e-3)


class LoRA(nn.Module):
    """Low-rank delta for one matrix. ``conv=(stride, padding, dilation, kernel)`` for a Conv2d base."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, scale: float = 1.0, dropout: float = 0.0,
                 drop_path: float = 0.0, bits: int = 32, conv: dict | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank, self.scale, self.bits, self.conv = rank, float(scale), int(bits), conv
        kw = {"device": device, "dtype": dtype}
        if conv is None:
            self.A = nn.Parameter(torch.empty(rank, d_in, **kw))
            self.B = nn.Parameter(torch.empty(d_out, rank, **kw))
        else:
            cin, (kh, kw_) = conv["in_channels"], conv["kernel"]
            if cin * kh * kw_ != d_in:
                raise ValueError(f"LoRA conv geometry {cin}x{kh}x{kw_} does not match d_in={d_in}")
            self.A = nn.Parameter(torch.empty(rank, cin, kh, kw_, **kw))
            self.B = nn.Parameter(torch.empty(d_out, rank, 1, 1, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        init_up(self.B, self.bits)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """ΔY for input ``x`` (for a conv base: the input after the base's own "same" padding)."""
        a, b = quantized(self.A, self.bits), quantized(self.B, self.bits)
        x = self.dropout(x)
        if self.conv is None:
            y = F.linear(F.linear(x, a), b)
        else:
            c = self.conv
            y = F.conv2d(F.conv2d(x, a, None, c["stride"], c["padding"], c["dilation"]), b)
        if self.scale != 1.0:
            y = y * self.scale
        return self.drop_path(y)

    def is_linear(self) -> bool:
        """True when ΔY is exactly (s·B·A)·x right now: no dropout or drop-path is active."""
        return not self.training or (isinstance(self.dropout, nn.Identity) and isinstance(self.drop_path, nn.Identity))

    def delta_matrix(self) -> Tensor:
        """s · B·A as a (d_out × d_in·kh·kw) matrix, differentiable in A and B."""
        a, b = quantized(self.A, self.bits), quantized(self.B, self.bits)
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * self.scale

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """What merging adds to the base weight's rows (:meth:`delta_matrix` without autograd)."""
        return self.delta_matrix()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, bits={self.bits}, conv={self.conv is not None}"
