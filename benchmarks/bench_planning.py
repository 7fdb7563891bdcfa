"""Time of SPT plan construction on a big score map: candidate floor (default) against one full sort per tensor.

The full-sort path is the same code with every entry a candidate (``CANDIDATES_PER_BUDGET = inf``),
i.e. the allocation before the candidate floor; both run in one process on the same scores and
must give the same plan (checked). Scores are random (uniform, or log-normal with --heavy), which
is the hard case for a floor: no tensor stands out, so the cut runs through all of them.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_planning.py --threads 1
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone

import timm
import torch

from sensitune.planning import make_plan
from sensitune.planning import spt as spt_module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--budget", default="0.4M")
    ap.add_argument("--method", default="spt-lora", choices=("spt-lora", "spt-adapter"))
    ap.add_argument("--heavy", action="store_true", help="log-normal scores instead of uniform")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-full", action="store_true", help="only the candidate-floor path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(0)
    scores = {n: (torch.randn(p.shape, generator=g).mul(2).exp() if args.heavy else torch.rand(p.shape, generator=g))
              for n, p in model.named_parameters()}
    n = sum(s.numel() for s in scores.values())
    print(f"{datetime.now(timezone.utc).isoformat(timespec='minutes')} {args.model}: {n:,} scores, {args.method} "
          f"{args.budget}, {torch.get_num_threads()} thread(s), {'log-normal' if args.heavy else 'uniform'}")
    plans = {}
    for label, share in (("candidate floor", spt_module.CANDIDATES_PER_BUDGET), ("full sort", math.inf)):
        if label == "full sort" and args.skip_full:
            continue
        spt_module.CANDIDATES_PER_BUDGET = share
        t0 = time.perf_counter()
        plan = make_plan(model, scores, args.method, args.budget)
        dt = time.perf_counter() - t0
        plans[label] = plan
        print(f"{label:>16}: {dt:7.2f} s  (trainable {plan.num_trainable(False):,}, {plan.stats['structured']} structured, "
              f"{plan.stats['sparse_entries']:,} entries, {plan.stats['whole_vectors']} whole vectors)")
    if len(plans) == 2:
        a, b = plans.values()
        same = (a.stats == b.stats and len(a.units) == len(b.units) and all(
            (u.target, u.mode, u.slice) == (v.target, v.mode, v.slice)
            and (u.indices is None) == (v.indices is None) and (u.indices is None or torch.equal(u.indices, v.indices))
            for u, v in zip(a.units, b.units)))
        print("identical plans:", same)
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
