"""Tiny models and hand-built plans for the artifact tests (fast: ViT depth 2 at 32 px)."""
from __future__ import annotations

import timm
import torch
from torch import nn

from sensitune.planning.plan import Plan, Unit, model_shapes
from sensitune.tuners import apply_plan

NUM_CLASSES = 5


def vit(seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=num_classes,
                             pretrained=False).eval()


def lite0(seed: int = 0, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("tf_efficientnet_lite0", num_classes=num_classes, pretrained=False).eval()


def head_units(model: nn.Module, bits: int = 32) -> list[Unit]:
    s = model_shapes(model)
    return [Unit("head.weight", "head", s["head.weight"], bits=bits), Unit("head.bias", "head", s["head.bias"])]


def make_plan(model: nn.Module, units: list[Unit], method: str = "handmade") -> Plan:
    head = [n for n, _ in model.named_parameters() if n.startswith(("head.", "classifier."))]
    return Plan(method, units, model_shapes(model), head=head)


def units_for(kind: str, model: nn.Module) -> list[Unit]:
    """Units of a few plan styles on the tiny ViT (each trains the head too)."""
    s = model_shapes(model)
    d = model.embed_dim
    qkv = "blocks.0.attn.qkv.weight"
    g = torch.Generator().manual_seed(3)
    if kind == "lora":  # slices of fused qkv with different ranks and scales, and a whole fc1
        units = [Unit(qkv, "lora", s[qkv], slice="q", slice_rows=(0, d), rank=2, scale=0.5),
                 Unit(qkv, "lora", s[qkv], slice="v", slice_rows=(2 * d, 3 * d), rank=3, scale=2.0),
                 Unit("blocks.1.mlp.fc1.weight", "lora", s["blocks.1.mlp.fc1.weight"], rank=4)]
    elif kind == "spt":  # sparse entries (matrix, norm, pos_embed), a whole bias, a LoRA
        n = s["blocks.1.mlp.fc1.weight"]
        units = [Unit("blocks.1.mlp.fc1.weight", "sparse", n, indices=torch.randperm(n[0] * n[1], generator=g)[:300]),
                 Unit("blocks.1.norm1.weight", "sparse", s["blocks.1.norm1.weight"], indices=torch.tensor([1, 5, 9])),
                 Unit("pos_embed", "sparse", s["pos_embed"], indices=torch.tensor([3, 50, 700])),
                 Unit("blocks.0.mlp.fc2.bias", "full", s["blocks.0.mlp.fc2.bias"]),
                 Unit("blocks.1.attn.proj.weight", "lora", s["blocks.1.attn.proj.weight"], rank=2)]
    elif kind == "bitfit":
        units = [Unit(n, "full", sh) for n, sh in s.items() if n.endswith(".bias") and not n.startswith("head")]
    elif kind.startswith("bilora"):  # k-bit LoRA on q and v, e.g. "bilora1"
        bits = int(kind[len("bilora"):] or 1)
        units = [Unit(qkv, "lora", s[qkv], slice="q", slice_rows=(0, d), rank=4, bits=bits),
                 Unit(qkv, "lora", s[qkv], slice="v", slice_rows=(2 * d, 3 * d), rank=4, bits=bits)]
    elif kind == "adapter":
        units = [Unit("blocks.0.mlp.fc2.weight", "adapter", s["blocks.0.mlp.fc2.weight"], rank=4)]
    elif kind == "adaptformer":
        units = [Unit(f"blocks.{i}", "adaptformer", (d, d), rank=4, bits=2) for i in range(2)]
    elif kind == "linear":
        units = []
    else:
        raise ValueError(kind)
    return units + head_units(model, bits=1 if kind == "bilora1" else 32)


def trained(model: nn.Module, plan: Plan, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """apply_plan, then move every trainable tensor as training would (random, seeded)."""
    apply_plan(model, plan)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tuned_vit(kind: str, seed: int = 0, train_seed: int = 1) -> nn.Module:
    base = vit(seed)
    return trained(base, make_plan(base, units_for(kind, base), method=kind), seed=train_seed)


def images(n: int = 3, size: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def to_v1(folder, base: nn.Module) -> None:
    """Rewrite a delta folder in format 1 (one tensor per trained tensor + a manifest in delta.json),
    as sensitune 0.1 wrote it, so the tests of that reader can tamper with single tensors."""
    import json

    from safetensors.torch import save_file

    from sensitune.artifacts import load_delta, read_delta
    from sensitune.artifacts.format import META_FILE, TENSORS_FILE

    delta = read_delta(folder)
    model = load_delta(base, delta)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()} | {n: list(b.shape) for n, b in model.named_buffers()}
    tensors, manifest = {}, {}
    for key, info in delta.meta["tensors"].items():
        t = delta.tensors[key].clone()
        info = dict(info)
        if "param" in info and "field" not in info:
            t = t.reshape(shapes[info["param"]])
        elif "param" in info:
            info["param_shape"] = shapes[info["param"]]
        elif "buffer" in info:
            t = t.reshape(shapes[info["buffer"]])
        info["shape"] = list(t.shape)
        tensors[key], manifest[key] = t.contiguous(), info
    meta = {k: v for k, v in delta.meta.items() if k != "packed"}
    meta.update(format_version=1, tensors=manifest)
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": "sensitune-delta"})
    (folder / META_FILE).write_text(json.dumps(meta))
