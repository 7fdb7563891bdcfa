"""``adaptformer``: a parallel bottleneck on a block, out += s·Up(dropout(ReLU(Down(x)))), no biases.

``target`` is the block's module name and ``shape`` is (d_in, d_out).
"""
from __future__ import annotations

from torch import nn

from sensitune.tuners.adapter import Bottleneck, attach_adaptformer, block_dims, cnn_block_geometry, is_vit_block
from sensitune.tuners.modes.base import DROP_PATH, DROPOUT, RANK, SCALE, WEIGHT_BITS, Mode


class AdaptFormer(Mode):
    name = "adaptformer"
    options = (RANK, WEIGHT_BITS, SCALE, DROPOUT, DROP_PATH)
    site = "block"
    structured = True
    mergeable = False
    added_module = "adaptformer"
    peft_refusal = "non-linear parallel adapter (PEFT's LoRA cannot express a ReLU between Down and Up)"
    parts = {"adapter": "adapter"}

    def check(self, unit) -> None:
        if len(unit.shape) != 2:
            raise ValueError(f"adaptformer unit {unit.target!r}: shape must be (d_in, d_out), got {unit.shape}")

    def check_target(self, unit, tensors) -> None:
        """A block has no tensor of its own; apply_plan checks its dimensions."""

    def matrix_shape(self, unit) -> tuple[int, int]:
        return (unit.shape[1], unit.shape[0])

    def parameters(self, unit):
        d_out, d_in = unit.matrix_shape
        base = f"{unit.target}.adaptformer" if unit.target else "adaptformer"
        return [(f"{base}.down_w", "adapter", unit.rank * d_in), (f"{base}.up_w", "adapter", unit.rank * d_out)]

    def quantised(self, unit) -> dict[str, int]:
        return {} if unit.bits == 32 else {name: unit.bits for name, _, _ in self.parameters(unit)}

    def attach(self, module: nn.Module, unit) -> None:
        d_in, d_out = block_dims(module)
        if (d_in, d_out) != tuple(unit.shape):
            raise ValueError(f"plan unit {unit.target!r}: block maps {d_in}->{d_out}, plan says {unit.shape}")
        ref = next(module.parameters())
        cnn = not is_vit_block(module)
        stride = cnn_block_geometry(module)[2] if cnn else 1
        ad = Bottleneck(d_in, d_out, unit.rank, act="relu", bias=False, scale=unit.scale, dropout=unit.dropout,
                        drop_path=unit.drop_path, bits=unit.bits, channel_dim=1 if cnn else -1, stride=stride,
                        device=ref.device, dtype=ref.dtype)
        attach_adaptformer(module, ad.train(module.training))

    def examples(self, model: nn.Module):
        from sensitune.tuners.plan import Unit

        blocks = [(n, m) for n, m in model.named_modules() if n and is_vit_block(m)]
        if not blocks:  # a CNN: blocks that have convs and a residual-style name (blocks.i.j)
            blocks = [(n, m) for n, m in model.named_modules()
                      if n.count(".") == 2 and n.startswith("blocks.") and any(isinstance(c, nn.Conv2d) for c in m.modules())]
        (first, fb), (last, lb) = blocks[0], blocks[-1]
        return [Unit(first, "adaptformer", block_dims(fb), rank=2),
                Unit(last, "adaptformer", block_dims(lb), rank=2, bits=2, scale=0.5)]
