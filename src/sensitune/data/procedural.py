"""Rendered structured tasks in the spirit of VTAB's dSprites / CLEVR group.

Each renderer draws one 64×64 RGB scene with Pillow (at 2× and downsampled, for smooth edges)
from a numpy ``Generator`` and returns ``(image, label)`` for a *given* label, so the caller
controls class balance. Random distractor shapes, colours, sizes and backgrounds keep the
tasks learnable but not trivial: the label depends on where / how one object sits, not on
any colour statistic a linear probe can read off.

| task          | label                                                      | classes |
|---------------|------------------------------------------------------------|---------|
| shapes_loc    | 4×4 grid cell of the white ring's centre (among 1–4 others) | 16      |
| shapes_ori    | 45° bin of the white arrow's heading (among 1–3 others)     | 8       |
| shapes_count  | number of objects in the scene, 3..10                        | 8       |
| shapes_dist   | 8-px bin of the red-circle ↔ blue-square distance (10–58 px) | 6       |
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 2  # supersampling factor

# Distractor colours avoid pure white (the loc/ori target) and the red/blue of shapes_dist.
_PALETTE = np.array([
    (60, 200, 60), (230, 210, 40), (200, 80, 200), (60, 200, 210), (240, 140, 30),
    (150, 150, 150), (140, 90, 40), (120, 220, 140), (180, 180, 90),
])
_RED = np.array((225, 40, 40))
_BLUE = np.array((40, 70, 235))
_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")


def _colour(rng: np.random.Generator, base: np.ndarray | None = None) -> tuple[int, int, int]:
    base = _PALETTE[rng.integers(len(_PALETTE))] if base is None else base
    c = np.clip(base + rng.integers(-20, 21, size=3), 0, 255)
    return tuple(int(v) for v in c)


class _Canvas:
    def __init__(self, rng: np.random.Generator):
        level = int(rng.integers(0, 80))
        tint = rng.integers(-12, 13, size=3)
        bg = tuple(int(v) for v in np.clip(level + tint, 0, 255))
        self.image = Image.new("RGB", (SIZE * _SS, SIZE * _SS), bg)
        self.draw = ImageDraw.Draw(self.image)

    def shape(self, kind: str, cx: float, cy: float, r: float, angle: float, fill, outline_width: int = 0):
        s = _SS
        if kind == "circle" or kind == "ring":
            box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
            if kind == "ring":
                self.draw.ellipse(box, outline=fill, width=max(2, int(round(r * s * 0.35))))
            else:
                self.draw.ellipse(box, fill=fill)
            return
        if kind == "arrow":  # elongated isosceles triangle: heading is unambiguous over 360°
            pts = [(r, 0.0), (-0.6 * r, 0.45 * r), (-0.6 * r, -0.45 * r)]
        else:
            n = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[kind]
            off = math.pi / 4 if kind == "square" else 0.0
            pts = [(r * math.cos(off + 2 * math.pi * k / n), r * math.sin(off + 2 * math.pi * k / n)) for k in range(n)]
            if kind == "diamond":
                pts = [(x * 0.65 if k % 2 else x, y) for k, (x, y) in enumerate(pts)]
        ca, sa = math.cos(angle), math.sin(angle)
        poly = [((cx + x * ca - y * sa) * s, (cy - (x * sa + y * ca)) * s) for x, y in pts]
        self.draw.polygon(poly, fill=fill)

    def finish(self) -> Image.Image:
        return self.image.resize((SIZE, SIZE), Image.Resampling.BOX)


def _place(rng: np.random.Generator, radii: list[float], fixed: list[tuple[float, float, float]],
           gap: float = 1.0, tries: int = 200) -> list[tuple[float, float]]:
    """Non-overlapping centres for objects of the given radii, avoiding the ``fixed`` (x, y, r)."""
    placed = list(fixed)
    out: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r, SIZE - r, size=2)
            if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + gap) ** 2 for px, py, pr in placed):
                break
        else:  # crowded scene: accept an overlap rather than loop forever (rare, still labelled right)
            x, y = rng.uniform(r, SIZE - r, size=2)
        placed.append((x, y, r))
        out.append((x, y))
    return out


def _distractors(rng, canvas: _Canvas, n: int, fixed, colour_base=None, r_range=(3.0, 7.0)) -> None:
    radii = list(rng.uniform(*r_range, size=n))
    for (x, y), r in zip(_place(rng, radii, fixed), radii):
        kind = _SHAPES[rng.integers(len(_SHAPES))]
        canvas.shape(kind, x, y, r, rng.uniform(0, 2 * math.pi), _colour(rng, colour_base))


def render_loc(rng: np.random.Generator, label: int) -> Image.Image:
    """White ring whose centre lies in grid cell ``label`` (row-major 4×4 over the canvas)."""
    row, col = divmod(label, 4)
    cell = SIZE / 4
    r = rng.uniform(4.5, 7.5)
    x = rng.uniform(max(col * cell, r), min((col + 1) * cell, SIZE - r))
    y = rng.uniform(max(row * cell, r), min((row + 1) * cell, SIZE - r))
    c = _Canvas(rng)
    _distractors(rng, c, int(rng.integers(1, 5)), [(x, y, r)])
    c.shape("ring", x, y, r, 0.0, _colour(rng, np.array((245, 245, 245))))
    return c.finish()


def render_ori(rng: np.random.Generator, label: int) -> Image.Image:
    """White arrow whose heading (counter-clockwise from +x) lies in the 45° bin ``label``."""
    angle = math.radians(rng.uniform(label * 45.0, (label + 1) * 45.0))
    r = rng.uniform(9.0, 15.0)
    x, y = rng.uniform(r, SIZE - r, size=2)
    c = _Canvas(rng)
    _distractors(rng, c, int(rng.integers(1, 4)), [(x, y, r)], r_range=(3.0, 6.0))
    c.shape("arrow", x, y, r, angle, _colour(rng, np.array((245, 245, 245))))
    return c.finish()


def render_count(rng: np.random.Generator, label: int) -> Image.Image:
    """``label + 3`` objects of random shape, colour and size, not overlapping."""
    c = _Canvas(rng)
    n = label + 3
    radii = list(rng.uniform(3.0, 6.0, size=n))
    for (x, y), r in zip(_place(rng, radii, [], gap=1.5), radii):
        kind = _SHAPES[rng.integers(len(_SHAPES))]
        base = np.array((235, 235, 235)) if rng.random() < 0.15 else None
        c.shape(kind, x, y, r, rng.uniform(0, 2 * math.pi), _colour(rng, base))
    return c.finish()


DIST_EDGES = tuple(10.0 + 8.0 * k for k in range(7))  # 10, 18, ..., 58 px → 6 bins


def render_dist(rng: np.random.Generator, label: int) -> Image.Image:
    """Red circle and blue square whose centre distance lies in bin ``label`` of DIST_EDGES."""
    r1, r2 = rng.uniform(4.0, 6.0, size=2)
    lo, hi = DIST_EDGES[label], DIST_EDGES[label + 1]
    for _ in range(1000):
        x1, y1 = rng.uniform(r1, SIZE - r1, size=2)
        d, a = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
        x2, y2 = x1 + d * math.cos(a), y1 + d * math.sin(a)
        if r2 <= x2 <= SIZE - r2 and r2 <= y2 <= SIZE - r2:
            break
    else:  # pragma: no cover - every bin is reachable inside a 64 px canvas
        raise RuntimeError(f"could not place a pair at distance bin {label}")
    c = _Canvas(rng)
    _distractors(rng, c, int(rng.integers(1, 5)), [(x1, y1, r1), (x2, y2, r2)], r_range=(3.0, 6.0))
    c.shape("circle", x1, y1, r1, 0.0, _colour(rng, _RED))
    c.shape("square", x2, y2, r2, rng.uniform(0, 2 * math.pi), _colour(rng, _BLUE))
    return c.finish()


# name -> (renderer, class names)
RENDERERS: dict[str, tuple[Callable[[np.random.Generator, int], Image.Image], list[str]]] = {
    "shapes_loc": (render_loc, [f"row{r}_col{c}" for r in range(4) for c in range(4)]),
    "shapes_ori": (render_ori, [f"{45 * k}-{45 * (k + 1)}deg" for k in range(8)]),
    "shapes_count": (render_count, [str(n) for n in range(3, 11)]),
    "shapes_dist": (render_dist, [f"{int(DIST_EDGES[k])}-{int(DIST_EDGES[k + 1])}px" for k in range(6)]),
}


def render_split(name: str, rng: np.random.Generator, n: int) -> list[tuple[Image.Image, int]]:
    """``n`` scenes with labels balanced (``n mod C`` classes get one more), in shuffled order."""
    render, classes = RENDERERS[name]
    labels = rng.permutation(np.arange(n) % len(classes))
    return [(render(rng, int(lab)), int(lab)) for lab in labels]
