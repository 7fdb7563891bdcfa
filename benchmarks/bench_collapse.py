"""Why a rate counts as diverged: does the run collapse, and where in the network? (validation only)

For each task, bench column and rate, trains train800 -> val200 (``protocol: val``, seed 0, the
``make bench`` recipe: 64 px, 3 epochs, batch 32, warm-up 0.5, grad clip 1, 4 scoring batches)
and reports val accuracy, the training loss at the first batch and after each epoch, whether the
engine flags the run as diverged, and — on the first 64 validation images — the share of
pooled features that are exactly 0 and their spread across images. A collapsed run has every
pooled feature at 0: the head sees a constant, and the loss sits at the label entropy (ln C).
Finished runs are reused, so the script can be stopped and restarted.

    python benchmarks/bench_collapse.py --tasks shapes_dist,shapes_loc --out results/collapse
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from sensitune.commands.demo import RECIPE as BENCH_RECIPE
from sensitune.commands.demo import SIZES

#: (label, method, budget, centre lr, other settings): the ``make bench`` columns whose larger rate
#: was excluded, and LoRA, which kept it
COLUMNS = [
    ("spt-lora:budget=182272", "spt-lora", 182272, 1e-3, {}),
    ("lora", "lora", None, 1e-3, {}),
    ("gps", "gps", None, 5e-3, {}),
    ("full:head_lr=0.01", "full", None, 1e-4, {"head_lr": 0.01}),
    ("bi-lora:bits=32", "bi-lora", None, 1e-3, {"method_options": {"bits": 32}}),
    # the same SPT budget scored on matrices only: no BatchNorm vector trains (whole or sparse)
    ("spt-lora:budget=182272:score.kinds=[matrix]", "spt-lora", 182272, 1e-3, {"score_options": {"kinds": ["matrix"]}}),
    # the same plan family with batch statistics (the reference codes' BatchNorm): BN re-centres every batch
    ("spt-lora:budget=182272:norm_stats=batch", "spt-lora", 182272, 1e-3, {"norm_stats": "batch"}),
]
#: ``make bench``'s validation cells (``sensitune demo --bench``: its recipe, epochs and batch), seed 0
RECIPE = {**BENCH_RECIPE, **{k: SIZES["bench"][k] for k in ("epochs", "batch_size")},
          "protocol": "val", "progress": False, "seed": 0}


def pooled_features(run: Path, task: str, n: int = 64) -> torch.Tensor:
    """The head's input for the first ``n`` validation images of ``task`` under the trained model."""
    from sensitune.data import build_transform, open_task
    from sensitune.engine.pipeline import load_run_model
    from sensitune.models import data_config

    model, _ = load_run_model(run, device="cpu")
    model.eval()
    ds = open_task(task, "val200", transform=build_transform(data_config(model, img_size=64), img_size=64))
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--tasks", default="shapes_dist,shapes_loc")
    ap.add_argument("--factors", default="0.5,2", help="rates as factors of each column's centre lr")
    ap.add_argument("--columns", help="comma-separated labels of COLUMNS (default: all)")
    ap.add_argument("--out", default="results/collapse")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sensitune.engine.pipeline import train

    out = Path(args.out)
    print("| task | column | lr | val % | loss: first batch → epochs | diverged | pooled = 0 | pooled std |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        for label, method, budget, lr, extra in COLUMNS:
            if args.columns and label not in args.columns.split(","):
                continue
            for factor in map(float, args.factors.split(",")):
                run = out / task / label / f"lr{lr * factor:g}"
                results = run / "results.json"
                res = (json.loads(results.read_text()) if results.is_file() else
                       train(args.model, task, method, run, budget=budget, lr=lr * factor, overwrite=True,
                             **RECIPE, **extra))
                losses = [float(r["train_loss"]) for r in csv.DictReader(open(run / "metrics.csv"))]
                f = pooled_features(run, task)
                print(f"| {task} | {label} | {lr * factor:g} | {res['accuracy']:.1f} | "
                      f"{res['train_loss_start']:.3f} → {' → '.join(f'{v:.3f}' for v in losses)} | "
                      f"{'yes' if res.get('diverged') else 'no'} | {(f.abs() < 1e-6).float().mean():.2f} | "
                      f"{f.std(0).mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
