"""``adapter``: sequential bottleneck y ← y + Up(GELU(Down(y))) with biases on a layer's output (or a q/k/v slice)."""
from __future__ import annotations

from torch import nn

from sensitune.tuners.adapter import Bottleneck
from sensitune.tuners.modes.base import DROP_PATH, DROPOUT, RANK, SCALE, WEIGHT_BITS, Mode, tensor_infos
from sensitune.tuners.modes.lora import add_keyed, matrix_module


class Adapter(Mode):
    name = "adapter"
    options = (RANK, WEIGHT_BITS, SCALE, DROPOUT, DROP_PATH)
    site = "matrix"
    sliceable = True
    structured = True
    mergeable = False
    added_module = "adapter"
    clashes = frozenset({"full", "head"})
    peft_refusal = "non-linear adapter (PEFT's LoRA cannot express a GELU between Down and Up)"
    parts = {"adapter": "adapter"}

    def parameters(self, unit):
        d_out, _ = unit.matrix_shape
        r = unit.rank
        base = f"{unit.module}.adapter.{unit.key}" if unit.module else f"adapter.{unit.key}"
        return [(f"{base}.down_w", "adapter", r * d_out), (f"{base}.down_b", "adapter", r),
                (f"{base}.up_w", "adapter", r * d_out), (f"{base}.up_b", "adapter", d_out)]

    def quantised(self, unit) -> dict[str, int]:
        if unit.bits == 32:
            return {}
        return {name: unit.bits for name, _, _ in self.parameters(unit) if not name.endswith("_b")}

    def attach(self, module: nn.Module, unit) -> None:
        mod = matrix_module(module, unit, "adapter")
        d_out, _ = unit.matrix_shape
        w = mod.weight
        add_keyed(mod, "adapter", unit, Bottleneck(
            d_out, d_out, unit.rank, act="gelu", bias=True, scale=unit.scale, dropout=unit.dropout,
            drop_path=unit.drop_path, bits=unit.bits, channel_dim=1 if isinstance(mod, nn.Conv2d) else -1,
            device=w.device, dtype=w.dtype))

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        mats = [i for i in tensor_infos(model, "matrix") if i.layer in ("linear", "conv") and i.groups == 1]
        return [Unit(mats[-1].name, "adapter", mats[-1].shape, rank=2),
                Unit(mats[1].name, "adapter", mats[1].shape, rank=2, bits=4)]
