"""Task data: cold build time of the built-in mini suite, cost of validating a split when it is
opened (header verify on vs. off, side by side), and loading throughput at the mini-suite size.

    .venv/bin/python benchmarks/bench_data.py [--repeats 3]

Builds into a fresh temporary SENSITUNE_CACHE so the numbers are cold-build numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sensitune-bench-data-")
    os.environ["SENSITUNE_CACHE"] = tmp

    import torch

    import sensitune.data.validate as validate
    from sensitune.data import DEFAULT_MINI_IMG_SIZE, build_transform, open_task
    from sensitune.data.embedded import TASKS, materialize

    torch.set_num_threads(2)
    print(f"cache: {tmp}  python {sys.version.split()[0]}  torch {torch.__version__}  cores {os.cpu_count()}")
    print("\n| task | images | cold build s | MB on disk | open test (verify) s | open test (no verify) s | verify overhead |")
    print("|---|---|---|---|---|---|---|")
    total_build = 0.0
    for name in TASKS:
        t = time.perf_counter()
        folder = materialize(name)
        build = time.perf_counter() - t
        total_build += build
        mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        n = sum(TASKS[name].sizes)
        on = _median_time(lambda: (validate._decoded.clear(), open_task(name, "test")), args.repeats)  # cold decode
        off = _median_time(lambda: open_task(name, "test", verify=False), args.repeats)
        print(f"| {name} | {n} | {build:.2f} | {mb:.1f} | {on:.3f} | {off:.3f} | {on / off:.1f}× |")
    print(f"\nwhole suite cold build: {total_build:.1f} s")

    cfg = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    tf = build_transform(cfg, img_size=DEFAULT_MINI_IMG_SIZE)
    print(f"\nDataLoader over train800val200 (1000 images) at {DEFAULT_MINI_IMG_SIZE} px, batch 64, num_workers=0:")
    print("| task | images/s (transform + collate) | images/s (PIL decode only) |")
    print("|---|---|---|")
    for name in ("digits", "textile", "shapes_count"):
        ds = open_task(name, "train800val200", transform=tf, verify=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=0)
        full = _median_time(lambda: [None for _ in loader], args.repeats)
        raw = _median_time(lambda: [ds.load_image(i) for i in range(len(ds))], args.repeats)
        print(f"| {name} | {len(ds) / full:.0f} | {len(ds) / raw:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
