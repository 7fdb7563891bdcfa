"""Sparse deltas: forward equals the dense W' computation; values' gradients equal dense autograd's."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sensitune.planning.plan import Plan, Unit, model_shapes
from sensitune.tuners import apply_plan
from sensitune.tuners.sparse import SparseConv2dFunction, SparseIndex, SparseLinearFunction, _depthwise_kernel_grad


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


_CONVS = {  # cin, cout, k, stride, pad, dilation, groups
    "pointwise": (6, 5, 1, 1, 0, 1, 1),
    "pointwise-k-per-row": (6, 5, 1, 1, 0, 1, 1),
    "pointwise-rows-matmul": (6, 5, 1, 1, 0, 1, 1),
    "pointwise-channels-last": (6, 5, 1, 1, 0, 1, 1),
    "pointwise-strided": (6, 5, 1, 2, 0, 1, 1),
    "3x3-stride2": (3, 4, 3, 2, 1, 1, 1),
    "depthwise": (6, 6, 3, 1, 1, 1, 6),
    "depthwise-5x5-stride2": (6, 6, 5, 2, 2, 1, 6),
    "depthwise-dilated-unpadded": (4, 4, 3, 1, 0, 2, 4),
    "depthwise-multiplier": (3, 6, 3, 2, 1, 1, 3),
    "depthwise-k-per-row": (6, 6, 3, 1, 1, 1, 6),
    "grouped": (6, 4, 3, 1, 1, 1, 2),
}


@pytest.mark.parametrize("kind", sorted(_CONVS))
def test_conv_values_grad_matches_dense(kind, monkeypatch):
    monkeypatch.setattr("sensitune.tuners.sparse._CHUNK_ELEMENTS", 64)  # several batch chunks
    torch.manual_seed(0)
    cin, cout, k, stride, pad, dil, groups = _CONVS[kind]
    weight = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    n = weight.numel()
    per_row = n // cout
    index = torch.randperm(n)[: max(3, n // 4)].sort().values
    if kind.endswith("k-per-row"):  # one entry in every output channel, as GPS K=1 makes
        index = torch.arange(cout) * per_row + torch.randint(0, per_row, (cout,))
    values = torch.randn(index.numel(), dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, cin, 7, 7, dtype=torch.float64)
    if kind.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    geo = SparseIndex(index, per_row, cout)
    geo.use_rows = kind.endswith("rows-matmul")
    if kind.endswith("k-per-row"):
        assert geo.per_row == 1
    args = ((stride,) * 2, (pad,) * 2, (dil,) * 2, groups)
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


def test_depthwise_kernel_grad_is_the_dense_kernel_gradient():
    """The correlation route equals conv2d_weight for every entry (multiplier 2, stride, dilation, padding)."""
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    w_shape = torch.Size((6, 1, 3, 3))
    for stride, pad, dil in [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2)), ((2, 2), (1, 0), (2, 1))]:
        gy = torch.randn_like(F.conv2d(x, torch.zeros(w_shape, dtype=x.dtype), None, stride, pad, dil, 3))
        torch.testing.assert_close(_depthwise_kernel_grad(x, gy, w_shape, stride, pad, dil),
                                   torch.nn.grad.conv2d_weight(x, w_shape, gy, stride, pad, dil, 3))


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


class _AmpNet(nn.Module):
    """Linear, pointwise conv and depthwise conv: each fused sparse path once."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, img):
        return self.fc(self.pw(self.dw(img)).mean((2, 3)))


def test_sparse_under_cpu_bf16_autocast_matches_float32():
    """Under CPU bf16 autocast: bf16 outputs like the dense layers, float32 value grads close to float32's."""
    torch.manual_seed(0)
    shapes = model_shapes(_AmpNet())
    picks = {"dw.weight": [0, 4, 13, 30, 35], "pw.weight": [1, 6, 11, 23], "fc.weight": [0, 7, 17], "fc.bias": [2]}

    def tuned():
        torch.manual_seed(1)
        net = _AmpNet()
        units = [Unit(n, "sparse", shapes[n], indices=torch.tensor(i)) for n, i in picks.items()]
        apply_plan(net, Plan("test", units, shapes))
        with torch.no_grad():
            for n, i in picks.items():
                mod, leaf = n.rsplit(".", 1)
                getattr(net.get_submodule(mod), f"{leaf}_delta").copy_(torch.linspace(-0.5, 0.5, len(i)))
        return net

    img = torch.randn(8, 4, 9, 9)
    runs = {}
    for amp in (False, True):
        net = tuned()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = net(img)
            assert y.dtype == (torch.bfloat16 if amp else torch.float32)
            y.float().square().sum().backward()
        runs[amp] = y.float(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    (y32, g32), (y16, g16) = runs[False], runs[True]
    torch.testing.assert_close(y16, y32, rtol=3e-2, atol=3e-2)
    assert g16.keys() == g32.keys()
    for n in g32:
        assert g16[n].dtype == torch.float32, n
        torch.testing.assert_close(g16[n], g32[n], rtol=5e-2, atol=5e-2 * g32[n].abs().max().item(), msg=n)
