"""Tests of the k-bit quantiser: codebook, STE forward/backward, codes, storage, round trip."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from sensitune.tuners.quant import (
    EPS,
    QuantLinear,
    bi_head,
    codebook,
    dequantize,
    head_nbytes,
    pack_quantized,
    packed_nbytes,
    quantize_codes,
    quantize_ste,
    storage_nbytes,
    thresholds,
    unpack_quantized,
)

QBITS = (1, 2, 4, 8)
N01 = NormalDist()


# ------------------------------------------------------------------ codebook
def test_codebook_reproduces_the_spec_numbers():
    assert torch.allclose(codebook(1, torch.float64), torch.tensor([-0.6745, 0.6745], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(
        codebook(2, torch.float64), torch.tensor([-1.2657, -0.3778, 0.3778, 1.2657], dtype=torch.float64), atol=1e-4
    )
    assert torch.allclose(thresholds(2, torch.float64), torch.tensor([-0.8217, 0.0, 0.8217], dtype=torch.float64), atol=1e-4)
    four = codebook(4, torch.float64)
    assert four.numel() == 16
    assert abs(four[-1].item() - 2.2655) < 1e-4 and abs(four[0].item() + 2.2655) < 1e-4


@pytest.mark.parametrize("bits", QBITS)
def test_every_level_is_the_probability_median_of_its_bin(bits):
    """Checked with the standard library's normal distribution, independent of torch.special."""
    levels = codebook(bits, torch.float64).tolist()
    edges = thresholds(bits, torch.float64).tolist()
    assert len(levels) == 2**bits and len(edges) == 2**bits - 1
    assert all(a < b for a, b in zip(levels, levels[1:]))
    for i, t in enumerate(edges):
        assert t == pytest.approx((levels[i] + levels[i + 1]) / 2, abs=1e-12)
    cdf = [0.0] + [N01.cdf(t) for t in edges] + [1.0]
    for i, v in enumerate(levels):
        assert N01.cdf(v) == pytest.approx((cdf[i] + cdf[i + 1]) / 2, abs=1e-9)
    assert levels == pytest.approx([-v for v in reversed(levels)], abs=1e-12)


@pytest.mark.parametrize("bad", [0, 3, 16, 64, 1.0, True, "4"])
def test_unsupported_bits_are_refused(bad):
    with pytest.raises(ValueError, match="bits"):
        quantize_ste(torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match="bits"):
        codebook(bad)


def test_32_bits_has_no_codebook_but_is_identity_in_ste():
    w = torch.randn(5, 3)
    assert quantize_ste(w, 32) is w
    with pytest.raises(ValueError, match="32"):
        codebook(32)
    with pytest.raises(ValueError, match="32"):
        quantize_codes(w, 32)


# ------------------------------------------------------------------ forward
def test_one_bit_forward_is_mu_plus_sign_times_0_6745_sigma():
    torch.manual_seed(0)
    w = torch.randn(16, 24) * 0.3 + 0.1
    mu, sigma = w.mean(), w.std()
    expected = mu + torch.where(w > mu, 1.0, -1.0) * codebook(1)[1] * sigma
    assert torch.allclose(quantize_ste(w, 1), expected, atol=1e-6)


@pytest.mark.parametrize("bits", QBITS)
def test_forward_snaps_every_entry_to_the_nearest_scaled_level(bits):
    """Brute force: argmin over all levels of |Ŵ − v| (independent of bucketize)."""
    torch.manual_seed(bits)
    w = torch.randn(37, 11, dtype=torch.float64) * 2.0 - 0.5
    mu, sigma = w.mean(), w.std()
    w_hat = (w - mu) / (sigma + EPS)
    levels = codebook(bits, torch.float64)
    nearest = levels[(w_hat.unsqueeze(-1) - levels).abs().argmin(-1)]
    out = quantize_ste(w, bits)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.allclose(out, nearest * sigma + mu, atol=1e-12)
    assert len(torch.unique(out)) <= 2**bits


@pytest.mark.parametrize("bits", QBITS)
def test_quantized_forward_equals_forward_with_explicitly_dequantized_weight(bits):
    torch.manual_seed(10 + bits)
    layer = torch.nn.Linear(19, 7, bias=True)
    x = torch.randn(5, 19)
    y_quant = torch.nn.functional.linear(x, quantize_ste(layer.weight, bits), layer.bias)
    codes, mu, sigma = quantize_codes(layer.weight, bits)
    assert codes.dtype == torch.uint8 and codes.shape == layer.weight.shape
    assert int(codes.max()) < 2**bits
    w_deq = dequantize(codes, mu, sigma, bits)
    assert torch.equal(w_deq, quantize_ste(layer.weight, bits))
    y_deq = torch.nn.functional.linear(x, w_deq, layer.bias)
    assert torch.equal(y_quant, y_deq)


