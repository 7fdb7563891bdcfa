"""Small models and data shared by the scoring tests (and the 2-process worker script)."""
from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

EXCLUDED = ("head.", "cls_token", "pos_embed", "patch_embed.")


def tiny_vit(drop_path_rate: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3,
                             drop_path_rate=drop_path_rate)


def tiny_effnet(seed: int = 0) -> nn.Module:
    """A tiny timm EfficientNet (BatchNorm, dropout before the head) with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def tensor_data(n: int = 12, size: int = 32, classes: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    return TensorDataset(x, y)


def jitter_view(x: torch.Tensor) -> torch.Tensor:
    """A random 'augmentation' of a tensor image (draws from torch's RNG, like torchvision's)."""
    return x + 0.1 * torch.randn_like(x)
