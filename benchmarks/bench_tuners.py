"""Training-step cost of the tuners, side by side in one process (time) and one process each (memory).

Configurations (same model, batch, inputs; AdamW lr 1e-3, wd 1e-4 except the GPS reference):
  full        every parameter trains
  floor       every parameter frozen, the input requires grad: only activation gradients
  lora        ours, rank 8, scale 1, on every Linear (qkv, proj, fc1, fc2) / pointwise conv, + head
  peft-lora   Hugging Face PEFT LoRA on the same modules, rank 8, alpha 8 (scale 1), + head
  spt-lora    SPT-LoRA at --budget (scores: squared gradients of one batch), + head; dropout and
              drop-path 0 like the two LoRA rows, so the row measures the tuner machinery
  spt-lora-drop  the same plan with SPT's recipe: dropout 0.1 on x, drop-path 0.1 on ΔY
  gps         GPS K=1 (sparse values + biases + head), ours
  gps-ref     the GPS reference approach: every weight trainable, dense gradients multiplied by the
              selection mask before an Adam step (wd 0), optimizer state for every weight
Step = forward + CE loss + backward + optimizer step + zero_grad. Times are medians over
--steps rounds after --warmup rounds; every round runs the configurations in a rotated order.
Each step is timed twice: wall clock, and the CPU time of the stepping thread ("cpu s"), which
at --threads 1 is the robust figure on a shared machine (a descheduled step does not count).
Peak memory: each configuration again in its own subprocess (--memory), as the growth of the
process's peak RSS over its RSS before the first step, plus that peak itself.

Run:  .venv/bin/python benchmarks/bench_tuners.py --models vit effnet --steps 8 --memory
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import timm
import torch
import torch.nn.functional as F

from sensitune.planning import make_plan
from sensitune.tuners import apply_plan, trainable_parameters

CONFIGS = ("full", "floor", "lora", "peft-lora", "spt-lora", "spt-lora-drop", "gps", "gps-ref")
MODELS = {"vit": ("vit_small_patch16_224", {"img_size": 112}), "effnet": ("tf_efficientnet_lite0", {})}


def _base(model_key: str, num_classes: int = 10) -> torch.nn.Module:
    name, kw = MODELS[model_key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def _scores(model, x, y):
    model.train()
    F.cross_entropy(model(x), y).backward()
    scores = {n: p.grad.detach() ** 2 for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return scores


def _adamw(named, lr=1e-3, wd=1e-4):
    decay = [p for n, p, role in named if p.dim() > 1 and role not in ("sparse",)]
    no_decay = [p for n, p, role in named if not (p.dim() > 1 and role not in ("sparse",))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


class Config:
    """A model, its optimizer (or None) and what one training step does."""

    def __init__(self, name, model, optimizer, input_grad=False, masks=None, trainable=0):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.input_grad, self.masks, self.trainable = input_grad, masks or {}, trainable
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU time of the stepping thread: robust to a shared machine at 1 thread

    def step(self, x, y, autocast: torch.dtype | None = None, sync: bool = True):
        """One training step; the forward under ``autocast`` (e.g. torch.bfloat16) when given.

        Returns the loss as a float, or with ``sync=False`` as a tensor (no host-device sync, so
        a GPU keeps queueing steps; benchmarks/bench_device.py times those with CUDA events).
        """
        if self.input_grad:
            x = x.detach().clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        for p, m in self.masks.items():  # GPS reference: dense gradient, zeroed outside the selection
            p.grad.mul_(m)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) if sync else loss.detach()

    def to(self, device: torch.device) -> "Config":
        """Move the model (the optimizer's parameters move with it; its state is created lazily) and masks."""
        self.model.to(device)
        self.masks = {p: m.to(device) for p, m in self.masks.items()}
        return self

    def optimizer_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def build(name: str, base, scores, budget: str) -> Config:
    model = copy.deepcopy(base)
    model.train()
    if name == "full":
        named = [(n, p, "full") for n, p in model.named_parameters()]
        return Config(name, model, _adamw(named), trainable=sum(p.numel() for p in model.parameters()))
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return Config(name, model, None, input_grad=True)
    if name == "peft-lora":
        from peft import LoraConfig, get_peft_model

        ours = make_plan(model, None, "lora", rank=8)
        targets = sorted({u.module for u in ours.units if u.mode == "lora"})
        head = ours.head[0].rsplit(".", 1)[0]
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
        for n, p in model.named_parameters():
            if n.startswith(head + "."):
                p.requires_grad_(True)
        named = [(n, p, "lora") for n, p in peft_model.named_parameters() if p.requires_grad]
        return Config(name, peft_model, _adamw(named), trainable=sum(p.numel() for _, p, _ in named))
    if name == "gps-ref":
        plan = make_plan(model, scores, "gps", K=1)
        masks = {}
        params = dict(model.named_parameters())
        for p in params.values():
            masks[p] = torch.zeros_like(p)
        for u in plan.units:
            m = masks[params[u.target]]
            if u.mode == "sparse":
                m.view(-1)[u.indices] = 1.0
            else:
                m.fill_(1.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
        return Config(name, model, opt, masks=masks, trainable=plan.num_trainable(True))
    method, kw = {"lora": ("lora", {"rank": 8}),
                  "spt-lora": ("spt-lora", {"budget": budget, "dropout": 0.0, "drop_path": 0.0}),
                  "spt-lora-drop": ("spt-lora", {"budget": budget}),
                  "gps": ("gps", {"K": 1})}[name]
    budget_arg = kw.pop("budget", None)
    plan = make_plan(model, scores if method != "lora" else None, method, budget_arg, **kw)
    apply_plan(model, plan)
    return Config(name, model, _adamw(trainable_parameters(model)), trainable=plan.num_trainable(True))


def _inputs(batch, img, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img, img, generator=g), torch.randint(0, 10, (batch,), generator=g)


def time_all(model_key, steps, warmup, batch, img, budget, names):
    base = _base(model_key)
    x, y = _inputs(batch, img)
    scores = _scores(base, x, y)
    configs = [build(n, base, scores, budget) for n in names]
    for r in range(warmup + steps):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            t0, c0 = time.perf_counter(), time.thread_time()
            c.step(x, y)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if r >= warmup:
                c.times.append(dt)
                c.cpu_times.append(dc)
    return {c.name: {"median_s": statistics.median(c.times), "min_s": min(c.times),
                     "cpu_median_s": statistics.median(c.cpu_times),
                     "trainable": c.trainable, "optimizer_state_bytes": c.optimizer_bytes()} for c in configs}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_one(model_key, name, batch, img, budget, scores_file, steps=3):
    """Run in a fresh process: peak RSS growth over the RSS before the first step.

    The scores come from a file written by the parent, so no dense backward pass (which would
    set the process's peak RSS) happens here before the measured steps.
    """
    from safetensors.torch import load_file

    base = _base(model_key)
    x, y = _inputs(batch, img)
    scores = load_file(scores_file)
    c = build(name, base, scores, budget)
    del base, scores
    import gc

    gc.collect()
    before = _rss_mb()
    # ru_maxrss cannot be reset; the peak so far (model build, scoring pass) is recorded and the
    # training peak is only visible if it is higher, which it is for every configuration here
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(steps):
        c.step(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_before_mb": before, "peak_mb": peak, "peak_growth_mb": peak - before,
            "peak_before_steps_mb": peak_before}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit", "effnet"], choices=sorted(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--budget", default="0.4M", help="SPT-LoRA budget (head excluded)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory, one subprocess per config")
    ap.add_argument("--no-timing", action="store_true", help="only the memory measurement")
    ap.add_argument("--memory-of", nargs=3, metavar=("MODEL", "CONFIG", "SCORES"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine: oversubscribed OpenMP is ~10x slower)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory_one(*args.memory_of[:2], args.batch, args.img, args.budget, args.memory_of[2])))
        return 0
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "machine": platform.processor() or
               platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "batch": args.batch, "img": args.img, "budget": args.budget, "models": {}}
    for mk in args.models:
        res = ({n: {"median_s": float("nan"), "trainable": 0, "optimizer_state_bytes": 0} for n in args.configs}
               if args.no_timing else time_all(mk, args.steps, args.warmup, args.batch, args.img, args.budget, args.configs))
        if args.memory:
            import tempfile

            from safetensors.torch import save_file

            base = _base(mk)
            scores_file = tempfile.mkstemp(suffix=".safetensors")[1]
            save_file({k: v.contiguous() for k, v in _scores(base, *_inputs(args.batch, args.img)).items()}, scores_file)
            del base
            for name in args.configs:
                out = subprocess.run([sys.executable, __file__, "--memory-of", mk, name, scores_file, "--batch", str(args.batch),
                                      "--img", str(args.img), "--budget", args.budget, "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                res[name].update(json.loads(out.stdout.strip().splitlines()[-1]))
        results["models"][mk] = res
        _print(mk, res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _print(mk, res):
    ref = {k: res[k]["median_s"] for k in res}
    print(f"\n{MODELS[mk][0]}")
    cpu = {k: res[k].get("cpu_median_s", float("nan")) for k in res}
    print(f"{'config':<14}{'step s':>9}{'/lora':>7}{'/floor':>8}{'/full':>7}{'cpu s':>8}{'/lora':>7}{'/floor':>8}{'/full':>7}"
          f"{'trainable':>12}{'opt MB':>9}{'peak+ MB':>10}")
    for k, r in res.items():
        rel = lambda t, base: f"{t[k] / t[base]:.2f}" if base in t else "-"  # noqa: E731
        print(f"{k:<14}{r['median_s']:>9.3f}{rel(ref, 'lora'):>7}{rel(ref, 'floor'):>8}{rel(ref, 'full'):>7}"
              f"{cpu[k]:>8.3f}{rel(cpu, 'lora'):>7}{rel(cpu, 'floor'):>8}{rel(cpu, 'full'):>7}{r['trainable']:>12,}"
              f"{r['optimizer_state_bytes'] / 2**20:>9.2f}{r.get('peak_growth_mb', float('nan')):>10.0f}")


if __name__ == "__main__":
    sys.exit(main())
