"""Engine overheads, measured side by side in one process (2-core CPU friendly).

1. fit() vs a bare PyTorch loop (same model, data, AdamW, CE, steps): what the engine's
   bookkeeping costs (seeded per-item RNG, global-batch sampler, schedule, finite-loss check).
2. bf16 autocast vs fp32 on this device.
3. Checkpoint size and atomic write time for a LoRA plan vs full fine-tuning.

usage: python benchmarks/bench_engine.py [--model tf_efficientnet_lite0] [--img 64] [--batch 32]
                                         [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sensitune.engine.checkpoint import save_checkpoint, trainable_state
from sensitune.engine.config import build_config
from sensitune.engine.trainer import fit
from sensitune.models import create_backbone
from sensitune.planning import make_plan
from sensitune.tuners import apply_plan


def model_for(name: str, method: str, img: int) -> nn.Module:
    torch.manual_seed(0)
    m = create_backbone(name, 10, pretrained="none", img_size=img)
    apply_plan(m, make_plan(m, None, method))
    return m


def bare_loop(model: nn.Module, data: TensorDataset, batch: int, steps: int, lr: float) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    model.train()
    t = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t)


def engine(model: nn.Module, data: TensorDataset, batch: int, steps: int, precision: str = "fp32",
           deterministic: bool = True) -> float:
    cfg = build_config(overrides=dict(epochs=1, batch_size=batch, lr=1e-3, progress=False, precision=precision,
                                      warmup_epochs=0.5, deterministic=deterministic))
    r = fit(model, data, cfg, log=lambda s: None)
    return r.history[0]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.batch * a.steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, a.img, a.img, generator=g), torch.randint(0, 10, (n,), generator=g))

    print(f"# {a.model} at {a.img} px, batch {a.batch}, {a.steps} steps per measurement, "
          f"median of {a.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method | bare loop img/s | fit() img/s | fit / bare | fit, deterministic off | fit bf16 img/s | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for method in ("full", "lora"):
        bare, eng, nodet, bf16 = [], [], [], []
        for _ in range(a.repeats):  # interleaved, so load changes hit all three alike
            bare.append(bare_loop(model_for(a.model, method, a.img), data, a.batch, a.steps, 1e-3))
            eng.append(engine(model_for(a.model, method, a.img), data, a.batch, a.steps))
            nodet.append(engine(model_for(a.model, method, a.img), data, a.batch, a.steps, deterministic=False))
            bf16.append(engine(model_for(a.model, method, a.img), data, a.batch, a.steps, "bf16"))
        b, e, d, h = (statistics.median(v) for v in (bare, eng, nodet, bf16))
        print(f"| {method} | {b:.1f} | {e:.1f} | {e / b:.3f} | {d:.1f} | {h:.1f} | {h / e:.3f} |")

    print("\n| method | trainable params | checkpoint MB | atomic save ms (median) |")
    print("|---|---|---|---|")
    for method in ("full", "lora"):
        m = model_for(a.model, method, a.img)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
        loss = nn.functional.cross_entropy(m(data.tensors[0][:4]), data.tensors[1][:4])
        loss.backward()
        opt.step()  # optimizer state exists
        times = []
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "last.pt"
            for _ in range(5):
                t = time.perf_counter()
                save_checkpoint(path, model=trainable_state(m), optimizer=opt.state_dict())
                times.append(1000 * (time.perf_counter() - t))
            size = path.stat().st_size / 2**20
        k = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"| {method} | {k:,} | {size:.2f} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
