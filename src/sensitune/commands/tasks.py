"""``sensitune tasks [--data-root DIR] [--build] [--json]``: built-in and found tasks with sizes."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("tasks", help="list built-in tasks and task folders found under --data-root",
                              description="List the built-in mini suite and every task folder (VTAB-1k lists, "
                                          "FGVC JSON or class folders) directly under --data-root, with class "
                                          "counts and split sizes.")
    p.add_argument("--data-root", metavar="DIR", help="folder holding one task folder per task")
    p.add_argument("--build", action="store_true", help="build the built-in tasks into the cache now")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=run)


def _fmt_sizes(sizes: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _one_line(error: str) -> str:
    """The first problem of a (possibly multi-problem) data error, and how many more there are."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else error
    more = len(lines) - 2
    return lines[1] + (f" (+{more} more: open the task for all)" if more else "")


def run(args: argparse.Namespace) -> int:
    from sensitune.data import list_tasks, materialize
    from sensitune.data.embedded import TASKS

    if args.build:
        for name in TASKS:
            materialize(name)
    rows = list_tasks(args.data_root)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("task", "kind", "group", "layout", "classes", "splits", "where")
    table = []
    for r in rows:
        where = r["where"] + ("" if not r["builtin"] or r.get("built") else "  (built on first use)")
        if "error" in r:
            table.append((r["name"], "built-in" if r["builtin"] else "found", r.get("group") or "-",
                          r.get("layout", "?"), "?", f"ERROR: {_one_line(r['error'])}", where))
        else:
            table.append((r["name"], "built-in" if r["builtin"] else "found", r.get("group") or "-", r["layout"], str(r["classes"]), _fmt_sizes(r["sizes"]), where))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if args.data_root is not None and not any(not r["builtin"] for r in rows):
        print(f"(no task folders found under {args.data_root})")
    return 0