def test_constant_weight_does_not_divide_by_zero():
    w = torch.full((4, 4), 0.25)
    out = quantize_ste(w, 2)
    assert torch.isfinite(out).all() and torch.allclose(out, w)


def test_too_small_or_integer_weight_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        quantize_ste(torch.ones(1, 1), 1)
    with pytest.raises(TypeError, match="floating"):
        quantize_ste(torch.ones(3, 3, dtype=torch.int64), 1)


# ------------------------------------------------------------------ STE gradient
@pytest.mark.parametrize("bits", QBITS)
def test_ste_gradient_matches_explicit_detach_expression(bits):
    """dL/dW through quantize_ste == autograd of Ŵ + (Q(Ŵ) − Ŵ).detach() written out by hand."""
    torch.manual_seed(20 + bits)
    w0 = torch.randn(9, 13, dtype=torch.float64)
    target = torch.randn(9, 13, dtype=torch.float64)
    levels = codebook(bits, torch.float64)

    w1 = w0.clone().requires_grad_(True)
    loss1 = ((quantize_ste(w1, bits) - target) ** 2 * torch.arange(13.0, dtype=torch.float64)).sum()
    loss1.backward()

    w2 = w0.clone().requires_grad_(True)
    mu = w2.sum() / w2.numel()
    sigma = torch.sqrt(((w2 - mu) ** 2).sum() / (w2.numel() - 1))
    w_hat = (w2 - mu) / (sigma + EPS)
    q = levels[(w_hat.detach().unsqueeze(-1) - levels).abs().argmin(-1)]
    w_q = (w_hat + (q - w_hat).detach()) * sigma + mu
    loss2 = ((w_q - target) ** 2 * torch.arange(13.0, dtype=torch.float64)).sum()
    loss2.backward()

    assert torch.allclose(loss1, loss2, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-10, rtol=1e-9)
    # the gradient is not the plain pass-through: μ and σ carry part of it
    assert not torch.allclose(w1.grad, 2 * (quantize_ste(w0, bits) - target) * torch.arange(13.0, dtype=torch.float64))


def test_ste_gradient_of_a_sum_matches_hand_derivation():
    """L = Σ_j (Q(Ŵ_j)·σ + μ). With STE, the Ŵ path contributes σ·Σ_j ∂Ŵ_j/∂W_i = 0 (Ŵ sums to
    zero and its σ-derivative cancels), the μ path gives 1, and σ in the rescale gives
    S·∂σ/∂W_i with S = Σ_j Q(Ŵ_j) and ∂σ/∂W_i = (W_i − μ)/((N − 1)·σ)."""
    torch.manual_seed(3)
    w = (torch.randn(6, 7, dtype=torch.float64) ** 2).requires_grad_(True)  # skewed: unbalanced signs
    quantize_ste(w, 1).sum().backward()
    with torch.no_grad():
        n, mu, sigma = w.numel(), w.mean(), w.std()
        s = ((quantize_ste(w, 1) - mu) / sigma).sum()
        expected = 1 + s * (w - mu) / ((n - 1) * sigma)
    assert torch.allclose(w.grad, expected, atol=1e-6)
    assert s.abs() > 0.5  # the σ term is really exercised


# ------------------------------------------------------------------ storage bytes
@pytest.fixture(scope="module")
def vit_b16():
    timm = pytest.importorskip("timm")
    try:
        with torch.device("meta"):  # shapes only: no 86M-parameter init
            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    except RuntimeError:  # timm before 1.0.21 calls .item() while building a ViT
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


def _vit_shapes(model):
    from sensitune.models import tunable_tensors

    infos = tunable_tensors(model)
    fc1 = [i for i in infos if i.kind == "matrix" and i.role == "mlp.fc1"]
    qkv = [i for i in infos if i.kind == "matrix" and i.slices]
    head = next(i for i in infos if i.kind == "head" and i.is_weight)
    return fc1, qkv, head


def test_packed_nbytes_formula():
    assert packed_nbytes(8, 1) == 1 + 8
    assert packed_nbytes(9, 1) == 2 + 8
    assert packed_nbytes(3, 2) == 1 + 8
    assert packed_nbytes(3, 4) == 2 + 8
    assert packed_nbytes(3, 8) == 3 + 8
    assert packed_nbytes(3, 32) == 12  # float32 as is, no statistics
    assert head_nbytes(768, 100) == 4 * (768 * 100 + 100)
    assert head_nbytes(768, 100, bits=1, bias=False) == 768 * 100 // 8 + 8


