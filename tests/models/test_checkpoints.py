"""A user's checkpoint files: safetensors, .pth (weights_only), the original ViT .npz."""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from sensitune.models import create_backbone
from sensitune.state import source_of

VIT = "vit_tiny_patch16_224"
SMALL = dict(img_size=32, depth=2)


def _vit(num_classes=10, **kw):
    return timm.create_model(VIT, pretrained=False, num_classes=num_classes, **{**SMALL, **kw})


def _assert_same_backbone(model, source, head="head"):
    ref = source.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in got.items():
        if not k.startswith(head + "."):
            assert torch.equal(v, ref[k]), k


class Custom:
    """Not a tensor: a .pth holding it must be refused (no unpickling of user files)."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-nested-state_dict", "pth-nested-model", "pth-module"])
def test_round_trip_resets_head(tmp_path, fmt):
    src = _vit(num_classes=10)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = sd
        if fmt == "pth-nested-state_dict":
            obj = {"state_dict": sd, "epoch": 3}
        elif fmt == "pth-nested-model":
            obj = {"model": sd}
        elif fmt == "pth-module":
            obj = {f"module.{k}": v for k, v in sd.items()}
        torch.save(obj, path)
    model = create_backbone(VIT, num_classes=4, pretrained=str(path), **SMALL)
    assert model.head.weight.shape == (4, 192)
    assert source_of(model)["pretrained"] == str(path.resolve())
    assert source_of(model)["head"] == "fresh"
    ref = src.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        assert torch.equal(v, ref[k]), k
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_same_class_count_still_gets_a_fresh_head(tmp_path):
    src = _vit(num_classes=4)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model = create_backbone(VIT, num_classes=4, pretrained=str(path), **SMALL)
    assert not torch.equal(model.head.weight, src.head.weight)
    _assert_same_backbone(model, src)


def test_num_classes_none_keeps_the_checkpoint_head(tmp_path):
    src = _vit(num_classes=6)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = create_backbone(VIT, num_classes=None, pretrained=str(path), **SMALL)
    assert model.head.out_features == 6
    assert torch.equal(model.head.weight, src.head.weight)
    assert source_of(model)["head"] == "pretrained"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), src.eval()(x))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _vit().state_dict(), "extra": Custom()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        create_backbone(VIT, num_classes=4, pretrained=str(path), **SMALL)


def test_wrong_shapes_name_file_keys_and_both_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(_vit(embed_dim=96, num_heads=3).state_dict(), str(path))  # tiny is 192 wide
    with pytest.raises(ValueError) as err:
        create_backbone(VIT, num_classes=4, pretrained=str(path), **SMALL)
    msg = str(err.value)
    assert str(path) in msg
    assert "blocks.0.attn.qkv.weight: (288, 96) vs (576, 192)" in msg


def test_missing_and_unexpected_keys(tmp_path):
    sd = _vit().state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.7.extra"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as err:
        create_backbone(VIT, num_classes=4, pretrained=str(path), **SMALL)
    msg = str(err.value)
    assert "missing" in msg and "blocks.1.mlp.fc2.bias" in msg
    assert "unexpected" in msg and "blocks.7.extra" in msg
    # deeper model: the checkpoint lacks whole blocks
    path2 = tmp_path / "shallow.safetensors"
    save_file(_vit().state_dict(), str(path2))
    with pytest.raises(ValueError, match="blocks.2.norm1.weight"):
        create_backbone(VIT, num_classes=4, pretrained=str(path2), img_size=32, depth=3)


def test_position_table_is_resampled_to_the_model_grid(tmp_path):
    src = _vit(img_size=32)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    model = create_backbone(VIT, num_classes=4, pretrained=str(path), img_size=64, depth=2)
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])  # class token position untouched
    assert torch.equal(model.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_backbone(VIT, 4, pretrained=str(tmp_path / "nope.safetensors"), **SMALL)
    bad = tmp_path / "w.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported suffix"):
        create_backbone(VIT, 4, pretrained=str(bad), **SMALL)
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="c.safetensors"):
        create_backbone(VIT, 4, pretrained=str(corrupt), **SMALL)


def _to_original_npz(model, path):
    """Write a timm ViT in the naming of Google's original ``ViT-B_16.npz`` (inverse of timm's loader)."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    t = lambda x: x.detach().numpy()  # noqa: E731
    w = {
        "embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": t(model.patch_embed.proj.bias),
        "cls": t(model.cls_token),
        "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
        "Transformer/encoder_norm/scale": t(model.norm.weight),
        "Transformer/encoder_norm/bias": t(model.norm.bias),
        "head/kernel": t(model.head.weight.T),
        "head/bias": t(model.head.bias),
    }
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        for n, rows, bias in zip(("query", "key", "value"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            w[mha + f"{n}/kernel"] = t(rows.T.reshape(d, heads, d // heads))
            w[mha + f"{n}/bias"] = t(bias.reshape(heads, d // heads))
        w[mha + "out/kernel"] = t(blk.attn.proj.weight.reshape(d, heads, d // heads).permute(1, 2, 0))
        w[mha + "out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight.T)
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    np.savez(path, **w)


def test_original_vit_npz(tmp_path):
    src = _vit(num_classes=10)
    path = tmp_path / "ViT-Ti_16.npz"
    _to_original_npz(src, path)
    fresh = create_backbone(VIT, num_classes=3, pretrained=str(path), **SMALL)
    ref = src.state_dict()
    for k, v in fresh.state_dict().items():
        if not k.startswith("head."):
            assert torch.allclose(v, ref[k]), k
    assert fresh.head.out_features == 3
    kept = create_backbone(VIT, num_classes=None, pretrained=str(path), **SMALL).eval()
    assert kept.head.out_features == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(kept(x), src.eval()(x), atol=1e-5)
    # same class count: timm's loader would copy the head; we still hand back a fresh one
    same = create_backbone(VIT, num_classes=10, pretrained=str(path), **SMALL)
    assert not torch.equal(same.head.weight, src.head.weight)


def test_npz_of_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "ViT.npz"
    _to_original_npz(_vit(), path)
    with pytest.raises(ValueError, match="ViT.npz"):
        create_backbone(VIT, num_classes=3, pretrained=str(path), img_size=32, depth=3)
    with pytest.raises(ValueError, match="Vision Transformers"):
        create_backbone("resnet18", num_classes=3, pretrained=str(path))
