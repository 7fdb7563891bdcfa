"""Which ``norm_stats`` mode a method should default to, chosen on validation data (never test).

Trains ``--method`` on train800 and evaluates val200 (``protocol: val``) for each task, norm
mode and seed, with the demo's recipe otherwise (64 px, batch 16, warm-up, grad clip, zero head),
and prints val accuracy per task as mean ± standard deviation over seeds plus the paired
per-seed difference between the modes. Each run is a ``sensitune.train`` run folder under
``--out``; finished runs are reused, so the script can be stopped and restarted.

    python benchmarks/bench_norm_stats.py --method full --set head_lr=0.01 \
        --tasks digits,textile,shapes_count --seeds 0,1 --epochs 3 --out results/norm-stats
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--method", default="full")
    ap.add_argument("--modes", default="pretrained,batch")
    ap.add_argument("--tasks", default="digits,textile,shapes_count")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more TrainConfig settings")
    ap.add_argument("--out", default="results/norm-stats")
    args = ap.parse_args()

    from sensitune.engine.pipeline import train

    torch.set_num_threads(args.threads)
    extra = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    recipe = dict(img_size=args.img_size, epochs=args.epochs, batch_size=16, warmup_epochs=0.5, grad_clip=1.0,
                  score_batches=4, protocol="val", progress=False, **extra)
    modes, tasks = args.modes.split(","), args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    acc: dict[tuple[str, str], list[float]] = {}
    loss: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    for task in tasks:
        for seed in seeds:
            for mode in modes:
                run = Path(args.out) / task / f"{args.method}-{mode}" / f"seed{seed}"
                done = run / "results.json"
                if done.is_file():
                    res = json.loads(done.read_text())
                else:
                    res = train(args.model, task, args.method, run, seed=seed, norm_stats=mode,
                                overwrite=run.exists(), log=lambda s: None, **recipe)
                acc.setdefault((task, mode), []).append(res["accuracy"])
                loss.setdefault((task, mode), []).append(res["train_loss"])
                print(f"{task:>14} {mode:>10} seed {seed}: val200 {res['accuracy']:6.2f}%  "
                      f"train loss {res['train_loss']:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    print(f"\n{args.method}: val200 accuracy (%), mean ± sd over seeds {seeds}; train loss of the last epoch")
    print("| task | " + " | ".join(modes) + f" | {modes[0]} − {modes[1]} (paired, per seed) |")
    print("|---|" + "---|" * (len(modes) + 1))
    diffs_all = []
    for task in tasks:
        diffs = [a - b for a, b in zip(acc[(task, modes[0])], acc[(task, modes[1])])]
        diffs_all += diffs
        print(f"| {task} | " + " | ".join(f"{ms(acc[(task, m)])} (loss {statistics.mean(loss[(task, m)]):.2f})"
                                          for m in modes) + f" | {', '.join(f'{d:+.1f}' for d in diffs)} |")
    means = {m: statistics.mean(statistics.mean(acc[(t, m)]) for t in tasks) for m in modes}
    print("| mean over tasks | " + " | ".join(f"{means[m]:.1f}" for m in modes)
          + f" | {statistics.mean(diffs_all):+.1f} |")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
