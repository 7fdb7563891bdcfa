"""The trained-weights finiteness check's max |w|, through torch's fused norm and the fallback
for torch < 2.6 (no ``nn.utils.get_total_norm``), against a plain Python maximum."""
import math

import pytest
import torch
from torch import nn

from sensitune.engine.trainer import _max_abs


def _tensors(special: float | None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g).to(torch.bfloat16),
          torch.tensor([-5.5, 2.0]), torch.tensor([1e300, -2.0], dtype=torch.float64)]
    if special is not None:
        ts[1][3] = special
    return ts


def _by_hand(ts: list[torch.Tensor]) -> float:
    values = [abs(float(v)) for t in ts for v in t.flatten()]
    return math.nan if any(math.isnan(v) for v in values) else max(values)


@pytest.fixture(params=["fused", "fallback"])
def torch_version(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.delattr(nn.utils, "get_total_norm", raising=False)
    elif not hasattr(nn.utils, "get_total_norm"):
        pytest.skip("this torch has no nn.utils.get_total_norm (added in 2.6)")
    return request.param


@pytest.mark.parametrize("special", [None, math.inf, -math.inf, math.nan])
def test_max_abs_is_the_largest_magnitude_and_nan_when_any_is(torch_version, special):
    ts = _tensors(special)
    got, want = float(_max_abs(ts)), _by_hand(ts)
    assert (math.isnan(got) and math.isnan(want)) or got == want
    assert bool(torch.isfinite(_max_abs(ts))) == (special is None)


def test_no_tensors_is_zero(torch_version):
    assert float(_max_abs([])) == 0.0
