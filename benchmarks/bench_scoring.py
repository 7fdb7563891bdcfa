"""Scoring speed and memory against plain training steps on the same samples, one run.

Measured, per model (timm ViT-S/16 random init and EfficientNet-Lite0 with its real weights,
both at 112 px):
  * time(sensitivity scoring of N samples) / time(plain forward+backward of the same N samples,
    same batches, every parameter requiring grad, ``loss.backward()``);
  * time(GPS scoring of N images, views made from raw PIL images inside the scorer) /
    time(plain forward+backward of the 2N views, same batch composition);
  * peak RSS of scoring vs. peak RSS of fine-tuning (forward, backward, AdamW step) on the
    same samples in the same batches, plus one float32 copy of the parameters. Each peak is
    ``VmHWM`` of a fresh child process that imports the same modules, builds the model and
    makes *all* the data (so only the run differs), then runs the thing once. Fine-tuning
    over N samples takes N/batch steps; its first step is reported too: it is lighter than
    every later one because AdamW creates its two state tensors per parameter lazily, after
    the first backward, so only later steps hold them during forward and backward.
Timings are CPU seconds (``time.process_time``) of one process with one torch thread: on a
machine shared with other jobs wall time measures the neighbours, CPU time measures the work.
Scorer and baseline alternate and the minimum of ``--repeats`` runs of each is kept.

    .venv/bin/python benchmarks/bench_scoring.py [--samples 64] [--repeats 3] [--out benchmarks/results/scoring.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMG = 112
BATCH = 32
MODELS = {"vit_small_patch16_224": "ViT-S/16 (random init, 112 px)",
          "efficientnet_lite0": "EfficientNet-Lite0 (real weights, 112 px)"}


def build(name: str):
    from sensitune.models import create_backbone

    torch.manual_seed(0)
    if name.startswith("vit"):
        return create_backbone(name, 10, "none", img_size=IMG)
    return create_backbone(name, 10, "auto", img_size=IMG)


class RawImages(Dataset):
    """PIL images (what GPS augments) with labels; content is noise, timing does not care."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.images = [Image.fromarray((torch.rand(128, 128, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
        self.labels = [i % 10 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def tensors(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.arange(n) % 10)


def plain_fwd_bwd(model, data: TensorDataset, batch: int, step=None, bn_eval: bool = False) -> None:
    """The baseline: every parameter requires grad, zero_grad, CE, backward (+ optional optimizer step).

    Batches come from a DataLoader, as in a training loop (and as the scorers read them).
    """
    model.train()
    if bn_eval:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.eval()
    for x, y in DataLoader(data, batch_size=batch):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if step is not None:
            step()
    model.zero_grad(set_to_none=True)


def sens(model, data, n):
    from sensitune.scoring import score

    return score(model, data, "sensitivity", batch_size=BATCH, samples=n)


def gps(model, raw, n):
    from sensitune.scoring import score

    return score(model, raw, "gps", batch_size=BATCH, samples=n)


def timed(fn) -> float:
    """CPU seconds of this process (one torch thread): robust to other jobs sharing the machine."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def peak_rss_mib() -> float:
    """VmHWM: the peak resident set of this process image (reset by exec, unlike ru_maxrss,
    which a child inherits from the parent it was forked from)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_ratios(name: str, n: int, repeats: int) -> dict:
    model = build(name)
    data, views, raw = tensors(n), tensors(2 * n, seed=1), RawImages(n)
    sens(model, tensors(BATCH), BATCH)  # warm-up (allocator, kernels)
    plain_fwd_bwd(model, tensors(BATCH), BATCH)
    out = {"sens": [], "plain_n": [], "gps": [], "plain_2n": [], "views": []}
    for _ in range(repeats):
        out["views"].append(timed(lambda: make_views(model, raw, n)))
        out["sens"].append(timed(lambda: sens(model, data, n)))
        out["plain_n"].append(timed(lambda: plain_fwd_bwd(model, data, BATCH)))
        out["gps"].append(timed(lambda: gps(model, raw, n)))
        out["plain_2n"].append(timed(lambda: plain_fwd_bwd(model, views, 2 * BATCH)))
    best = {k: min(v) for k, v in out.items()}
    return {**best, "all": out, "sens_ratio": best["sens"] / best["plain_n"],
            "gps_ratio": best["gps"] / best["plain_2n"],
            "gps_ratio_without_views": (best["gps"] - best["views"]) / best["plain_2n"]}


def make_views(model, raw, n) -> None:
    """Only the GPS view generation (two augmented views of each of n PIL images)."""
    from sensitune.scoring.gradient import TwoViews, _default_views

    views = TwoViews(raw, _default_views(model, raw))
    for i in range(n):
        views[i]


def memory_worker(name: str, what: str, n: int) -> dict:
    """Run in a fresh process: one measurement, peak RSS in MiB."""
    import torchvision.transforms  # noqa: F401  same imports in every worker: only the run differs
    import tqdm.auto  # noqa: F401

    import sensitune.scoring  # noqa: F401

    torch.set_num_threads(1)
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    data, views, raw = tensors(n), tensors(2 * n, seed=1), RawImages(n)  # the same data in every worker
    peaks: list[float] = []
    if what in ("finetune", "finetune_views"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.step()
            peaks.append(peak_rss_mib())

        if what == "finetune":
            plain_fwd_bwd(model, data, BATCH, step=step)
        else:
            plain_fwd_bwd(model, views, 2 * BATCH, step=step)
    elif what == "plain_bneval":  # scoring's BN mode, no optimizer
        plain_fwd_bwd(model, data, BATCH, bn_eval=True)
    elif what == "plain_bneval_views":
        plain_fwd_bwd(model, views, 2 * BATCH, bn_eval=True)
    elif what == "sensitivity":
        sens(model, data, n)
    elif what == "gps":
        gps(model, raw, n)
    peak = peak_rss_mib()
    return {"peak_mib": peak, "first_step_mib": peaks[0] if peaks else None, "param_mib": params * 4 / 2**20,
            "params": params}


def run_memory(name: str, what: str, n: int) -> dict:
    """Minimum over 3 fresh processes (allocator noise is tens of MiB from run to run)."""
    runs = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", name, what, "--samples", str(n)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["peak_mib"])
    return {**best, "runs": [round(r["peak_mib"], 1) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out")
    ap.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "WHAT"))
    args = ap.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.samples)))
        return
    torch.set_num_threads(1)
    args.load = [os.getloadavg()[0]]
    rows = []
    for name in args.models:
        t = time_ratios(name, args.samples, args.repeats)
        mem = {w: run_memory(name, w, args.samples)
               for w in ("finetune", "finetune_views", "plain_bneval", "plain_bneval_views", "sensitivity", "gps")}
        rows.append((name, t, mem))
        print(json.dumps({"model": name, "time": t, "memory": mem}), flush=True)
        args.load.append(os.getloadavg()[0])
    if args.out:
        write_markdown(args, rows)


