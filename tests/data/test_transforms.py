"""build_transform against hand computations on constant and patterned images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sensitune.data import build_transform

CFG = {"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5),
       "interpolation": "bicubic", "crop_pct": 0.875}


def test_constant_image_normalised_by_hand():
    image = Image.new("RGB", (40, 20), (100, 150, 200))  # non-square: resized directly, no crop
    x = build_transform(CFG, img_size=32)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((100, 150, 200), CFG["mean"], CFG["std"])]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 32), expected[c]), atol=1e-6)


def test_default_size_from_config_and_no_normalisation():
    cfg = {"input_size": (3, 48, 48), "mean": None, "std": None, "interpolation": "bilinear"}
    x = build_transform(cfg)(Image.new("RGB", (10, 10), (0, 51, 255)))
    assert x.shape == (3, 48, 48)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.2, 1.0]))


def _framed(size: int = 64) -> Image.Image:
    a = np.full((size, size, 3), 255, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0  # black centre, white frame
    return Image.fromarray(a)


def test_center_crop_uses_crop_pct():
    cfg = {**CFG, "mean": None, "std": None, "interpolation": "nearest", "crop_pct": 0.5}
    cropped = build_transform(cfg, img_size=16, center_crop=True)(_framed())
    assert cropped.shape == (3, 16, 16) and cropped.max() == 0  # only the black centre survives
    direct = build_transform(cfg, img_size=16)(_framed())
    assert direct.mean().item() == pytest.approx(0.75)  # whole frame kept: 3/4 of the area is white


def test_eval_ignores_augment_and_flip_mirrors():
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :4] = 255  # left half white
    image = Image.fromarray(a)
    cfg = {**CFG, "mean": None, "std": None, "interpolation": "nearest"}
    ev = build_transform(cfg, img_size=8, augment="flip")
    assert all(ev(image)[0, 0, 0] == 1.0 for _ in range(20))  # eval: never flipped
    tr = build_transform(cfg, img_size=8, train=True, augment="flip")
    lefts = {float(tr(image)[0, 0, 0]) for _ in range(60)}
    assert lefts == {0.0, 1.0}  # both the image and its mirror occur


@pytest.mark.parametrize("augment", ["rrc-flip", "randaug", None])
def test_train_augmentations_keep_shape(augment):
    x = build_transform(CFG, img_size=24, train=True, augment=augment)(_framed(50))
    assert x.shape == (3, 24, 24)


@pytest.mark.parametrize("bad, match", [
    ({"augment": "mixup"}, "unknown augment 'mixup'"),
    ({"img_size": 0}, "img_size must be a positive integer"),
])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        build_transform(CFG, **bad)


def test_bad_config():
    with pytest.raises(ValueError, match="interpolation"):
        build_transform({**CFG, "interpolation": "sinc"})
    with pytest.raises(ValueError, match="both 'mean' and 'std'"):
        build_transform({**CFG, "std": None})
    with pytest.raises(ValueError, match="no 'input_size'"):
        build_transform({"mean": CFG["mean"], "std": CFG["std"]})
