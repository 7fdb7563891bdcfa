"""Bottleneck adapters: sequential (SPT-Adapter) and parallel (AdaptFormer), float or k-bit.

* Sequential adapter on a layer's output y (or a q/k/v slice of it): y ← y + Up(GELU(Down(y)))
  with biases (SPT cost 2·r·d + r + d).
* AdaptFormer on a block: out ← out + s·Up(Dropout(ReLU(Down(x)))) without biases, where x is
  - on a ViT block (has ``norm2`` and ``mlp``): the input to the MLP branch *before* norm2
    (captured by a pre-hook on norm2), so the adapter runs parallel to the MLP branch and is
    added outside its drop-path, as in low-bit-adapters.md §2;
  - on a CNN block (EfficientNet-Lite inverted-residual / depthwise-separable): the block's
    input; Down and Up are 1×1 convs, Down carries the block's spatial stride and Up maps to
    the block's output channels, so the adapter runs parallel to the whole block.
* On CNN layers the sequential adapter acts over channels as 1×1 convs on the layer output.
Up starts at zero (float) or trunc-normal std 1e-3 (quantised); Down starts kaiming-uniform.
Adapters are non-linear, so they cannot be merged into the base weights.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from sensitune.tuners.lora import init_up, quantized


class Bottleneck(nn.Module):
    """Down (d_in → r) → activation → dropout → Up (r → d_out), times ``scale``.

    ``channel_dim=1`` treats NCHW feature maps (1×1 convs, ``stride`` on Down); else the last dim.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, *, act: str = "gelu", bias: bool = True,
                 scale: float = 1.0, dropout: float = 0.0, drop_path: float = 0.0, bits: int = 32,
                 channel_dim: int = -1, stride: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.rank, self.scale, self.bits = rank, float(scale), int(bits)
        self.channel_dim, self.stride = channel_dim, stride
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[act]
        self.down_w = nn.Parameter(torch.empty(rank, d_in, **kw))
        self.up_w = nn.Parameter(torch.empty(d_out, rank, **kw))
        nn.init.kaiming_uniform_(self.down_w, a=math.sqrt(5))
        init_up(self.up_w, self.bits)
        if bias:
            self.down_b = nn.Parameter(torch.zeros(rank, **kw))
            self.up_b = nn.Parameter(torch.zeros(d_out, **kw))
        else:
            self.register_parameter("down_b", None)
            self.register_parameter("up_b", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        down, up = quantized(self.down_w, self.bits), quantized(self.up_w, self.bits)
        if self.channel_dim == 1:
            h = F.conv2d(x, down[:, :, None, None], self.down_b, self.stride)
            y = F.conv2d(self.dropout(self.act(h)), up[:, :, None, None], self.up_b)
        else:
            y = F.linear(self.dropout(self.act(F.linear(x, down, self.down_b))), up, self.up_b)
        if self.scale != 1.0:
            y = y * self.scale
        return self.drop_path(y)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, bits={self.bits}, bias={self.down_b is not None}"


def is_vit_block(block: nn.Module) -> bool:
    return isinstance(getattr(block, "norm2", None), nn.Module) and isinstance(getattr(block, "mlp", None), nn.Module)


def cnn_block_geometry(block: nn.Module) -> tuple[int, int, int]:
    """(in_channels, out_channels, spatial stride) of a conv block, read from its convs."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(block).__name__} has no Conv2d: cannot attach a parallel adapter")
    stride = math.prod(c.stride[0] for c in convs)
    return convs[0].in_channels, convs[-1].out_channels, stride


def block_dims(block: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) an AdaptFormer on ``block`` maps between."""
    if is_vit_block(block):
        norm = block.norm2
        d = getattr(norm, "normalized_shape", None)
        d = d[0] if d else norm.weight.shape[0]
        return int(d), int(d)
    cin, cout, _ = cnn_block_geometry(block)
    return cin, cout


def _grab_mlp_input(block: nn.Module, _norm: nn.Module, args: tuple) -> None:
    block._sensitune_mlp_input = args[0]


def _add_vit_adaptformer(block: nn.Module, _mod: nn.Module, _args: tuple, out: Tensor) -> Tensor:
    x = block.__dict__.pop("_sensitune_mlp_input", None)
    if x is None:
        raise RuntimeError("AdaptFormer: the block's norm2 did not run; cannot read the MLP branch input")
    return out + block.adaptformer(x)


def _add_cnn_adaptformer(block: nn.Module, _mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out + block.adaptformer(args[0])


def attach_adaptformer(block: nn.Module, adapter: Bottleneck) -> list:
    """Register ``adapter`` as ``block.adaptformer`` and the hooks that run it; returns the handles.

    The hooks are partials of module-level functions over ``block`` and read ``block.adaptformer``
    when they run, not closures: ``copy.deepcopy`` copies a closure by reference, so a copied model
    used to run the original's adapter, and pickle cannot store a closure at all.
    """
    block.adaptformer = adapter
    handles = []
    if is_vit_block(block):
        handles.append(block.norm2.register_forward_pre_hook(partial(_grab_mlp_input, block)))
        handles.append(block.register_forward_hook(partial(_add_vit_adaptformer, block)))
    else:
        handles.append(block.register_forward_hook(partial(_add_cnn_adaptformer, block)))
    return handles
