"""The tuners on every device: sparse values' gradients equal dense autograd's at the indices (fp32,
and under bf16 / fp16 autocast within the tolerances of cuda_helpers.PRECISIONS), folded conv LoRA
equals its side branch, k-bit codes pack and unpack on the tensor's own device."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same

import sensitune
from cuda_helpers import PRECISIONS, assert_close_at, autocast, sibling
from sensitune.tuners.packing import pack_bits, unpack_bits
from sensitune.tuners.quant import pack_quantized, quantize_ste, unpack_quantized
from sensitune.tuners.sparse import SparseConv2dFunction, SparseIndex, SparseLinearFunction

SPARSE = sibling("tuners/test_sparse.py")  # _dense_reference, _CONVS, _Net, Plan, Unit, model_shapes
PREC = sorted(PRECISIONS)


def _vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


def _effnet() -> torch.nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)


def _dense(weight, index, values):
    return SPARSE._dense_reference(weight, index, values)


def _backward(y, g):
    """Backward of Σ y·g in float32 (y may be a bf16/fp16 autocast output)."""
    (y.float() * g).sum().backward()


@pytest.mark.parametrize("precision", PREC)
@pytest.mark.parametrize("layout", ["gather", "rows-matmul", "k-per-row"])
def test_linear_values_grad_matches_dense(device, precision, layout, exact_float32, monkeypatch):
    monkeypatch.setattr("sensitune.tuners.sparse._CHUNK_ELEMENTS", 20)  # several token chunks
    torch.manual_seed(0)
    kw = {"device": device}
    weight = torch.randn(12, 7, **kw)
    bias = torch.randn(12, **kw, requires_grad=True)
    if layout == "k-per-row":  # two entries in every row, as GPS K=2 makes
        index = (torch.arange(12).repeat_interleave(2) * 7 + torch.tensor([1, 4] * 12)).sort().values
    else:
        index = torch.tensor([0, 5, 8, 13, 40, 41, 83])  # rows 0, 0, 1, 1, 5, 5, 11
    index = index.to(device)
    values = torch.randn(index.numel(), **kw, requires_grad=True)
    x = torch.randn(3, 5, 7, **kw, requires_grad=True)
    geo = SparseIndex(index, 7, 12)
    assert geo.per_row == (2 if layout == "k-per-row" else 0)  # layout found on the index's device
    geo.use_rows = layout == "rows-matmul"
    with autocast(device, precision):
        y = SparseLinearFunction.apply(x, weight, bias, values, geo)
    g = torch.randn(y.shape, device=device)
    _backward(y, g)

    w_ref = _dense(weight, index, values)
    x_ref, b_ref = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    with autocast(device, precision):
        y_ref = F.linear(x_ref, w_ref, b_ref)
    _backward(y_ref, g)
    assert y.dtype == y_ref.dtype and y.device == device
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_close_at(precision, y, y_ref, "output")
    assert_close_at(precision, values.grad, w_ref.grad.reshape(-1)[index], "values")
    assert_close_at(precision, x.grad, x_ref.grad, "input")
    assert_close_at(precision, bias.grad, b_ref.grad, "bias")


@pytest.mark.parametrize("precision", PREC)
@pytest.mark.parametrize("kind", sorted(SPARSE._CONVS))
def test_conv_values_grad_matches_dense(device, precision, kind, exact_float32, monkeypatch):
    """Pointwise (gathered, K per row, rows-matmul, channels-last, strided), strided 3×3, depthwise, grouped."""
    monkeypatch.setattr("sensitune.tuners.sparse._CHUNK_ELEMENTS", 64)  # several batch chunks
    torch.manual_seed(0)
    cin, cout, k, stride, pad, dil, groups = SPARSE._CONVS[kind]
    weight = torch.randn(cout, cin // groups, k, k, device=device)
    n = weight.numel()
    per_row = n // cout
    index = torch.randperm(n)[: max(3, n // 4)].sort().values
    if kind.endswith("k-per-row"):  # one entry in every output channel, as GPS K=1 makes
        index = torch.arange(cout) * per_row + torch.randint(0, per_row, (cout,))
    index = index.to(device)
    values = torch.randn(index.numel(), device=device, requires_grad=True)
    x = torch.randn(3, cin, 7, 7, device=device)
    if kind.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    geo = SparseIndex(index, per_row, cout)
    geo.use_rows = kind.endswith("rows-matmul")
    assert geo.per_row == (1 if kind.endswith("k-per-row") else 0)
    args = ((stride,) * 2, (pad,) * 2, (dil,) * 2, groups)
    with autocast(device, precision):
        y = SparseConv2dFunction.apply(x, weight, None, values, geo, *args)
    g = torch.randn(y.shape, device=device)
    _backward(y, g)
    w_ref = _dense(weight, index, values)
    x_ref = x.detach().clone().requires_grad_(True)
    with autocast(device, precision):
        y_ref = F.conv2d(x_ref, w_ref, None, *args)
    _backward(y_ref, g)
    assert y.dtype == y_ref.dtype and values.grad.dtype == torch.float32
    assert_close_at(precision, y, y_ref, "output")
    assert_close_at(precision, values.grad, w_ref.grad.reshape(-1)[index], "values")
    assert_close_at(precision, x.grad, x_ref.grad, "input")


@pytest.mark.parametrize("precision", PREC)
def test_sparse_vectors_and_layers_via_apply_plan_match_dense_model(device, precision, exact_float32):
    """Sparse entries of a Linear, a LayerNorm's weight and bias, a bias, a "same"-padded strided conv
    and a pointwise conv, applied with apply_plan to a model on ``device``: value gradients equal the
    dense model's gradients at the entries, and no frozen tensor gets a gradient."""
    torch.manual_seed(1)
    net = SPARSE._Net()
    shapes = SPARSE.model_shapes(net)
    picks = {"fc.weight": [0, 7, 9, 47], "fc.bias": [3], "norm.weight": [1, 6], "norm.bias": [0],
             "conv.weight": [0, 17, 70], "pw.weight": [2, 5, 11]}
    units = [SPARSE.Unit(n, "sparse", shapes[n], indices=torch.tensor(i)) for n, i in picks.items()]
    plan = SPARSE.Plan("test", units, shapes, head=["head.weight", "head.bias"])
    reference = copy.deepcopy(net).to(device)
    net.to(device)
    sensitune.apply_plan(net, plan)  # on a model already on the device: index geometry built there
    with torch.no_grad():
        for n, i in picks.items():
            mod, leaf = n.rsplit(".", 1)
            delta = getattr(net.get_submodule(mod), f"{leaf}_delta")
            delta.copy_(torch.linspace(-0.5, 0.5, len(i)))
            reference.get_parameter(n).view(-1)[torch.tensor(i, device=device)] += delta
    x, img = torch.randn(4, 6, device=device), torch.randn(4, 2, 9, 9, device=device)
    with autocast(device, precision):
        y, y_ref = net(x, img), reference(x, img)
    assert_close_at(precision, y, y_ref, "output")
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for n, i in picks.items():
        mod, leaf = n.rsplit(".", 1)
        got = getattr(net.get_submodule(mod), f"{leaf}_delta").grad
        assert got.device == device and got.dtype == torch.float32, n
        assert_close_at(precision, got, reference.get_parameter(n).grad.reshape(-1)[torch.tensor(i, device=device)], n)
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_gps_plan_applied_on_the_device_trains(device):
    """GPS puts K entries in every row: the K-per-row layout is detected for an index on the device."""
    torch.manual_seed(0)
    model = _vit().to(device)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    plan = sensitune.make_plan(model, scores, "gps", K=2)
    sensitune.apply_plan(model, plan)
    qkv = next(u for u in plan.units if u.mode == "sparse" and u.target.endswith("attn.qkv.weight"))
    rows, cols = qkv.shape
    assert SparseIndex(qkv.indices.to(device), cols, rows).per_row == 2
    model(torch.randn(2, 3, 32, 32, device=device)).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.grad is not None:
            assert p.grad.device == device and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("conv", ["conv_stem", "blocks.1.0.conv_pw"])  # 3×3/2 "same"-padded, 1×1
