"""``full``: a base parameter trains as it is (a whole matrix, a bias for BitFit/GPS, everything for full tuning)."""
from __future__ import annotations

from torch import Tensor, nn

from sensitune.tuners.modes.base import Mode, tensor_infos


class Full(Mode):
    name = "full"
    site = "parameter"
    replaces_base = True
    clashes = frozenset({"head", "sparse", "lora", "adapter"})
    peft = "module"  # PEFT restores a tuned tensor by saving its whole module (modules_to_save)
    parts = {"full": "full", "bias": "bias"}

    def parameters(self, unit):
        role = "bias" if len(unit.shape) == 1 else "full"
        return [(unit.target, role, unit.numel)]

    def attach(self, module: nn.Module, unit) -> None:
        module._parameters[unit.leaf].requires_grad_(True)

    def root_tensor(self, shell: nn.Module, unit) -> Tensor | None:
        return shell._parameters[unit.leaf]

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        matrix = tensor_infos(model, "matrix")[0]
        vector = tensor_infos(model, "vector")[-1]
        return [Unit(matrix.name, "full", matrix.shape), Unit(vector.name, "full", vector.shape)]