def write_markdown(args, rows) -> None:
    import datetime
    import platform

    n = args.samples
    lines = [
        "# Scoring: speed and memory",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}. The machine was shared with "
        f"other jobs (1-minute load average {min(args.load):.1f}-{max(args.load):.1f} on 2 cores, sampled at the start "
        "and after each model), so times are CPU seconds of one process with one torch thread "
        f"(`time.process_time`), minimum of {args.repeats} alternating runs.",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scoring.py --samples {n} --repeats {args.repeats} "
        f"--out benchmarks/results/scoring.md`",
        "",
        f"N = {n} samples, batches of {BATCH}, {IMG} px. Sensitivity baseline: plain forward+backward of the same "
        f"N samples (same batches, all parameters requiring grad). GPS baseline: plain forward+backward of 2N view "
        f"tensors in batches of {2 * BATCH}; the GPS time includes making the two augmented views from PIL images.",
        "",
        "| model | sensitivity CPU s | plain fwd+bwd N CPU s | ratio (≤ 1.10) | GPS CPU s | of which views | "
        "plain fwd+bwd 2N CPU s | ratio (≤ 1.10) | ratio without views |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t, _ in rows:
        lines.append(f"| {MODELS.get(name, name)} | {t['sens']:.2f} | {t['plain_n']:.2f} | **{t['sens_ratio']:.3f}** "
                     f"| {t['gps']:.2f} | {t['views']:.2f} | {t['plain_2n']:.2f} | **{t['gps_ratio']:.3f}** "
                     f"| {t['gps_ratio_without_views']:.3f} |")
    lines += [
        "",
        "Peak memory: `VmHWM` (peak resident set, /proc/self/status) of a fresh child process per cell; every one "
        "imports the same modules, builds the model and makes all the data (N tensors, 2N view tensors, N PIL images), "
        "so only the run differs; minimum of 3 processes. Fine-tuning = the same N samples (2N views) in the same "
        "batches through forward, backward and an AdamW step (BN in train mode, batches from a DataLoader), "
        f"{n // BATCH} steps; 'first step' is the peak after its first step only (AdamW has no state yet). "
        "Bound = fine-tuning peak + one float32 copy of the parameters. 'plain, BN eval' is forward+backward of the "
        "same batches with BatchNorm in eval mode (the mode scoring uses) and no optimizer.",
        "",
        "| model | params | batch | FT first step MiB | FT peak MiB | bound MiB | plain, BN eval | scoring peak MiB "
        "| within bound | within first step + params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _, m in rows:
        for label, ft, plain, scorer in ((f"{BATCH} (sensitivity)", "finetune", "plain_bneval", "sensitivity"),
                                         (f"{2 * BATCH} views (GPS)", "finetune_views", "plain_bneval_views", "gps")):
            peak, extra = m[scorer]["peak_mib"], m[ft]["param_mib"]
            cells = []
            for bound in (m[ft]["peak_mib"] + extra, m[ft]["first_step_mib"] + extra):
                cells.append("yes, %.0f MiB under" % (bound - peak) if peak <= bound else "NO, +%.0f MiB" % (peak - bound))
            lines.append(f"| {MODELS.get(name, name)} | {m[ft]['params']:,} | {label} | {m[ft]['first_step_mib']:.0f} "
                         f"| {m[ft]['peak_mib']:.0f} | {m[ft]['peak_mib'] + extra:.0f} | {m[plain]['peak_mib']:.0f} "
                         f"| {peak:.0f} | {cells[0]} | {cells[1]} |")
    lines.append("")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
