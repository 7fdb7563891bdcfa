"""Preprocessing built from a backbone's pretrained data config (timm ``resolve_data_config`` shape).

Eval (and train without ``augment``) follows VTAB practice: a direct resize to a square
``img_size × img_size`` with the config's interpolation (bicubic by default), no crop, then
``ToTensor`` and normalisation with the config's mean/std (``mean``/``std`` None → pixels
stay in [0, 1], the Bi-adapter convention). ``center_crop=True`` gives the ImageNet/GPS-FGVC
style instead: resize the short side to ``img_size / crop_pct`` and centre-crop.

Train augmentations (``augment``, only used when ``train=True``):
``flip`` (resize + horizontal flip), ``rrc-flip`` (RandomResizedCrop + flip, the GPS FGVC
recipe), ``randaug`` (resize + flip + torchvision RandAugment).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torchvision import transforms as T

AUGMENTATIONS = ("flip", "rrc-flip", "randaug")
_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX, "hamming": T.InterpolationMode.HAMMING,
}


def _interpolation(name: Any) -> T.InterpolationMode:
    if isinstance(name, T.InterpolationMode):
        return name
    key = str(name or "bicubic").lower()
    if key == "random":  # timm's training-time option; deterministic eval wants one mode
        key = "bicubic"
    if key not in _INTERP:
        raise ValueError(f"data_config['interpolation']={name!r} is not one of {', '.join(_INTERP)}")
    return _INTERP[key]


def build_transform(data_config: dict, *, img_size: int | None = None, train: bool = False,
                    augment: str | None = None, center_crop: bool = False) -> Callable:
    """A torchvision transform: PIL RGB image → normalised ``3 × img_size × img_size`` tensor.

    ``img_size`` defaults to ``data_config['input_size'][-1]``.
    """
    if img_size is None:
        size = data_config.get("input_size")
        if not size:
            raise ValueError("data_config has no 'input_size' and no img_size was given")
        img_size = int(size[-1])
    if int(img_size) <= 0:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    img_size = int(img_size)
    interp = _interpolation(data_config.get("interpolation", "bicubic"))
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")

    if center_crop:
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"data_config['crop_pct'] must be in (0, 1], got {crop_pct}")
        resize = [T.Resize(int(math.floor(img_size / crop_pct)), interpolation=interp), T.CenterCrop(img_size)]
    else:
        resize = [T.Resize((img_size, img_size), interpolation=interp)]

    ops: list[Callable] = []
    if train and augment == "rrc-flip":
        ops += [T.RandomResizedCrop(img_size, interpolation=interp), T.RandomHorizontalFlip()]
    elif train and augment == "flip":
        ops += resize + [T.RandomHorizontalFlip()]
    elif train and augment == "randaug":
        ops += resize + [T.RandomHorizontalFlip(), T.RandAugment(interpolation=interp)]
    else:
        ops += resize
    ops.append(T.ToTensor())
    mean, std = data_config.get("mean"), data_config.get("std")
    if (mean is None) != (std is None):
        raise ValueError("data_config must give both 'mean' and 'std' (or neither, for pixels in [0, 1])")
    if mean is not None:
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"data_config mean/std must be 3 values with std > 0, got mean={mean}, std={std}")
        ops.append(T.Normalize([float(m) for m in mean], [float(s) for s in std]))
    return T.Compose(ops)
