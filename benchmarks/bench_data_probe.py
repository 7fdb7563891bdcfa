"""Is the mini suite learnable but not trivial? A linear probe on frozen EfficientNet-Lite0
(real ImageNet weights) features per task: train on train800val200, report test accuracy.

    .venv/bin/python benchmarks/bench_data_probe.py [--img-size 64]

Like VTAB, a frozen linear probe should do well on natural tasks and poorly on structured
ones (VTAB ViT-B linear: structured 26.8 vs LoRA 60.5) — the gap PEFT methods must close.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def features(model, ds, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch)
    xs, ys = [], []
    with torch.inference_mode():
        for x, y in loader:
            xs.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
            ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--img-size", type=int, default=None)
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sensitune.data import DEFAULT_MINI_IMG_SIZE, MINI_SUITE, build_transform, open_task
    from sensitune.models import create_backbone, data_config

    torch.set_num_threads(2)
    size = args.img_size or DEFAULT_MINI_IMG_SIZE
    model = create_backbone("efficientnet_lite0", num_classes=10).eval()
    tf = build_transform(data_config(model), img_size=size)
    print(f"EfficientNet-Lite0 (ImageNet weights, frozen) at {size} px; logistic regression on pooled features")
    print("| task | group | classes | chance % | linear probe test % |")
    print("|---|---|---|---|---|")
    for name, group in MINI_SUITE:
        tr, te = open_task(name, "train800val200", transform=tf), open_task(name, "test", transform=tf)
        (xtr, ytr), (xte, yte) = features(model, tr), features(model, te)
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(xtr), ytr)
        acc = 100 * (clf.predict(scaler.transform(xte)) == yte).mean()
        chance = 100 * np.bincount(yte).max() / len(yte)
        print(f"| {name} | {group} | {tr.num_classes} | {chance:.1f} | {acc:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
