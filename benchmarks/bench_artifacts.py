"""Task deltas: bytes on disk vs the theoretical minimum, save/load time, and task switching.

Usage: python benchmarks/bench_artifacts.py [--models vit_small_patch16_224,vit_base_patch16_224]

For each model (random init, 224 px; shapes are what matter) and each method, a plan is made
(scores are random for the scored methods: sizes depend only on the budget), applied, its
trainable tensors moved, and the delta saved. Reported per delta: bytes on disk, the minimum
of its parts, save and load time. Then a TaskBank holds every task and we time ``activate``
(median over rounds of switching through all tasks) against loading the delta from disk and
against deep-copying the base model — all measured side by side in one run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from sensitune.artifacts import TaskBank, load_delta, read_delta, save_delta
from sensitune.planning import make_plan
from sensitune.tuners import apply_plan

METHODS = [("linear", None, {}), ("bitfit", None, {}), ("lora", None, {}), ("bi-lora", None, {}),
           ("bi-adaptformer", None, {}), ("gps", None, {"K": 1}), ("spt-lora", "0.4M", {})]


def base(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=100, pretrained=False).eval()


def tuned(name: str, method: str, budget, options) -> torch.nn.Module:
    model = base(name)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    plan = make_plan(model, scores, method, budget=budget, **options)
    apply_plan(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return model


def median_time(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="bench_artifacts_"))
    for name in args.models.split(","):
        n_params = sum(p.numel() for p in base(name).parameters())
        print(f"\n## {name} ({n_params / 1e6:.1f}M parameters, 100 classes)\n")
        print("| method | trainable | on disk B | minimum B | disk/min | tensors B | json B | save s | load s |")
        print("|---|---|---|---|---|---|---|---|---|")
        folders = {}
        for method, budget, options in METHODS:
            model = tuned(name, method, budget, options)
            out = root / name / method
            save_s = median_time(lambda: save_delta(model, out), repeat=3)
            bases = [base(name) for _ in range(3)]
            load_s = median_time(lambda: load_delta(bases.pop(), out), repeat=3)
            st = read_delta(out).storage
            trainable = read_delta(out).meta["trainable"]["with_head"]
            print(f"| {method} | {trainable:,} | {st['on_disk_bytes']:,} | {st['minimum_bytes']:,} | "
                  f"{st['on_disk_bytes'] / st['minimum_bytes']:.2f} | {st['tensor_bytes']:,} | {st['json_bytes']:,} | "
                  f"{save_s:.3f} | {load_s:.3f} |")
            folders[method] = out
        model = base(name)
        bank = TaskBank(model)
        for method, out in folders.items():
            bank.add(method, out)
        order = list(folders)
        switch = []
        for _ in range(args.rounds):
            for method in order:
                t = time.perf_counter()
                bank.activate(method)
                switch.append(time.perf_counter() - t)
        copy_s = median_time(lambda: __import__("copy").deepcopy(model), 3)
        bases = [base(name) for _ in range(3)]
        load_s = median_time(lambda: load_delta(bases.pop(), folders["lora"]), 3)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            fwd = median_time(lambda: bank.activate("lora")(x), 3)
        touched = {m: len(bank.touched(m)) for m in order}
        print(f"\nTaskBank over {len(order)} tasks: median switch {statistics.median(switch) * 1e6:.0f} µs "
              f"(max {max(switch) * 1e6:.0f} µs; modules swapped per task {touched}); "
              f"load_delta(lora) onto a fresh base {load_s * 1e3:.0f} ms; deepcopy of the base {copy_s * 1e3:.0f} ms; "
              f"one forward (1 image) {fwd * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
