"""``sparse``: fixed flat ``indices`` into a frozen parameter; a values vector trains, W' = W + scatter(δ)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sensitune.io import index_bits
from sensitune.tuners.host import tuning_state
from sensitune.tuners.modes.base import Mode, tensor_infos
from sensitune.tuners.sparse import SparseIndex, scatter_delta


class Sparse(Mode):
    name = "sparse"
    site = "parameter"
    indexed = True
    clashes = frozenset({"full", "head"})
    peft_refusal = "sparse entries (PEFT has no sparse delta)"
    parts = {"sparse": "sparse_values"}

    def parameters(self, unit):
        pre = f"{unit.module}." if unit.module else ""
        return [(f"{pre}{unit.leaf}_delta", "sparse", int(unit.indices.numel()))]

    def nbytes(self, unit) -> int:
        n = int(unit.indices.numel())
        return 4 * n + math.ceil(n * index_bits(math.prod(unit.shape)) / 8)  # delta format 3: packed indices

    def attach(self, module: nn.Module, unit) -> None:
        param = module._parameters[unit.leaf]
        idx = unit.indices.to(param.device)
        rows = param.shape[0] if param.dim() > 1 else 1
        tuning_state(module).sparse[unit.leaf] = SparseIndex(idx, param.numel() // rows, rows)
        module.register_parameter(f"{unit.leaf}_delta",
                                  nn.Parameter(torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)))
        module.register_buffer(f"{unit.leaf}_delta_index", idx.clone())

    @torch.no_grad()
    def fold(self, module: nn.Module, state) -> None:
        for leaf, geo in state.sparse.items():
            p = module._parameters[leaf]
            state.saved.setdefault(leaf, p.detach().clone())
            p.copy_(scatter_delta(p, getattr(module, f"{leaf}_delta"), geo.index.to(p.device)))

    @torch.no_grad()
    def root_tensor(self, shell: nn.Module, unit) -> Tensor | None:
        w = shell._parameters[unit.leaf]
        merged = scatter_delta(w, getattr(shell, f"{unit.leaf}_delta"), getattr(shell, f"{unit.leaf}_delta_index"))
        return nn.Parameter(merged, requires_grad=False)

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        g = torch.Generator().manual_seed(0)
        picks = [tensor_infos(model, "matrix")[-1], tensor_infos(model, "vector")[0]]
        picks += [i for i in tensor_infos(model, "matrix", "conv") if i.groups > 1][:1]  # a depthwise kernel
        return [Unit(i.name, "sparse", i.shape, indices=torch.randperm(i.numel, generator=g)[:max(2, i.numel // 50)])
                for i in picks]
