"""SSF (Scaling & Shifting Features, Lian et al., NeurIPS 2022): y ← γ ⊙ y + β per channel.

γ starts at 1 and β at 0, so a freshly attached SSF is the identity. It follows a Linear or
Conv2d (on its output channels) or a norm layer (on its affine output), and because it is
affine per channel it folds exactly into what precedes it: for a Linear/Conv2d, W ← γ ⊙ W (rows)
and b ← γ ⊙ b + β; for a norm, w ← γ ⊙ w and b ← γ ⊙ b + β.

A norm's SSF is applied by scaling its affine parameters in the forward (a vector product, so
it also fits norms that run an activation after the affine, such as timm's BatchNormAct2d);
a Linear/Conv2d's SSF multiplies its output, which keeps the dense weight gradient out of the
backward (grad γ = Σ g ⊙ y needs no weight-sized tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class SSF(nn.Module):
    """A per-channel scale (init 1) and shift (init 0) over ``channels``."""

    def __init__(self, channels: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, y: Tensor, dim: int = -1) -> Tensor:
        """γ ⊙ y + β with the channels on ``dim`` of ``y``."""
        shape = [1] * y.dim()
        shape[dim] = -1
        return torch.addcmul(self.shift.view(shape), y, self.scale.view(shape))

    def affine(self, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
        """A norm's affine parameters with this SSF folded in (differentiable in γ and β)."""
        return {"weight": weight * self.scale, "bias": torch.addcmul(self.shift, bias, self.scale)}

    @torch.no_grad()
    def fold_into(self, weight: Tensor, bias: Tensor) -> None:
        """Fold γ, β in place into the rows of ``weight`` (any shape, channels first) and ``bias``."""
        weight.mul_(self.scale.view(-1, *([1] * (weight.dim() - 1))))
        bias.mul_(self.scale).add_(self.shift)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"
