"""Did a change slow a whole bench cell down? One ``sensitune train`` on two versions, interleaved.

``bench_before_after.py`` times the training step alone; this times everything a bench cell
does (load the pretrained backbone and the task, score, plan, train, evaluate, write the delta).
``src/`` of ``--before`` is extracted into a temporary folder; each run is its own process with
one torch thread, alternating the order every round (AB, BA, ...). The figure is the process's
CPU time (user + system, from ``getrusage``), which a shared machine inflates less than wall
time. Both versions must reach the same accuracy, or the comparison is refused.

    python benchmarks/bench_cell_before_after.py --before 7c82509 --rounds 4 --method spt-lora --lr 5e-4

``--after REV`` times another revision instead of this checkout: ``--after`` equal to ``--before``
is the A/A run that shows how far two runs of the same code drift apart on this machine, and two
revisions between the ends of a slowdown bisect it.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_before_after import ROOT, env_for, extract_src


def run_cell(src: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """CPU seconds and accuracy of one ``sensitune train`` with ``src`` first on the path."""
    cli = ["train", "--model", args.model, "--task", args.task, "--method", args.method, "--epochs", str(args.epochs),
           "--batch-size", "32", "--img-size", "64", "--protocol", "val", "--no-progress", "--overwrite",
           "--out", str(out)] + (["--lr", args.lr] if args.lr else [])
    code = f"import torch; torch.set_num_threads(1); from sensitune.cli import main; main({cli!r})"
    env = env_for(src, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, json.loads((out / "results.json").read_text())["accuracy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision of the 'before' library")
    ap.add_argument("--after", default=None, help="git revision of the 'after' library (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--task", default="shapes_loc")
    ap.add_argument("--method", default="spt-lora")
    ap.add_argument("--lr", default=None, help="peak lr (default: the method's)")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cpu: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"before": extract_src(args.before, Path(tmp) / "before"),
                   "after": ROOT / "src" if args.after is None else extract_src(args.after, Path(tmp) / "after")}
        accuracy: dict[str, float] = {}
        for r in range(args.rounds):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                seconds, acc = run_cell(sources[version], Path(tmp) / f"run_{version}", args)
                cpu[version].append(seconds)
                accuracy.setdefault(version, acc)
                print(f"round {r + 1}/{args.rounds} {version}: {seconds:.1f} s CPU, accuracy {acc}", flush=True)
        if accuracy["before"] != accuracy["after"]:
            raise SystemExit(f"the versions differ in accuracy ({accuracy}): not the same work, no timing ratio")
    ratios = [a / b for a, b in zip(cpu["after"], cpu["before"])]
    print(f"{args.method} on {args.task}: before median {statistics.median(cpu['before']):.1f} s, after median "
          f"{statistics.median(cpu['after']):.1f} s; after / before paired median {statistics.median(ratios):.3f} "
          f"(per round {', '.join(f'{x:.3f}' for x in ratios)}; after slower in {sum(x > 1 for x in ratios)} of {len(ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
