"""Child process for the resume and data-parallel tests: trains the tiny task and saves the result.

usage: python train_child.py OUT [--slow SECONDS] [--batch B] [--epochs E] [--checkpoint-every N]
Runs under torchrun too (then only rank 0 writes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import TinyTask, freeze_first_block, tiny_vit  # noqa: E402

from safetensors.torch import save_file  # noqa: E402
from sensitune.engine.config import build_config  # noqa: E402
from sensitune.engine.trainer import fit  # noqa: E402


class Slow(TinyTask):
    def __init__(self, delay: float, **kw):
        super().__init__(**kw)
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


def main(argv: list[str] | None = None) -> None:
    """Also called in-process by the tests (same code path, one thread as in the child)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--checkpoint-every", type=int, default=1)
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--augment", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_vit(drop_path=a.drop_path)
    freeze_first_block(model)
    cfg = build_config(overrides=dict(epochs=a.epochs, batch_size=a.batch, lr=1e-3, warmup_epochs=1,
                                      checkpoint_every=a.checkpoint_every, progress=False, weight_decay=0.05))
    r = fit(model, Slow(a.slow, n=a.samples, augment=a.augment), cfg, out_dir=a.out, resume=True, log=lambda s: None)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(Path(a.out) / "final.safetensors"))
        (Path(a.out) / "history.json").write_text(json.dumps({"history": r.history, "resumed_from": r.resumed_from}))


if __name__ == "__main__":
    main()
