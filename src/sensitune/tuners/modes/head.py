"""``head``: a parameter of the classification head trains; ``bits`` < 32 quantises its weight matrix."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sensitune.tuners.host import tuning_state
from sensitune.tuners.lora import quantized
from sensitune.tuners.modes.base import Mode, Option, tensor_infos, valid_bits

HEAD_BITS = Option("bits", int, 32, "width of the head's weight matrix (32 = float)", valid_bits, omit_default=True)


class Head(Mode):
    name = "head"
    options = (HEAD_BITS,)
    site = "parameter"
    replaces_base = True
    clashes = frozenset({"full", "sparse", "lora", "adapter"})
    peft = "module"
    parts = {"head": "head"}

    def parameters(self, unit):
        return [(unit.target, "head", unit.numel)]

    def quantised(self, unit) -> dict[str, int]:
        return {unit.target: unit.bits} if unit.bits < 32 and len(unit.shape) > 1 else {}

    def attach(self, module: nn.Module, unit) -> None:
        param = module._parameters[unit.leaf]
        param.requires_grad_(True)
        if unit.bits < 32 and param.dim() > 1:
            tuning_state(module).bits[unit.leaf] = unit.bits

    @torch.no_grad()
    def fold(self, module: nn.Module, state) -> None:
        for leaf, bits in state.bits.items():
            p = module._parameters[leaf]
            state.saved.setdefault(leaf, p.detach().clone())
            p.copy_(quantized(p, bits))

    def root_tensor(self, shell: nn.Module, unit) -> Tensor | None:
        return shell._parameters[unit.leaf]

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        weight, *rest = tensor_infos(model, "head")
        return [Unit(weight.name, "head", weight.shape, bits=1)] + [Unit(i.name, "head", i.shape) for i in rest]
