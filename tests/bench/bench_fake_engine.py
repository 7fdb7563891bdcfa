"""A stand-in for ``sensitune.engine.train`` with the same signature and run-folder contract.

It trains nothing: accuracy is a fixed function of (task, method, lr, seed), so the harness's
bookkeeping (skip, resume, select, aggregate) can be checked against hand-computed numbers.
Every call appends one JSON line to ``calls_file`` so tests can count what actually ran;
``hold`` seconds keep a cell running for tests that kill its bench.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# val accuracy by lr for the selection tests: 1e-3 and 1e-2 are within one point -> 1e-3 wins
VAL = {1e-3: 80.0, 1e-2: 80.5, 1e-1: 60.0}
BASE = {"linear": 50.0, "lora": 70.0, "bi-lora": 68.0}


def train(model, task, method, out, budget=None, config=None, *, resume=False, overwrite=False, log=print,
          calls_file, seed=0, protocol="val", lr=None, method_options=None, fail_on=(), hold=0.0,
          diverge_at=(), val_table=None, **overrides):
    out = Path(out)
    with open(calls_file, "a") as fh:
        fh.write(json.dumps({"task": Path(str(task)).name, "method": method, "out": str(out), "seed": seed,
                             "protocol": protocol, "lr": lr, "resume": resume, "overwrite": overwrite,
                             "options": method_options, "budget": budget, "pid": os.getpid(), "ppid": os.getppid(),
                             "overrides": overrides,
                             "threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None}) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    time.sleep(hold)  # a cell that is still running when the test kills its bench
    (out / "run.json").write_text(json.dumps({"method": method}))
    if method in fail_on or (lr is not None and lr >= 0.5):
        raise FloatingPointError("loss became NaN at epoch 1 (fake)")
    if protocol == "val":
        # val_table: {"task": {"lr": acc}} overrides VAL per task (suite-level selection tests)
        table = (val_table or {}).get(Path(str(task)).name)
        acc = float(table[f"{lr:g}"]) if table else VAL[lr]
        n_correct = round(acc * 2)  # 200 validation images, the first n_correct right
        (out / "eval_val200_predictions.csv").write_text(
            "index,label,prediction\n" + "".join(f"{i},0,{0 if i < n_correct else 1}\n" for i in range(200)))
    else:
        acc = BASE[method] + len(Path(str(task)).name) + seed + (100 * lr if lr else 0.0)
    diverged = [protocol, lr] in [list(d) for d in diverge_at] or [protocol, lr, seed] in [list(d) for d in diverge_at]
    results = {"status": "complete", "accuracy": acc, "diverged": diverged,
               "divergence": "training loss ended above where it started (fake)" if diverged else None, "lr": lr, "seed": seed, "eval_split": "val200" if protocol == "val" else "test",
               "trainable_params": 1000 * len(method), "trainable_params_without_head": 10 * len(method),
               "delta_bytes_on_disk": 4000 * len(method), "bytes_estimate_without_head": 40 * len(method),
               "train_seconds": 1.5, "peak_memory_mb": 100.0 + seed, "images_per_s": 50.0}
    (out / "results.json").write_text(json.dumps(results))
    log(f"fake {task} {method}: {acc}")
    return results
