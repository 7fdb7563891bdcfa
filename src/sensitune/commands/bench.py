"""``sensitune bench``: a suite × methods × seeds grid of train runs, then its report."""
from __future__ import annotations

import argparse
import shlex
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    from sensitune.bench.suites import SUITES
    from sensitune.methods import METHODS, describe

    p = subparsers.add_parser(
        "bench", help="run a suite x methods x seeds grid of train runs and write its report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Every (task, method, seed) cell is one `sensitune train` run in its own folder under --out;\n"
                    "finished cells are skipped when the command is run again. With --lr-grid the learning\n"
                    "rate is chosen on train800 -> val200 per (task, method), or per method with --select suite\n"
                    "(near-ties within --tie-tolerance points go to the smaller lr; a diverged run is never\n"
                    "chosen), then each seed trains on train800val200 and reports test; when the chosen lr\n"
                    "diverges there, every seed falls back to the next-ranked lr (marked † in the report).\n"
                    "A method may carry options scoped by stage: lora:plan.rank=4 (its planner's option),\n"
                    "gps:score.batches=8 (its scorer's), lora:train.drop_path=0.1 (a training setting for that\n"
                    "column only), spt-lora:budget=5% (its own budget). A bare name goes to the one stage that\n"
                    "has it (bi-lora:bits=32, lora:lr=0.01); one that is both a planner option and a training\n"
                    "setting (drop_path for lora) must be scoped.\n\nmethods:\n" + describe())
    p.add_argument("--suite", required=True, metavar="|".join(SUITES) + "|DIR",
                   help="a named suite, or a folder whose task folders form the suite (grouped by an optional "
                        "groups.txt: 'task group' per line)")
    p.add_argument("--data-root", metavar="DIR", help="folder with one folder per task (vtab1k, fgvc)")
    p.add_argument("--tasks", metavar="A,B", help="only these tasks of the suite")
    p.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                   help="backbone (default efficientnet_lite0 with its ImageNet weights)")
    p.add_argument("--methods", default=",".join(METHODS), metavar="A,B:key=v",
                   help="comma-separated methods (default: all)")
    p.add_argument("--budget", help="budget for the budgeted methods (e.g. 0.4M, 0.5%%); others take none")
    p.add_argument("--seeds", type=_ints, default=[0], metavar="0,1,2", help="seeds (mean ± std over them)")
    p.add_argument("--lr-grid", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], metavar="1e-3,1e-2",
                   help="learning rates to select from on val200, or factors of each column's own lr (x0.5,x1,x2)")
    p.add_argument("--tie-tolerance", type=float, default=1.0, metavar="POINTS",
                   help="val accuracies within this many points count as tied (default 1.0)")
    p.add_argument("--select", choices=("task", "suite"), default="task",
                   help="choose the lr per (task, method) or one per method from the mean over tasks (default task)")
    p.add_argument("--ci", type=float, metavar="LEVEL",
                   help="confidence level of the report's intervals over seeds (default 0.95; needs >= 2 seeds)")
    p.add_argument("--reference", default="lora", metavar="METHOD",
                   help="column every other is compared with seed by seed in the report (default lora)")
    p.add_argument("--out", required=True, metavar="DIR", help="results folder (created; reused to continue)")
    p.add_argument("--config", metavar="FILE", help="YAML settings for every cell, or a recipe: paper, mini")
    p.add_argument("--pretrained", metavar="auto|none|PATH")
    p.add_argument("--img-size", type=int, metavar="PX")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="[train.]KEY=VALUE",
                   help="any other training setting for every cell (planner and scorer options go per column: "
                        "--methods lora:plan.rank=4)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="(task, method) pairs run side by side, each cell its own process (default 1)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads per cell (default: torch's choice)")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again from scratch")
    p.add_argument("--in-process", action="store_true",
                   help="run cells in this process (faster start; peak memory then accumulates over cells)")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _key_value(text: str):
    """A grid-wide ``--set``: a training setting, bare or as ``train.KEY`` (recorded bare, so both
    spellings are the same bench)."""
    from sensitune.commands.train import _key_value as kv

    key, value = kv(text)
    scope, dot, name = key.partition(".")
    if not dot:
        return key, value
    if scope != "train":
        raise argparse.ArgumentTypeError(f"--set {text!r}: bench --set takes training settings for every cell "
                                         f"(KEY or train.KEY); give {scope} options per column, e.g. "
                                         f"--methods lora:plan.rank=4 or gps:score.batches=8")
    return name, value


def run(args: argparse.Namespace) -> int:
    from sensitune.bench import run_bench, write_report

    if args.ci is not None and len(args.seeds) < 2:
        raise ValueError(f"--ci {args.ci:g}: a confidence interval needs at least 2 seeds, got --seeds "
                         f"{','.join(map(str, args.seeds))}; add seeds (e.g. --seeds 0,1,2) or drop --ci")
    overrides = {k: getattr(args, k) for k in ("pretrained", "img_size", "epochs", "batch_size", "device")
                 if getattr(args, k) is not None}
    overrides.update(dict(args.set))
    manifest = run_bench(
        suite=args.suite, model=args.model, methods=args.methods, out=args.out, data_root=args.data_root,
        tasks=args.tasks.split(",") if args.tasks else None, budget=args.budget, seeds=args.seeds,
        lr_grid=args.lr_grid, tie_tolerance=args.tie_tolerance, select_scope=args.select, config=args.config,
        overrides=overrides,
        isolate=not args.in_process, jobs=args.jobs, threads=args.threads, retry_failed=args.retry_failed, progress=not args.no_progress,
        command="sensitune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None)
    failed = manifest.get("failed") or {}
    if not args.no_report:
        report = write_report(args.out, ci=args.ci or 0.95, reference=args.reference)
        print(report["markdown"])
        print(f"report -> {args.out}/report.md")
    if failed:
        print(f"{len(failed)} cell(s) failed; see {args.out}/logs/ (rerun with --retry-failed)", file=sys.stderr)
        return 1
    return 0
