"""PEFT layout builder: real ``peft`` loads our files and reproduces an independently merged model."""
import copy

import pytest
import timm
import torch

from sensitune.artifacts.peft_export import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    LoraFactor,
    build_peft_adapter,
    write_peft_adapter,
)

peft = pytest.importorskip("peft")


def _vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5, pretrained=False).eval()


def test_fused_qkv_slices_with_different_scales_and_head(tmp_path):
    model = _vit()
    d = model.embed_dim
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    factors = [
        LoraFactor("blocks.0.attn.qkv", rnd(2, d), rnd(d, 2), scale=0.5, rows=(0, d), out_features=3 * d),
        LoraFactor("blocks.0.attn.qkv", rnd(3, d), rnd(d, 3), scale=2.0, rows=(2 * d, 3 * d), out_features=3 * d),
        LoraFactor("blocks.1.attn.qkv", rnd(4, d), rnd(d, 4), scale=1.0, rows=(d, 2 * d), out_features=3 * d),
        LoraFactor("blocks.1.mlp.fc1", rnd(4, d), rnd(4 * d, 4), scale=1.0),
    ]
    head = {"weight": rnd(5, d), "bias": rnd(5)}
    export = build_peft_adapter(factors, {"head": head})
    write_peft_adapter(export, tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}
    # the combined qkv LoRA has rank r_q + r_v and zero blocks off the slices
    B0 = export.tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert B0.shape == (3 * d, 5)
    assert torch.all(B0[d:2 * d] == 0) and torch.all(B0[:d, 2:] == 0) and torch.all(B0[2 * d:, :2] == 0)

    # independent reference: add each ΔW by hand into a copy of the base
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for f in factors:
            w = ref.get_submodule(f.module).weight
            r0, r1 = f.rows or (0, w.shape[0])
            w[r0:r1] += f.scale * f.B @ f.A
        ref.head.weight.copy_(head["weight"])
        ref.head.bias.copy_(head["bias"])
    x = torch.randn(3, 3, 32, 32, generator=g)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), atol=1e-5, rtol=0)
        assert not torch.allclose(model(x), ref(x), atol=1e-3)  # the delta matters


def test_conv_lora_efficientnet(tmp_path):
    model = timm.create_model("tf_efficientnet_lite0", num_classes=4, pretrained=False).eval()
    conv = model.blocks[1][0].conv_pwl
    out, cin = conv.weight.shape[:2]
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, cin, generator=g) * 0.1, torch.randn(out, 3, generator=g) * 0.1
    f = LoraFactor("blocks.1.0.conv_pwl", A, B, scale=0.7, kernel=tuple(conv.weight.shape))
    write_peft_adapter(build_peft_adapter([f], {}), tmp_path / "p")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[1][0].conv_pwl.weight += (0.7 * B @ A).reshape(conv.weight.shape)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    # float64 so that merged-vs-unmerged rounding through 16 conv blocks stays far below 1e-5
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.double()(x), atol=1e-5, rtol=0)


def test_overlapping_slices_and_clash_refused():
    A, B = torch.zeros(1, 4), torch.zeros(4, 1)
    bad = [LoraFactor("m", A, B, rows=(0, 4), out_features=12), LoraFactor("m", A, B, rows=(2, 6), out_features=12)]
    with pytest.raises(ValueError, match="overlap"):
        build_peft_adapter(bad, {})
    with pytest.raises(ValueError, match="also saved whole"):
        build_peft_adapter([LoraFactor("m", A, B)], {"m": {"weight": torch.zeros(4, 4)}})
