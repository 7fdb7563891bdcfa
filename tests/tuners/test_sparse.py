"""Sparse deltas: forward equals the dense W' computation; values' gradients equal dense autograd's."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sensitune.planning.plan import Plan, Unit, model_shapes
from sensitune.tuners import apply_plan
from sensitune.tuners.sparse import SparseConv2dFunction, SparseIndex, SparseLinearFunction


def _dense_reference(weight, index, values):
    """W' = W + scatter(values) with W' a leaf, so autograd gives the dense gradient of W'."""
    w = weight.detach().clone().reshape(-1)
    w[index] += values.detach()
    return w.view_as(weight).requires_grad_(True)


@pytest.mark.parametrize("layout", ["gather", "rows-matmul", "k-per-row"])
def test_linear_values_grad_matches_dense(layout, monkeypatch):
    monkeypatch.setattr("sensitune.tuners.sparse._CHUNK_ELEMENTS", 20)  # several token chunks
    weight = torch.randn(12, 7, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    if layout == "k-per-row":  # two entries in every row, as GPS K=2 makes
        index = (torch.arange(12).repeat_interleave(2) * 7 + torch.tensor([1, 4] * 12)).sort().values
    else:
        index = torch.tensor([0, 5, 8, 13, 40, 41, 83])  # rows 0, 0, 1, 1, 5, 5, 11
    values = torch.randn(index.numel(), dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    geo = SparseIndex(index, 7, 12)
    assert geo.per_row == (2 if layout == "k-per-row" else 0)
    geo.use_rows = layout == "rows-matmul"
    y = SparseLinearFunction.apply(x, weight, bias, values, geo)
    g = torch.randn_like(y)
    y.backward(g)

    w_ref = _dense_reference(weight, index, values)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(values.grad, w_ref.grad.reshape(-1)[index])
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)


@pytest.mark.parametrize("kind", ["pointwise", "pointwise-k-per-row", "3x3-stride2", "depthwise"])
def test_conv_values_grad_matches_dense(kind):
    cfg = {"pointwise": dict(cin=6, cout=5, k=1, stride=1, pad=0, groups=1),
           "pointwise-k-per-row": dict(cin=6, cout=5, k=1, stride=1, pad=0, groups=1),
           "3x3-stride2": dict(cin=3, cout=4, k=3, stride=2, pad=1, groups=1),
           "depthwise": dict(cin=6, cout=6, k=3, stride=1, pad=1, groups=6)}[kind]
    weight = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], cfg["k"], cfg["k"], dtype=torch.float64)
    n = weight.numel()
    index = torch.randperm(n)[: max(3, n // 4)].sort().values
    if kind == "pointwise-k-per-row":
        index = torch.arange(cfg["cout"]) * cfg["cin"] + torch.randint(0, cfg["cin"], (cfg["cout"],))
    values = torch.randn(index.numel(), dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, cfg["cin"], 7, 7, dtype=torch.float64, requires_grad=True)
    geo = SparseIndex(index, n // cfg["cout"], cfg["cout"])
    args = ((cfg["stride"],) * 2, (cfg["pad"],) * 2, (1, 1), cfg["groups"])
    y = SparseConv2dFunction.apply(x, weight, None, values, geo, *args)
    g = torch.randn_like(y)
    y.backward(g)
    w_ref = _dense_reference(weight, index, values)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.conv2d(x_ref, w_ref, None, *args)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(values.grad, w_ref.grad.reshape(-1)[index])
    torch.testing.assert_close(x.grad, x_ref.grad)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = timm.layers.create_conv2d(2, 4, 3, stride=2, padding="same")  # Conv2dSame
        self.pw = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(8 + 3, 2)

    def forward(self, x, img):
        a = self.norm(self.fc(x))
        b = self.pw(self.conv(img)).mean((2, 3))
        return self.head(torch.cat([a, b], -1))


def test_apply_plan_sparse_everywhere_matches_dense_model():
    """Sparse units on Linear, LayerNorm (1-D), Conv2dSame, pointwise conv and a bias, via apply_plan."""
    torch.manual_seed(1)
    net = _Net().double()
    shapes = model_shapes(net)
    picks = {"fc.weight": [0, 7, 9, 47], "fc.bias": [3], "norm.weight": [1, 6], "norm.bias": [0],
             "conv.weight": [0, 17, 70], "pw.weight": [2, 5, 11]}
    units = [Unit(n, "sparse", shapes[n], indices=torch.tensor(i)) for n, i in picks.items()]
    plan = Plan("test", units, shapes, head=["head.weight", "head.bias"])
    reference = _Net().double()
    reference.load_state_dict(net.state_dict())
    apply_plan(net, plan)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {f"{n.rsplit('.', 1)[0]}.{n.rsplit('.', 1)[1]}_delta" for n in picks}
    with torch.no_grad():
        for n, i in picks.items():
            mod, leaf = n.rsplit(".", 1)
            getattr(net.get_submodule(mod), f"{leaf}_delta").copy_(torch.randn(len(i), dtype=torch.float64))
    # the dense reference: W' as trainable leaves
    with torch.no_grad():
        for n, i in picks.items():
            mod, leaf = n.rsplit(".", 1)
            delta = getattr(net.get_submodule(mod), f"{leaf}_delta")
            reference.get_parameter(n).reshape(-1)[torch.tensor(i)] += delta
    x, img = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, 9, 9, dtype=torch.float64)
    y, y_ref = net(x, img), reference(x, img)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for n, i in picks.items():
        mod, leaf = n.rsplit(".", 1)
        got = getattr(net.get_submodule(mod), f"{leaf}_delta").grad
        torch.testing.assert_close(got, reference.get_parameter(n).grad.reshape(-1)[torch.tensor(i)], msg=n)
    # the frozen weights received no gradient at all
    assert all(p.grad is None for n, p in net.named_parameters() if not p.requires_grad)
