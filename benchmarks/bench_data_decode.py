"""Cost of decoding every image when a split is opened, on a VTAB-1k-sized task.

    .venv/bin/python benchmarks/bench_data_decode.py [--repeats 3] [--kinds natural,small,wide]

Writes a task in the VTAB-1k layout (train800 / val200 / train800val200 list files, 1000
distinct images) into a temporary folder, once per image kind:

* ``natural``: 500 × 375 JPEG (quality 90) crops of scikit-image's photos — the size of
  Caltech101, Pets, Flowers, DTD images;
* ``small``: 32 × 32 PNG (CIFAR, SVHN);
* ``wide``: 1242 × 375 PNG (KITTI).

For each it times what ``train()`` does before any work (open train800 and val200: 1000 images)
under: no image check (paths and labels only), the header check alone (``Image.verify``, the
check before full decoding), full decoding on one thread, full decoding on the default pool,
and a second open in the same process (every image already decoded: the cache).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = {"natural": ((500, 375), "JPEG"), "small": ((32, 32), "PNG"), "wide": ((1242, 375), "PNG")}


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [np.asarray(f()) for f in (data.astronaut, data.chelsea, data.coffee, data.rocket)]


def write_task(root: Path, kind: str, photos: list[np.ndarray], seed: int = 0) -> Path:
    (w, h), fmt = KINDS[kind]
    rng = np.random.default_rng(seed)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1000):
        src = photos[i % len(photos)]
        y = rng.integers(0, src.shape[0] // 4)
        x = rng.integers(0, src.shape[1] // 4)
        crop = Image.fromarray(src[y:, x:]).resize((w, h), Image.BICUBIC)
        arr = np.asarray(crop).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))  # every image distinct
        rel = f"images/{i:06d}{ext}"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / rel, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append(f"{rel} {i % 10}")
    (root / "train800.txt").write_text("\n".join(rows[:800]) + "\n")
    (root / "val200.txt").write_text("\n".join(rows[800:]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(rows) + "\n")
    return root


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default="natural,small,wide")
    args = ap.parse_args()

    import sensitune.data.validate as validate
    from sensitune.data import open_task

    def open_run_splits(root: Path, verify: bool = True) -> None:
        open_task(root, "train800", verify=verify)
        open_task(root, "val200", verify=verify)

    def cold(fn):
        def run():
            validate._decoded.clear()
            fn()
        return run

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def header_only(root: Path) -> None:
        for line in (root / "train800val200.txt").read_text().splitlines():
            with Image.open(root / line.rsplit(" ", 1)[0]) as im:
                im.verify()

    photos = _photos()
    pool = max(1, min(8, os.cpu_count() or 1))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores (decode pool: {pool} threads), "
          f"medians of {args.repeats}; 1000 images = train800 + val200 as train() opens them")
    print("\n| images | MB on disk | no image check s | header check only s | full decode, 1 thread s "
          "| full decode, pool s | ms per image (pool) | second open (cached) s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sensitune-decode-") as tmp:
        for kind in args.kinds.split(","):
            root = write_task(Path(tmp) / kind, kind, photos)
            mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
            none = timed(lambda: open_run_splits(root, verify=False))
            header = timed(lambda: header_only(root))
            saved_min = validate._POOL_MIN
            validate._POOL_MIN = 10**9  # every split below the pool threshold: one thread
            one = timed(cold(lambda: open_run_splits(root)))
            validate._POOL_MIN = saved_min
            pooled = timed(cold(lambda: open_run_splits(root)))
            open_run_splits(root)
            cached = timed(lambda: open_run_splits(root))
            (w, h), fmt = KINDS[kind]
            print(f"| {kind}: 1000 × {w}×{h} {fmt} | {mb:.1f} | {none:.3f} | {header:.3f} | {one:.2f} | {pooled:.2f} "
                  f"| {1000 * pooled / 1000:.2f} | {cached:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
