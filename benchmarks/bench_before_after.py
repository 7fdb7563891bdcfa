"""Did a change slow the tuners down? The training-step benchmark on two versions of the library, interleaved.

Extracts ``src/`` of ``--before`` (a git revision) into a temporary folder and runs
``benchmarks/bench_tuners.py`` (this checkout's script, so only the library differs) alternately
on that tree and on this checkout's ``src/``, for ``--rounds`` rounds in ABAB / BABA order. Each
run is its own process. Reported per model and configuration:

* the median over rounds of each version's median step CPU time;
* the median over rounds of the paired ratio after ÷ before, taken within a round, so slow
  phases of a shared machine cancel;
* the same ratio with each run's times divided by its own ``floor`` row (a frozen model: no
  tuner code runs), which also cancels a slow phase that lasts a whole run. ``floor`` and
  ``peft-lora`` run no sensitune code, so their plain ratios show the noise level.

Run at ``--threads 1`` on a shared machine: the CPU time of the stepping thread does not count the
time it spends descheduled.

    python benchmarks/bench_before_after.py --before cc56adf --rounds 3 -- --models vit effnet --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract_src(rev: str, into: Path) -> Path:
    """``src/`` of ``rev`` under ``into``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def env_for(src: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process that imports sensitune from ``src`` (checked: an
    installed copy earlier on the path would silently time the wrong version)."""
    env = {**os.environ, "PYTHONPATH": str(src), **extra}
    check = subprocess.run([sys.executable, "-c", "import sensitune; print(sensitune.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not check.startswith(str(src)):
        raise RuntimeError(f"PYTHONPATH={src} imported sensitune from {check}")
    return env


def run_once(src: Path, bench_args: list[str]) -> dict:
    """One bench_tuners.py run with ``src`` first on the path; its JSON results."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = env_for(src)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tuners.py"), *bench_args, "--json", out.name],
                       env=env, check=True, capture_output=True, text=True)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision of the 'before' library")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="also write every run's raw results")
    ap.add_argument("bench_args", nargs="*", help="arguments for bench_tuners.py (after --)")
    args = ap.parse_args()
    bench_args = args.bench_args or ["--models", "vit", "effnet", "--steps", "6"]
    if "--threads" not in bench_args:
        bench_args += ["--threads", "1"]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"before": extract_src(args.before, Path(tmp)), "after": ROOT / "src"}
        for r in range(args.rounds):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[version].append(run_once(sources[version], bench_args))
                print(f"round {r + 1}/{args.rounds}: {version} done", file=sys.stderr, flush=True)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    print(f"before = {args.before}, after = {rev} (+ uncommitted changes, if any); {args.rounds} rounds; "
          f"bench_tuners.py {' '.join(bench_args)}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print("\n| model | config | before cpu s | after cpu s | after ÷ before (paired median) | range over rounds "
          "| ÷ floor, after ÷ before |")
    print("|---|---|---|---|---|---|---|")
    for model in runs["after"][0]["models"]:
        for config in runs["after"][0]["models"][model]:
            b = [run["models"][model][config]["cpu_median_s"] for run in runs["before"]]
            a = [run["models"][model][config]["cpu_median_s"] for run in runs["after"]]
            ratios = [x / y for x, y in zip(a, b)]
            floor = "-"
            if "floor" in runs["after"][0]["models"][model]:
                fb = [run["models"][model]["floor"]["cpu_median_s"] for run in runs["before"]]
                fa = [run["models"][model]["floor"]["cpu_median_s"] for run in runs["after"]]
                floor = f"{statistics.median((x / p) / (y / q) for x, p, y, q in zip(a, fa, b, fb)):.3f}"
            print(f"| {model} | {config} | {statistics.median(b):.3f} | {statistics.median(a):.3f} | "
                  f"{statistics.median(ratios):.3f} | {min(ratios):.2f}–{max(ratios):.2f} | {floor} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
