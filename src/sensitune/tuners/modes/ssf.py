"""``ssf``: Scaling & Shifting Features (Lian et al., NeurIPS 2022) after a Linear, a Conv2d or a norm layer.

``target`` is the module's name and ``shape`` is ``(channels,)``: its output channels (Linear,
Conv2d) or its normalised features (LayerNorm, BatchNorm, GroupNorm, timm's norm-act layers).
The module needs a bias (a norm: an affine weight and bias), because merging folds the shift
into it: a plain model has nowhere else to keep β. See :mod:`sensitune.tuners.ssf`.
"""
from __future__ import annotations

import torch
from torch import nn

from sensitune.tuners.host import tuning_state
from sensitune.tuners.modes.base import Mode
from sensitune.tuners.ssf import SSF


def ssf_kind(module: nn.Module) -> str:
    """``output`` for a Linear/Conv2d, ``affine`` for a norm with a 1-D weight and bias; else a ValueError."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if bias is None:
            raise ValueError(f"{type(module).__name__} has no bias to absorb the SSF shift when merged")
        return "output"
    if weight is not None and bias is not None and weight.dim() == 1 and bias.shape == weight.shape:
        return "affine"
    raise ValueError(f"{type(module).__name__} is neither a Linear/Conv2d with a bias nor a norm layer with an affine "
                     f"weight and bias")


class ScaleShift(Mode):
    name = "ssf"
    site = "module"
    structured = True
    added_module = "ssf"
    peft_refusal = ("SSF scale and shift (PEFT has no SSF method; export --format merged folds it into the "
                    "weights exactly, or --format delta keeps it)")
    parts = {"ssf": "ssf"}

    def check(self, unit) -> None:
        if len(unit.shape) != 1:
            raise ValueError(f"ssf unit {unit.target!r}: shape must be (channels,), got {unit.shape}")
        if not unit.target:
            raise ValueError("an ssf unit needs a module name as its target, not the root module")

    def check_target(self, unit, tensors) -> None:
        bias = f"{unit.target}.bias"
        if bias not in tensors:
            raise ValueError(f"ssf unit {unit.target!r}: the planned model has no {bias!r} (SSF needs a module with a "
                             f"bias, or a norm with an affine bias, to fold its shift into)")
        if tensors[bias] != unit.shape:
            raise ValueError(f"ssf unit {unit.target!r} has shape {unit.shape}, the module's bias is {tensors[bias]}")

    def clash(self, unit, other) -> bool:
        # the folded form assumes SSF is the module's only change: nothing else may tune it or its tensors
        return other is not unit and other.site != "block" and other.module == unit.target

    def parameters(self, unit):
        c = unit.shape[0]
        return [(f"{unit.target}.ssf.scale", "ssf", c), (f"{unit.target}.ssf.shift", "ssf", c)]

    def attach(self, module: nn.Module, unit) -> None:
        try:
            kind = ssf_kind(module)
        except ValueError as exc:
            raise ValueError(f"plan unit {unit.target!r}: cannot attach SSF: {exc}") from None
        bias = module._parameters["bias"]
        module.add_module("ssf", SSF(unit.shape[0], device=bias.device, dtype=bias.dtype))
        tuning_state(module).ssf = kind

    @torch.no_grad()
    def fold(self, module: nn.Module, state) -> None:
        if state.ssf is None:
            return
        for leaf in ("weight", "bias"):
            state.saved.setdefault(leaf, module._parameters[leaf].detach().clone())
        module.ssf.fold_into(module._parameters["weight"], module._parameters["bias"])

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        sites = []
        for name, module in model.named_modules():
            try:
                sites.append((name, ssf_kind(module), int(module._parameters["bias"].shape[0])))
            except ValueError:
                continue
        norm = next(s for s in sites if s[1] == "affine")
        layers = [s for s in sites if s[1] == "output"][:2]  # e.g. a patch embedding conv and a Linear
        return [Unit(name, "ssf", (c,)) for name, _, c in [norm, *layers]]
