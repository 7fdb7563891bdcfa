"""Does this checkout compute what an earlier revision computed? Same training cells, two libraries, compared exactly.

A refactoring that claims "same numbers" should show it end to end: this script extracts
``src/`` of ``--before`` (a git revision), runs the same ``sensitune.engine.train`` cells with
that library and with this checkout's (one process per cell, ``PYTHONPATH``), and compares what
each run wrote: accuracy, trainable counts, the first-batch loss, every epoch's training loss
and accuracy (``metrics.csv``), and the per-image predictions. Timings are not compared.

Cells are written ``task/method[:key=value...]``, with the ``make bench`` recipe (64 px, 3
epochs, batch 32, warm-up 0.5, grad clip 1, 4 scoring batches, seed 0, ``protocol: val``).

    python benchmarks/same_results.py --before cc56adf \\
        shapes_loc/lora shapes_loc/spt-lora:budget=182272 digits/gps:lr=0.005 digits/bi-lora
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_before_after import ROOT, extract_src  # noqa: E402
from bench_collapse import RECIPE  # noqa: E402  (make bench's validation cells)

#: results.json keys that must be equal (not timings, paths or versions)
KEYS = ("accuracy", "eval_loss", "per_class_accuracy", "train_loss", "train_accuracy", "train_loss_start",
        "diverged", "steps", "trainable_params", "trainable_params_without_head", "plan_mix",
        "train_split", "eval_split")
#: keys a change of the storage format alters on purpose: printed when they differ, not compared
STORAGE = ("bytes_estimate", "delta_bytes_on_disk")
CELL = """
import json, sys, torch
torch.set_num_threads(1)
from sensitune.engine.pipeline import train
kw = json.loads(sys.argv[1])
train(kw.pop("model"), kw.pop("task"), kw.pop("method"), kw.pop("out"), budget=kw.pop("budget", None),
      log=lambda s: None, **kw)
"""


def parse_cell(text: str) -> dict:
    task, _, column = text.partition("/")
    name, *opts = column.split(":")
    kw = {"task": task, "method": name, **RECIPE}
    for opt in opts:
        key, _, value = opt.partition("=")
        kw[key] = yaml.safe_load(value)
    return kw


def run_cell(src: Path, kw: dict, out: Path) -> dict:
    """Train one cell with the library at ``src``; what it wrote, minus timings."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", CELL, json.dumps({**kw, "model": "efficientnet_lite0", "out": str(out)})],
                   env=env, check=True, capture_output=True, text=True)
    res = json.loads((out / "results.json").read_text())
    epochs = [{k: v for k, v in row.items() if k in ("epoch", "step", "lr", "train_loss", "train_acc", "start_loss")}
              for row in csv.DictReader(open(out / "metrics.csv"))]
    preds = sorted(out.glob("*predictions.csv"))
    return {"results": {k: res.get(k) for k in KEYS}, "storage": {k: res.get(k) for k in STORAGE}, "epochs": epochs,
            "predictions": preds[0].read_text() if preds else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("cells", nargs="+")
    args = ap.parse_args()
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        before_src = extract_src(args.before, Path(tmp))
        for i, text in enumerate(args.cells):
            kw = parse_cell(text)
            got = {v: run_cell(src, kw, Path(tmp) / f"{v}{i}")
                   for v, src in (("before", before_src), ("after", ROOT / "src"))}
            diff = [part for part in ("results", "epochs", "predictions") if got["before"][part] != got["after"][part]]
            same &= not diff
            r = got["after"]["results"]
            storage = [f"{k} {got['before']['storage'][k]:,} -> {got['after']['storage'][k]:,}" for k in STORAGE
                       if got["before"]["storage"][k] != got["after"]["storage"][k]]
            print(f"{text}: val {r['accuracy']}, loss {r['train_loss_start']} -> {r['train_loss']}: "
                  + ("identical (results, every epoch's loss and accuracy, every prediction)" if not diff
                     else f"DIFFERENT in {', '.join(diff)}: before {got['before']['results']} after {r}")
                  + (f"; storage: {'; '.join(storage)}" if storage else ""), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
