"""Shared tiny fixtures for the engine tests: a small ViT, a small random image task, and a
small task folder in the VTAB-1k layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import Dataset


def tiny_vit(num_classes: int = 3, drop_path: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=num_classes, drop_path_rate=drop_path)


def freeze_first_block(model: torch.nn.Module) -> None:
    """Emulate a plan that leaves part of the model frozen (tests only)."""
    for name, p in model.named_parameters():
        if name.startswith(("blocks.0.", "patch_embed.", "cls_token", "pos_embed")):
            p.requires_grad_(False)


class TinyTask(Dataset):
    """n random 32x32 images with a learnable label (class = brightest third of the image);
    ``augment`` adds a random flip and noise drawn from the global torch RNG, like a transform."""

    def __init__(self, n: int = 48, num_classes: int = 3, augment: bool = False, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        for i, c in enumerate(self.y.tolist()):
            self.x[i, :, :, c * 10:(c + 1) * 10] += 1.0
        self.augment, self.num_classes = augment, num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(1)
            x = x + 0.05 * torch.randn_like(x)
        return x, self.y[i]


class Crash(TinyTask):
    """Raises after ``limit`` items, like a process dying mid-epoch."""

    def __init__(self, limit: int, **kw):
        super().__init__(**kw)
        self.limit, self.calls = limit, 0

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError("simulated crash")
        return super().__getitem__(i)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_history(a: list[dict], b: list[dict]) -> None:
    """Equal metrics apart from wall-clock columns."""
    skip = {"epoch_seconds", "images_per_s"}
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}


def make_vtab(root: Path, sizes=None, classes: int = 3, size: int = 32) -> Path:
    """A small task folder in the VTAB-1k layout: class c has a bright vertical band c."""
    sizes = sizes or {"train800": 24, "val200": 12, "test": 12}
    rng = np.random.default_rng(0)
    lists = {}
    for split, n in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            c = i % classes
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            img[:, c * size // classes:(c + 1) * size // classes] += 150
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(img).save(root / rel)
            rows.append(f"{rel} {c}")
        lists[split] = rows
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, rows in lists.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root
