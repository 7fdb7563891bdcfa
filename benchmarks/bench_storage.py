"""Bytes on disk per task for every method of the project, on ViT-B/16 and EfficientNet-Lite0.

Shapes come from timm models built on the meta device (no weights, no download) and the
project's tensor enumeration (`sensitune.models.tunable_tensors`); bytes from
`sensitune.tuners.quant` (spec §4: per quantised matrix ceil(numel·b/8) + 8 B for μ, σ;
everything float is 4 B per value; a sparse entry is a 4 B value plus its flat index in the
tensor, stored in the delta's narrowest index dtype: `sensitune.artifacts.format.index_dtype`). The head has 100 classes.

Shape conventions (the tuner module's, stated here so the numbers can be checked by hand):
- ViT: LoRA / Bi-LoRA on the q and v row slices of every fused qkv; adapter r=8 = sequential
  bottleneck with biases after each MLP (SPT's cost 2·r·d + r + d); AdaptFormer = parallel
  bottleneck on the MLP branch, r=64 with biases (float) or r ∈ {1, 32} without (Bi-).
- EfficientNet-Lite0 (no q/v): LoRA / Bi-LoRA on every pointwise 1×1 conv (groups 1, incl.
  conv_head); adapters per inverted-residual block from its input to its output channels.
- spt-lora / spt-adapter at a 0.4M budget: the mix observed in SPT's published ViT-B masks
  (~33k unstructured entries, the rest in r=8 modules, float32); sparse entries spread over
  matrices in proportion to their size. An estimate, not a plan.
- gps K=1: one entry per output row of every weight matrix (value + flat index), every bias
  vector, and the head.

    .venv/bin/python benchmarks/bench_storage.py
"""
from __future__ import annotations

import math
from collections import OrderedDict

import timm
import torch

from sensitune.artifacts.format import index_dtype
from sensitune.models import tunable_tensors
from sensitune.tuners.quant import head_nbytes, packed_nbytes, storage_nbytes

NUM_CLASSES = 100
SPT_BUDGET = 400_000
SPT_SPARSE = 33_000  # unstructured entries at 0.4M in SPT's published ViT-B/16 masks (spec)
# VTAB-1k class counts by group (benchmarks spec), to compare with the paper's averaged KiB
VTAB = {
    "natural": [100, 102, 47, 102, 37, 10, 397],
    "specialized": [2, 10, 45, 5],
    "structured": [8, 6, 6, 4, 16, 16, 18, 9],
}
PAPER_KIB = {  # spec §6, ViT-B/16, average over VTAB tasks
    ("bi-adaptformer r=32", False): 212.9, ("bi-adaptformer r=32", True): 76.6,
    ("bi-adaptformer r=1", True): 6.8, ("bi-lora r=32", False): 285.1,
    ("bi-lora r=32", True): 148.8, ("bi-lora r=1", True): 9.2,
}


def index_nbytes(numel: int) -> int:
    """Bytes of one flat index into a tensor of ``numel`` entries, in the delta's index dtype."""
    return index_dtype(numel).itemsize


