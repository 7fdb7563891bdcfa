"""Helpers that write small task folders for the reader tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def write_vtab(root: Path, lists: dict[str, list[tuple[int, int]]], classes: list[str] | None = None) -> Path:
    """A VTAB-1k task: ``lists`` maps split -> [(image value, label)]; one PNG per line."""
    root.mkdir(parents=True, exist_ok=True)
    for split, items in lists.items():
        lines = []
        for i, (value, label) in enumerate(items):
            rel = f"images/{split}/{i:06d}.png"
            write_image(root / rel, value)
            lines.append(f"{rel} {label}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    if classes is not None:
        (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return root


@pytest.fixture
def vtab_task(tmp_path: Path) -> Path:
    return write_vtab(tmp_path / "toy", {
        "train800": [(10, 0), (20, 1), (30, 2)],
        "val200": [(40, 1)],
        "train800val200": [(10, 0), (20, 1), (30, 2), (40, 1)],
        "test": [(50, 2), (60, 0)],
    })


@pytest.fixture
def make_image():
    """``make_image(path, value=0, size=8)`` writes a constant RGB PNG."""
    return write_image


@pytest.fixture
def make_vtab():
    """``make_vtab(root, lists, classes=None)`` writes a VTAB-1k task folder."""
    return write_vtab
