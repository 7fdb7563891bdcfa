"""``sensitune eval --run runs/x --split test``: re-evaluate a trained run folder."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained run folder on a split",
                              description="Rebuild a run's model (backbone + plan + trained tensors) and report "
                                          "top-1, per-class accuracy and the confusion matrix (CSV + PNG in the run).")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder written by sensitune train")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding task folders (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sensitune.engine.pipeline import evaluate_run

    res = evaluate_run(args.run, args.split, device=args.device, batch_size=args.batch_size,
                       data_root=args.data_root, log=lambda s: None)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['task']} / {res['method']} on {res['split']}: top-1 {res['accuracy']:.2f}% "
          f"({res['num_samples']} images, loss {res['loss']:.4f})")
    for name, acc in res["per_class_accuracy"].items():
        print(f"  {name:<24} {'-' if acc is None else f'{acc:.1f}%'}")
    print(f"confusion matrix: {args.run}/eval_{args.split}_confusion.csv (.png)")
    return 0
