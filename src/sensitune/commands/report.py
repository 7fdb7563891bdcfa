"""``sensitune report``: figures and tables from a saved artefact.

For now the artefact is a scores file (``.safetensors`` written by ``sensitune score``): a heat
map of where the globally top-k scores sit (rows = blocks, columns = kind of tensor) as a PNG,
and the same numbers as a table. ``run`` dispatches on what the path is, so other artefacts
(a results folder) can be added as further branches.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="heat map + table of where the top-k scores sit (from a scores .safetensors file)",
        description="For a scores file: take the global top-BUDGET entries and count them per block and kind "
                    "of tensor (q/k/v/proj/fc1/fc2/norms/biases, conv_pw/conv_dw/conv_pwl ...); print the "
                    "table and write a PNG heat map.")
    p.add_argument("path", metavar="PATH", help="a scores .safetensors file, or a `sensitune bench` results folder "
                   "(tables + plots: report.md, *.csv, *.png)")
    p.add_argument("--budget", default="0.4M",
                   help="entries to place: 400000, 0.4M, 400k, or 0.5%% of the backbone (default 0.4M)")
    p.add_argument("--png", metavar="FILE", help="heat map to write (default: PATH with _heatmap.png)")
    p.add_argument("--title", default="", help="heat map title")
    p.add_argument("--ci", type=float, default=0.95, metavar="LEVEL",
                   help="bench folders: confidence level of the intervals over seeds (default 0.95)")
    p.add_argument("--reference", default="lora", metavar="METHOD",
                   help="bench folders: the column others are compared with seed by seed (default lora)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file() and path.suffix == ".safetensors":
        return report_scores(path, args.budget, args.png, args.title)
    if path.is_dir() and (path / "bench.json").is_file():  # a `sensitune bench` results folder
        from sensitune.bench.report import write_report

        report = write_report(path, ci=args.ci, reference=args.reference)
        print(report["markdown"])
        print(f"report -> {path / 'report.md'} ({len(report['files'])} files)")
        return 0
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise ValueError(f"cannot report on {path}: expected a scores .safetensors file or a bench results folder")


def report_scores(path: Path, budget: str, png: str | None, title: str = "") -> int:
    from sensitune.planning.budget import parse_budget
    from sensitune.scoring import ScoreMap
    from sensitune.scoring.heatmap import placement, plot

    scores = ScoreMap.load(path)
    backbone = int(scores.meta.get("backbone_params") or scores.numel)
    k = parse_budget(budget, backbone, available=scores.numel)
    p = placement(scores, k, scores.meta.get("tensors"))
    out = Path(png) if png else path.with_name(path.stem + "_heatmap.png")
    meta = scores.meta
    head = f"{meta.get('method', '?')} scores"
    if meta.get("model"):
        head += f" of {meta['model'].get('name')}"
    if meta.get("task"):
        head += f" on {meta['task'].get('name')}/{meta['task'].get('split')}"
    print(f"{head}: top {k:,} of {p.total:,} scored entries ({100 * k / p.total:.2f}%)")
    print(p.table())
    plot(p, out, title or f"{head}\ntop {k:,} of {p.total:,} entries")
    print(f"heat map -> {out}")
    return 0
