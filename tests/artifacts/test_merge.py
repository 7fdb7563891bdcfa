"""merge(): a plain timm model (no sensitune modules, hooks, state) with the same outputs."""
import pytest
import torch
from torch import nn

from sensitune.artifacts import load_delta, merge, save_delta
from sensitune.artifacts.merge import is_plain
from sensitune.planning.plan import Unit, model_shapes
from sensitune.tuners import applied_plan
from sensitune.tuners.host import TUNING_ATTR

from .helpers import images, lite0, make_plan, trained, tuned_vit, vit


def _assert_plain(model: nn.Module, reference: nn.Module) -> None:
    for name, m in model.named_modules():
        assert type(m).__module__.startswith(("torch.", "timm.")), (name, type(m))
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert "forward" not in m.__dict__ and TUNING_ATTR not in m.__dict__, name
        assert type(m) is type(reference.get_submodule(name)), name
    assert is_plain(model) == []
    # same state-dict keys and shapes as a freshly built model: loads strictly into one
    ref_sd = reference.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    assert applied_plan(model) is None


@pytest.mark.parametrize("kind", ["lora", "spt", "bitfit", "bilora1", "bilora4", "linear"])
def test_merged_vit_is_plain_and_equal(kind):
    model = tuned_vit(kind)
    x = images()
    with torch.no_grad():
        expected = model(x)
    plain = merge(model).eval()
    _assert_plain(plain, vit(0))
    fresh = vit(0)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)
        # the tuned model itself is untouched: still tuned, still the same outputs
        assert torch.equal(model(x), expected)
    assert applied_plan(model) is not None


def test_merge_after_load_low_bit_uses_dequantised_weights(tmp_path):
    model = tuned_vit("bilora2")
    save_delta(model, tmp_path / "d")
    loaded = load_delta(vit(0), tmp_path / "d")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(merge(loaded).eval()(x), model(x), atol=1e-5, rtol=0)


def test_merged_conv_model():
    base = lite0()
    s = model_shapes(base)
    pw, dw = "blocks.1.0.conv_pwl.weight", "blocks.2.1.conv_dw.weight"
    n = s[dw][0] * 9
    units = [Unit(pw, "lora", s[pw], rank=3, scale=0.7, bits=4),
             Unit(dw, "sparse", s[dw], indices=torch.arange(0, n, 5)),
             Unit("blocks.3.0.bn1.bias", "full", s["blocks.3.0.bn1.bias"]),
             Unit("classifier.weight", "head", s["classifier.weight"]), Unit("classifier.bias", "head", s["classifier.bias"])]
    # float64: random-init Lite0 logits are ~10, where float32 rounding alone is ~1e-5
    model = trained(base, make_plan(base, units)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        plain = merge(model).eval()
        _assert_plain(plain, lite0())
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["adapter", "adaptformer"])
def test_non_linear_units_are_refused(kind):
    model = tuned_vit(kind)
    with pytest.raises(ValueError, match="non-linear"):
        merge(model)