def test_storage_bytes_vit_b16_adaptformer_and_lora_from_shapes(vit_b16):
    fc1, qkv, head = _vit_shapes(vit_b16)
    assert len(fc1) == 12 and len(qkv) == 12
    r = 32
    # AdaptFormer: down (r × d) and up (d × r) on the MLP input width of every block
    adaptformer = [((r, i.shape[1]), 1) for i in fc1] + [((i.shape[1], r), 1) for i in fc1]
    # LoRA on the q and v slices of every fused qkv: A (r × in) and B (rows × r)
    lora = []
    for i in qkv:
        for name in ("q", "v"):
            lora += [((r, i.shape[1]), 1), ((i.slice(name).rows, r), 1)]
    assert storage_nbytes(adaptformer) == 73_920
    assert storage_nbytes(lora) == 147_840
    d, c = head.shape[1], head.shape[0]
    assert (d, c) == (768, 100)
    assert storage_nbytes(adaptformer, head=(d, c)) == 73_920 + 4 * (768 * 100 + 100)
    assert storage_nbytes(adaptformer, head=(d, c), bi_head=True) == 73_920 + 9_600 + 8
    # 32-bit adapters store float32 and no statistics
    assert storage_nbytes([(s, 32) for s, _ in adaptformer]) == 4 * 12 * 2 * 32 * 768


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("bits", QBITS + (32,))
@pytest.mark.parametrize("shape", [(7, 13), (1, 5), (33, 3), (4, 3, 3, 3)])
def test_pack_quantized_round_trip_is_bit_identical(bits, shape):
    torch.manual_seed(sum(shape) + bits)
    w = torch.randn(*shape) * 0.02
    stored = pack_quantized(w, bits)
    expected = quantize_ste(w, bits)
    back = unpack_quantized(stored)
    assert back.dtype == torch.float32 and back.shape == w.shape
    assert torch.equal(back, expected)
    if bits != 32:
        nbytes = sum(stored[k].numel() * stored[k].element_size() for k in ("codes", "mu", "sigma"))
        assert nbytes == packed_nbytes(w.numel(), bits)
        assert stored["codes"].dtype == torch.uint8 and stored["mu"].dtype == torch.float32


class _TinyQuantNet(torch.nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.body = torch.nn.Linear(10, 16)
        self.down = QuantLinear(16, 4, bits=bits, bias=False)
        self.up = QuantLinear(4, 16, bits=bits, bias=False)
        self.head = QuantLinear(16, 3, bits=bits, bias=False)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h + self.up(torch.relu(self.down(h))))


@pytest.mark.parametrize("bits", QBITS + (32,))
def test_trained_model_saved_and_reloaded_gives_identical_logits(bits, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(bits)
    net = _TinyQuantNet(bits)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        logits = net(x)
    quantised = ("down", "up", "head")
    tensors = {f"{m}.{k}": v for m in quantised for k, v in pack_quantized(getattr(net, m).weight, bits).items()}
    save_file(tensors, tmp_path / "delta.safetensors")
    loaded = load_file(tmp_path / "delta.safetensors")

    fresh = _TinyQuantNet(bits)
    fresh.body.load_state_dict(net.body.state_dict())
    for m in quantised:
        layer = getattr(fresh, m)
        stored = {k.split(".", 1)[1]: v for k, v in loaded.items() if k.startswith(m + ".")}
        with torch.no_grad():
            layer.weight.copy_(unpack_quantized(stored, name=m))
        layer.bits = 32  # the stored weight is already W_q
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)


def test_unpack_quantized_reports_missing_fields():
    stored = pack_quantized(torch.randn(4, 4), 2)
    del stored["sigma"]
    with pytest.raises(KeyError, match="blocks.0.down.*sigma"):
        unpack_quantized(stored, name="blocks.0.down")
    stored = pack_quantized(torch.randn(4, 4), 2)
    stored["codes"] = stored["codes"][:-1]
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_quantized(stored)


# ------------------------------------------------------------------ layers
def test_quant_linear_uses_quantized_weight_and_bi_head_copies_the_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 5)
    q = bi_head(head)
    assert q.bias is None and q.bits == 1
    assert torch.equal(q.weight, head.weight)
    x = torch.randn(3, 12)
    expected = x @ quantize_ste(head.weight, 1).T
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert "bits=1" in repr(q)
    q(x).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(3, 3, bits=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bits", QBITS)
def test_dtype_is_kept_and_codes_reproduce_the_forward_in_that_dtype(dtype, bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 5, 3, dtype=dtype)  # any shape: conv LoRA factors are 4-D, this is 3-D
    out = quantize_ste(w, bits)
    assert out.dtype == dtype and out.shape == w.shape
    codes, mu, sigma = quantize_codes(w, bits)
    assert mu.dtype == dtype and codes.shape == w.shape
    assert torch.equal(dequantize(codes.reshape(-1), mu, sigma, bits, w.shape), out)


def test_dequantize_rejects_bad_codes():
    mu, sigma = torch.tensor(0.0), torch.tensor(1.0)
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        dequantize(torch.tensor([0, 4], dtype=torch.uint8), mu, sigma, 2)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.tensor([0, 1]), mu, sigma, 2)
