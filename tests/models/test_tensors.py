import pytest
import timm
import torch
from torch import nn

from sensitune.models import as_matrix, find_head, tunable_tensors


def test_vit_kinds_and_qkv_slices():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7)
    infos = {i.name: i for i in tunable_tensors(model)}
    # every parameter is described exactly once, in registration order
    assert list(infos) == [n for n, _ in model.named_parameters()]
    qkv = infos["blocks.0.attn.qkv.weight"]
    assert qkv.kind == "matrix" and qkv.block == "blocks.0" and qkv.role == "attn.qkv"
    assert [(s.name, s.start, s.stop) for s in qkv.slices] == [("q", 0, 192), ("k", 192, 384), ("v", 384, 576)]
    assert infos["blocks.0.mlp.fc1.weight"].matrix_shape == (768, 192)
    assert infos["blocks.0.norm1.weight"].layer == "norm"
    assert infos["blocks.0.attn.qkv.bias"].kind == "vector"
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert infos[name].kind == "embedding"
    assert infos["head.weight"].kind == "head" and infos["head.bias"].kind == "head"
    assert sum(i.numel for i in infos.values()) == sum(p.numel() for p in model.parameters())


def test_cnn_convs_are_matrices():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    infos = {i.name: i for i in tunable_tensors(model)}
    assert find_head(model) == "classifier"
    pw = infos["blocks.1.0.conv_pw.weight"]
    assert pw.kind == "matrix" and pw.layer == "conv" and pw.matrix_shape == (96, 16)
    dw = infos["blocks.1.0.conv_dw.weight"]
    assert dw.groups == 96 and dw.matrix_shape == (96, 9)
    assert infos["conv_stem.weight"].matrix_shape == (32, 27)
    w = model.get_parameter("conv_stem.weight")
    assert as_matrix(w).shape == (32, 27) and as_matrix(w).data_ptr() == w.data_ptr()


def test_plain_module_head_is_last_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    infos = tunable_tensors(model)
    assert find_head(model) == "4"
    kinds = [(i.name, i.kind) for i in infos]
    assert kinds == [
        ("0.weight", "matrix"), ("0.bias", "vector"), ("2.weight", "matrix"), ("2.bias", "vector"),
        ("3.weight", "vector"), ("3.bias", "vector"), ("4.weight", "head"), ("4.bias", "head"),
    ]
    assert torch.equal(torch.tensor(infos[0].matrix_shape), torch.tensor([4, 27]))


def test_kept_training_flags_restores_each_modules_own_flag_even_after_an_error():
    """``model.train()`` / ``.eval()`` set every flag alike; the context puts back the mix."""
    from torch import nn

    from sensitune.models import kept_training_flags

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    model.train()
    model[1].eval()
    model[2][1].eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with kept_training_flags(model):
            model.eval()
            raise RuntimeError("evaluation failed half-way")
    assert [m.training for m in model.modules()] == before == [True, True, False, True, True, False]
