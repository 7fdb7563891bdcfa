"""Backbone creation time and weights_fingerprint throughput, side by side with raw sha256.

Usage: .venv/bin/python benchmarks/bench_models.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import timm
import torch

from sensitune.models import create_backbone, weights_fingerprint


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)

    print("| what | median s |")
    print("|---|---|")
    for name, kw in (("efficientnet_lite0", {}), ("efficientnet_lite2", {})):
        s = _median_time(lambda: create_backbone(name, num_classes=10, **kw), args.repeats)
        print(f"| create_backbone({name!r}, 10) with package weights | {s:.3f} |")
    s = _median_time(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10), args.repeats)
    print(f"| timm.create_model('tf_efficientnet_lite0') random init (reference) | {s:.3f} |")

    print()
    print("| model | MB hashed | fingerprint s | fingerprint MB/s | raw sha256 of one buffer MB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, kw in (("tf_efficientnet_lite0", {}), ("vit_base_patch16_224", {})):
        model = timm.create_model(name, pretrained=False, **kw)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        fp = _median_time(lambda: weights_fingerprint(model, exclude_head=False), args.repeats)
        buf = torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()
                         if t.is_floating_point()]).numpy()
        raw = _median_time(lambda: hashlib.sha256(buf.data).hexdigest(), args.repeats)
        mb = nbytes / 1e6
        print(f"| {name} | {mb:.1f} | {fp:.3f} | {mb / fp:.0f} | {buf.nbytes / 1e6 / raw:.0f} | "
              f"{(buf.nbytes / raw) / (nbytes / fp):.2f} |")


if __name__ == "__main__":
    main()