def test_folded_conv_lora_equals_the_side_branch(device, precision, conv, exact_float32):
    """A conv LoRA without dropout runs folded (W + B·A); output and A/B gradients equal the branch's."""
    torch.manual_seed(0)
    model = _effnet().to(device).train()
    sensitune.apply_plan(model, sensitune.make_plan(model, None, "lora", rank=3, targets=conv.replace(".", r"\.") + "$"))
    layer = model.get_submodule(conv)
    lora = layer.lora.w
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(2, layer.in_channels, 9, 9, device=device)
    with autocast(device, precision):
        folded = layer(x)
    gy = torch.randn(folded.shape, device=device)
    _backward(folded, gy)
    grads = [lora.A.grad.clone(), lora.B.grad.clone()]
    lora.zero_grad()
    with autocast(device, precision):
        base = type(layer).forward(layer, x)  # the frozen conv alone (Conv2dSame pads itself)
        branch = base + lora(pad_same(x, layer.kernel_size, layer.stride, layer.dilation))
    _backward(branch, gy)
    assert folded.dtype == branch.dtype
    assert_close_at(precision, folded, branch, "output")
    assert_close_at(precision, grads[0], lora.A.grad, "A")
    assert_close_at(precision, grads[1], lora.B.grad, "B")


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_kbit_codes_pack_and_unpack_on_the_device(device, bits):
    for count in (0, 1, 7, 9, 33, 1001, 4097):
        g = torch.Generator().manual_seed(count * 10 + bits)
        codes = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.uint8)
        packed = pack_bits(codes.to(device), bits)
        assert packed.device == device and packed.dtype == torch.uint8
        assert torch.equal(packed.cpu(), pack_bits(codes, bits)), count  # same bytes as the CPU (numpy) path
        back = unpack_bits(packed, bits, count)
        assert back.device == device and torch.equal(back.cpu(), codes), count
    if bits < 8:  # a code too wide is refused on the device too (every uint8 is a valid 8-bit code)
        with pytest.raises(ValueError, match=f"< {2 ** bits}"):
            pack_bits(torch.full((3,), 2**bits, dtype=torch.uint8, device=device), bits)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_quantised_weight_round_trips_bit_exactly_on_the_device(device, bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 17, device=device) * 0.02 + 0.001
    stored = pack_quantized(w, bits)
    assert stored["codes"].numel() == (w.numel() * bits + 7) // 8
    back = unpack_quantized(stored)
    assert back.device == device
    assert torch.equal(back, quantize_ste(w, bits))  # the training forward's weight, bit for bit
