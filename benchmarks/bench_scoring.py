"""Scoring speed and memory against plain training steps on the same samples, one run.

Measured, per model (timm ViT-S/16 random init and EfficientNet-Lite0 with its real weights,
both at 112 px):
  * time(sensitivity scoring of N samples) / time(plain forward+backward of the same N samples,
    same batches, every parameter requiring grad, ``loss.backward()``);
  * time(GPS scoring of N images, views made from raw PIL images inside the scorer) /
    time(plain forward+backward of the 2N views, same batch composition);
  * peak RSS of scoring vs. peak RSS of one full fine-tuning step (forward, backward, AdamW
    step) plus one float32 copy of the parameters. Each peak is ``VmHWM`` of a fresh
    child process that builds the model, makes the data and runs the thing once.
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
from torch.utils.data import Dataset, TensorDataset

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


def plain_fwd_bwd(model, data: TensorDataset, batch: int, step=None) -> None:
    """The baseline: every parameter requires grad, zero_grad, CE, backward (+ optional optimizer step)."""
    model.train()
    x, y = data.tensors
    for s in range(0, len(y), batch):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s:s + batch]), y[s:s + batch]).backward()
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


def bn_eval(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()


def memory_worker(name: str, what: str, n: int) -> dict:
    """Run in a fresh process: one measurement, peak RSS in MiB."""
    import torchvision.transforms  # noqa: F401  same imports in every worker: only the run differs
    import tqdm.auto  # noqa: F401

    import sensitune.scoring  # noqa: F401

    torch.set_num_threads(1)
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    if what == "finetune":
        data = tensors(BATCH)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        plain_fwd_bwd(model, data, BATCH, step=opt.step)  # one full fine-tuning step
    elif what == "finetune_views":
        data = tensors(2 * BATCH)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        plain_fwd_bwd(model, data, 2 * BATCH, step=opt.step)
    elif what in ("plain_bneval", "plain_bneval_views"):  # scoring's BN mode, no optimizer
        batch = BATCH if what == "plain_bneval" else 2 * BATCH
        model.train()
        bn_eval(model)
        x, y = tensors(batch).tensors
        F.cross_entropy(model(x), y).backward()
    elif what == "sensitivity":
        sens(model, tensors(n), n)
    elif what == "gps":
        gps(model, RawImages(n), n)
    peak = peak_rss_mib()
    return {"peak_mib": peak, "param_mib": params * 4 / 2**20, "params": params}


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
    rows = []
    for name in args.models:
        t = time_ratios(name, args.samples, args.repeats)
        mem = {w: run_memory(name, w, args.samples)
               for w in ("finetune", "finetune_views", "plain_bneval", "plain_bneval_views", "sensitivity", "gps")}
        rows.append((name, t, mem))
        print(json.dumps({"model": name, "time": t, "memory": mem}), flush=True)
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
        "other jobs (load 6-8 on 2 cores), so times are CPU seconds of one process with one torch thread "
        f"(`time.process_time`), minimum of {args.repeats} alternating runs.",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scoring.py --samples {n} --repeats {args.repeats} "
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
        "Peak memory: `VmHWM` (peak resident set, /proc/self/status) of a fresh child process per cell "
        "(same imports, model build and data in every one; minimum of 3 processes). Bound = peak of one full "
        "fine-tuning step (forward, backward, AdamW step; BN in train mode) + one float32 copy of the parameters. "
        "'plain, BN eval' is a plain forward+backward with BatchNorm in eval mode, the mode scoring uses.",
        "",
        "| model | params | batch | FT step peak MiB | bound MiB | plain, BN eval | scoring peak MiB | within bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, m in rows:
        for label, ft, plain, scorer in ((f"{BATCH} (sensitivity)", "finetune", "plain_bneval", "sensitivity"),
                                         (f"{2 * BATCH} views (GPS)", "finetune_views", "plain_bneval_views", "gps")):
            bound = m[ft]["peak_mib"] + m[ft]["param_mib"]
            ok = m[scorer]["peak_mib"] <= bound
            lines.append(f"| {MODELS.get(name, name)} | {m[ft]['params']:,} | {label} | {m[ft]['peak_mib']:.0f} "
                         f"| {bound:.0f} | {m[plain]['peak_mib']:.0f} | {m[scorer]['peak_mib']:.0f} "
                         f"| {'yes' if ok else 'NO, +%.0f MiB' % (m[scorer]['peak_mib'] - bound)} |")
    lines.append("")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
