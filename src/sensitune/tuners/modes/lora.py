"""``lora``: ΔY = s·B·A·dropout(x) on a Linear/Conv2d weight or one q/k/v row slice of a fused qkv (k-bit: Bi-LoRA)."""
from __future__ import annotations

import torch
from torch import nn

from sensitune.tuners.host import conv_geometry, tuning_state
from sensitune.tuners.lora import LoRA
from sensitune.tuners.modes.base import DROP_PATH, DROPOUT, RANK, SCALE, WEIGHT_BITS, Mode, packed_nbytes, tensor_infos


def matrix_module(module: nn.Module, unit, what: str) -> nn.Module:
    """``module`` if the unit targets the weight of a Linear or Conv2d, else a ValueError."""
    if unit.leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"plan unit {unit.target!r}: {what} needs the weight of a Linear or Conv2d, "
                         f"got {type(module).__name__}.{unit.leaf}")
    return module


def add_keyed(module: nn.Module, attr: str, unit, new: nn.Module) -> None:
    """Put ``new`` at ``module.<attr>[unit.key]`` (a ModuleDict per mode) with its slice rows."""
    st = tuning_state(module)
    if attr not in module._modules:
        module.add_module(attr, nn.ModuleDict())
    module._modules[attr][unit.key] = new.train(module.training)
    st.slices[unit.key] = unit.slice_rows


class Lora(Mode):
    name = "lora"
    options = (RANK, WEIGHT_BITS, SCALE, DROPOUT, DROP_PATH)
    site = "matrix"
    sliceable = True
    structured = True
    added_module = "lora"
    clashes = frozenset({"full", "head"})
    peft = "lora"
    parts = {"lora_A": "lora", "lora_B": "lora"}

    def parameters(self, unit):
        d_out, d_in = unit.matrix_shape
        base = f"{unit.module}.lora.{unit.key}" if unit.module else f"lora.{unit.key}"
        return [(f"{base}.A", "lora_A", unit.rank * d_in), (f"{base}.B", "lora_B", unit.rank * d_out)]

    def quantised(self, unit) -> dict[str, int]:
        return {} if unit.bits == 32 else {name: unit.bits for name, _, _ in self.parameters(unit)}

    def nbytes(self, unit) -> int:
        return sum(packed_nbytes(n, unit.bits) for _, _, n in self.parameters(unit))

    def attach(self, module: nn.Module, unit) -> None:
        mod = matrix_module(module, unit, "lora")
        conv = None
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ValueError(f"plan unit {unit.target!r}: LoRA on a grouped conv (groups={mod.groups}) is not supported")
            conv = conv_geometry(mod)
        d_out, d_in = unit.matrix_shape
        w = mod.weight
        add_keyed(mod, "lora", unit, LoRA(d_in, d_out, unit.rank, scale=unit.scale, dropout=unit.dropout,
                                          drop_path=unit.drop_path, bits=unit.bits, conv=conv,
                                          device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def fold(self, module: nn.Module, state) -> None:
        if "lora" not in module._modules:
            return
        w = module.weight
        state.saved.setdefault("weight", w.detach().clone())
        w2 = w.view(w.shape[0], -1)
        for key, lora in module.lora.items():
            rows = state.slices[key] or (0, w.shape[0])
            w2[rows[0]:rows[1]] += lora.delta_weight()

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        mats = [i for i in tensor_infos(model, "matrix") if i.layer in ("linear", "conv") and i.groups == 1]
        units = [Unit(mats[-1].name, "lora", mats[-1].shape, rank=2, scale=0.5)]
        fused = [i for i in mats if i.slices]
        if fused:  # q and v slices of a fused qkv, one of them 1-bit
            q, _, v = fused[0].slices
            units += [Unit(fused[0].name, "lora", fused[0].shape, slice="q", slice_rows=(q.start, q.stop), rank=2),
                      Unit(fused[0].name, "lora", fused[0].shape, slice="v", slice_rows=(v.start, v.stop), rank=3, bits=1)]
        else:  # a k x k conv, 1-bit
            units.append(Unit(mats[0].name, "lora", mats[0].shape, rank=2, bits=1))
        return units