class Shapes:
    """The shapes each method needs, read off one model."""

    def __init__(self, model: torch.nn.Module, vit: bool) -> None:
        self.infos = tunable_tensors(model)
        self.vit = vit
        self.total = sum(i.numel for i in self.infos)
        head = next(i for i in self.infos if i.kind == "head" and i.is_weight)
        self.head = (head.shape[1], head.shape[0])
        self.matrices = [i for i in self.infos if i.kind == "matrix"]
        self.biases = [i for i in self.infos if i.kind != "head" and i.name.endswith(".bias")]
        self.free_biases = [i for i in self.biases if i.layer == "bias"]  # not norm parameters
        blocks: OrderedDict[str, list] = OrderedDict()
        for i in self.matrices:
            if i.block:
                blocks.setdefault(i.block, []).append(i)
        # (input channels, output channels) of every block
        self.blocks = [(m[0].shape[1] * m[0].groups, m[-1].shape[0]) for m in blocks.values()]

    def lora_targets(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every LoRA target."""
        if self.vit:
            return [(i.shape[1], i.slice(s).rows) for i in self.matrices if i.slices for s in ("q", "v")]
        return [(i.shape[1], i.shape[0]) for i in self.matrices
                if i.layer == "conv" and i.groups == 1 and i.shape[2:] == (1, 1)]

    def lora(self, r: int, bits: int) -> list:
        return [m for d_in, d_out in self.lora_targets() for m in (((r, d_in), bits), ((d_out, r), bits))]

    def adaptformer(self, r: int, bits: int) -> list:
        return [m for d_in, d_out in self.blocks for m in (((r, d_in), bits), ((d_out, r), bits))]


def float_bytes(n: int) -> int:
    return 4 * n


def methods(s: Shapes) -> list[tuple[str, int, int]]:
    """(method, bytes without head, bytes of the float32 head) for every method."""
    head = head_nbytes(*s.head)
    rows: list[tuple[str, int, int]] = [("linear", 0, head)]
    rows.append(("full", float_bytes(s.total) - head, head))
    rows.append(("bitfit", float_bytes(sum(i.numel for i in s.biases)), head))
    rows.append(("lora r=8", storage_nbytes(s.lora(8, 32)), head))
    rows.append(("adapter r=8", float_bytes(sum(2 * 8 * d_out + 8 + d_out for _, d_out in s.blocks)), head))
    rows.append(("adaptformer r=64", float_bytes(sum(64 * d_in + 64 + 64 * d_out + d_out for d_in, d_out in s.blocks)), head))
    # SPT: sparse entries spread over matrices by size, each with value + index in its matrix
    numel = sum(i.numel for i in s.matrices)
    sparse = sum(SPT_SPARSE * i.numel / numel * (4 + index_nbytes(i.numel)) for i in s.matrices)
    structured = float_bytes(SPT_BUDGET - SPT_SPARSE)
    rows.append(("spt-lora / spt-adapter 0.4M (est.)", round(sparse) + structured, head))
    gps = sum(i.shape[0] * (4 + index_nbytes(i.numel)) for i in s.matrices)
    rows.append(("gps K=1", gps + float_bytes(sum(i.numel for i in s.free_biases)), head))
    for r in (32, 1):
        rows.append((f"bi-lora r={r}", storage_nbytes(s.lora(r, 1)), head))
    for r in (32, 1):
        rows.append((f"bi-adaptformer r={r}", storage_nbytes(s.adaptformer(r, 1)), head))
    return rows


def main() -> None:
    with torch.device("meta"):
        models = {
            "ViT-B/16": Shapes(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES), True),
            "EfficientNet-Lite0": Shapes(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=NUM_CLASSES), False),
        }
    tables = {name: methods(s) for name, s in models.items()}
    print(f"Bytes per task, {NUM_CLASSES} classes. 'float head' = float32 weight + bias; "
          "'1-bit head' = Bi-Head (1-bit, no bias). KiB = 1024 B.\n")
    names = list(models)
    print("| method | " + " | ".join(f"{n} no head (B) | {n} + float head (B) | KiB | {n} + 1-bit head (B) | KiB" for n in names) + " |")
    print("|---" * (1 + 5 * len(names)) + "|")
    for k, (method, _, _) in enumerate(tables[names[0]]):
        cells = [method]
        for n in names:
            body, head = tables[n][k][1], tables[n][k][2]
            bi = body + head_nbytes(*models[n].head, bits=1, bias=False)
            one_bit = method.startswith("bi-")
            cells += [f"{body:,}", f"{body + head:,}", f"{(body + head) / 1024:,.1f}",
                      f"{bi:,}" if one_bit else "–", f"{bi / 1024:,.1f}" if one_bit else "–"]
        print("| " + " | ".join(cells) + " |")
    for n, s in models.items():
        print(f"\n{n}: {s.total:,} parameters with the 100-class head; blocks (in, out) = {len(s.blocks)}; "
              f"LoRA targets = {len(s.lora_targets())}; head {s.head}")

    # The paper's KiB are averages over VTAB tasks (different class counts): mean of group means
    vit = models["ViT-B/16"]
    d = vit.head[0]
    print("\nViT-B/16 averaged over VTAB-1k class counts (mean of the three group means), vs the paper:")
    print("| method | head | ours KiB | paper KiB |")
    print("|---|---|---|---|")
    body = {m: b for m, b, _ in tables["ViT-B/16"]}
    for (method, bi), paper in PAPER_KIB.items():
        group_means = [sum(body[method] + (head_nbytes(d, c, bits=1, bias=False) if bi else head_nbytes(d, c))
                           for c in cs) / len(cs) for cs in VTAB.values()]
        ours = sum(group_means) / len(group_means) / 1024
        print(f"| {method} | {'1-bit' if bi else 'float'} | {ours:.1f} | {paper} |")


if __name__ == "__main__":
    main()
