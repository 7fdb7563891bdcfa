"""apply_plan: trainables match the plan for every method; modules compute what they claim; merge; errors."""
import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same

from sensitune.planning import METHODS, Plan, make_plan
from sensitune.tuners import apply_plan, merge, trainable_parameters, unmerge
from sensitune.tuners.host import _lora_in_weight, tuning_of
from sensitune.tuners.quant import quantize_ste


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5, **kw)


def _effnet():
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)


def _scores(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=g) ** 8 for n, p in model.named_parameters()}


_BUDGETS = {"spt-lora": "2%", "spt-adapter": "2%", "topk-sparse": "0.5%"}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return _vit()


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return _effnet()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vit", "effnet"])
def test_trainables_equal_plan(method, arch, vit, effnet, request):
    base = vit if arch == "vit" else effnet
    model = copy.deepcopy(base)
    plan = make_plan(model, _scores(model), method, _BUDGETS.get(method))
    apply_plan(model, plan)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == plan.num_trainable(include_head=True)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(plan.head[0].rsplit(".", 1)[0] + "."))
    assert plan.num_trainable(include_head=False) == plan.num_trainable(True) - head
    assert {n for n, _, _ in plan.parameters()} == set(trainable)
    roles = {n: r for n, _, r in trainable_parameters(model)}
    assert set(roles) == set(trainable)
    # every trainable receives a gradient; nothing else does
    x = torch.randn(2, 3, 32, 32) if arch == "vit" else torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_lora_slices_forward_is_manual_computation():
    model = _vit()
    ref = copy.deepcopy(model)
    plan = make_plan(model, None, "lora", rank=4, slices="qv", targets=r"attn\.qkv")
    apply_plan(model, plan)
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        for lora in qkv.lora.values():
            lora.B.normal_()
    x = torch.randn(3, 10, 192)
    expected = F.linear(x, ref.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.bias)
    expected[..., 0:192] += x @ qkv.lora.q.A.t() @ qkv.lora.q.B.t()
    expected[..., 384:576] += x @ qkv.lora.v.A.t() @ qkv.lora.v.B.t()
    torch.testing.assert_close(qkv(x), expected)
    assert set(qkv.lora.keys()) == {"q", "v"}


@pytest.mark.parametrize("conv", ["conv_stem", "blocks.1.0.conv_pw"])  # 3×3/2 "same"-padded, 1×1
def test_conv_lora_folded_into_the_weight_matches_the_branch(conv):
    """Without dropout a conv's LoRA runs as W + B·A; output and A/B gradients equal the side branch's."""
    torch.manual_seed(0)
    model = _effnet().double().train()
    plan = make_plan(model, None, "lora", rank=3, targets=conv.replace(".", r"\.") + "$")
    apply_plan(model, plan)
    layer = model.get_submodule(conv)
    lora = layer.lora.w
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(2, layer.in_channels, 9, 9, dtype=torch.float64)
    gy = torch.randn_like(layer(x))
    assert _lora_in_weight(layer, tuning_of(layer))
    folded = layer(x)
    folded.backward(gy)
    grads = [lora.A.grad.clone(), lora.B.grad.clone()]
    lora.zero_grad()
    base = type(layer).forward(layer, x)  # the frozen conv alone (Conv2dSame pads itself)
    x_conv = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)  # TF "same" (a no-op for 1×1)
    branch = base + lora(x_conv)
    branch.backward(gy)
    torch.testing.assert_close(folded, branch)
    torch.testing.assert_close(grads, [lora.A.grad, lora.B.grad])
    assert lora.is_linear()
    lora.dropout = torch.nn.Dropout(0.5)  # dropout on x only: not a weight delta while training
    assert not lora.is_linear()
    assert lora.eval().is_linear()


def test_low_bit_lora_uses_quantized_weights_and_nonzero_init():
    model = _vit()
    plan = make_plan(model, None, "bi-lora")
    apply_plan(model, plan)
    qkv = model.blocks[1].attn.qkv
    lora = qkv.lora.v
    assert lora.rank == 32 and lora.bits == 1
    assert lora.B.abs().max() > 0 and lora.B.abs().max() <= 2e-3 + 1e-9  # trunc-normal std 1e-3
    lora.eval()
    x = torch.randn(4, 192)
    expected = F.linear(F.linear(x, quantize_ste(lora.A, 1)), quantize_ste(lora.B, 1))
    torch.testing.assert_close(lora(x), expected)
    assert {u.slice for u in plan.units if u.mode == "lora"} == {"q", "v"}


def test_adaptformer_vit_reads_input_before_norm2():
    model = _vit().eval()
    ref = copy.deepcopy(model)
    apply_plan(model, make_plan(model, None, "adaptformer", rank=4, scale=0.5))
    blk, rblk = model.blocks[0], ref.blocks[0]
    with torch.no_grad():
        blk.adaptformer.up_w.normal_()
    x = torch.randn(2, 5, 192)
    mid = x + rblk.drop_path1(rblk.ls1(rblk.attn(rblk.norm1(x))))
    out = mid + rblk.drop_path2(rblk.ls2(rblk.mlp(rblk.norm2(mid))))
    ad = blk.adaptformer
    expected = out + 0.5 * F.linear(F.relu(F.linear(mid, ad.down_w)), ad.up_w)
    torch.testing.assert_close(blk(x), expected)


def test_adaptformer_cnn_is_parallel_to_each_block():
    model = _effnet().eval()
    ref = copy.deepcopy(model)
    plan = make_plan(model, None, "adaptformer", rank=2)
    n_blocks = sum(len(stage) for stage in model.blocks)
    assert sum(u.mode == "adaptformer" for u in plan.units) == n_blocks
    apply_plan(model, plan)
    blk, rblk = model.blocks[1][0], ref.blocks[1][0]  # 16 -> 24 channels, stride 2
    with torch.no_grad():
        blk.adaptformer.up_w.normal_()
    x = torch.randn(2, 16, 16, 16)
    ad = blk.adaptformer
    side = F.conv2d(F.relu(F.conv2d(x, ad.down_w[:, :, None, None], stride=2)), ad.up_w[:, :, None, None])
    torch.testing.assert_close(blk(x), rblk(x) + side)


@pytest.mark.parametrize("arch", ["vit", "effnet"])
def test_merge_equals_unmerged_and_unmerge_restores_bit_exact(arch):
    model = _vit() if arch == "vit" else _effnet()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = _scores(model)
    plan = make_plan(model, scores, "spt-lora", "3%", dropout=0.0, drop_path=0.0, head_bits=1)
    assert plan.stats["structured"] > 0 and plan.stats["sparse_entries"] > 0
    apply_plan(model, plan)
    with torch.no_grad():
        for name, p, role in trainable_parameters(model):
            if role in ("sparse", "lora_B"):
                p.normal_(std=0.05)
    model.eval()
    x = torch.randn(2, 3, 32, 32) if arch == "vit" else torch.randn(2, 3, 64, 64)
    y = model(x)
    merge(model)
    changed = [n for n in original if not torch.equal(model.get_parameter(n), original[n])]
    assert changed  # the deltas really were folded into the base weights
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    unmerge(model)
    assert all(torch.equal(model.get_parameter(n), original[n]) for n in original)
    torch.testing.assert_close(model(x), y, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["gps", "spt-lora", "lora", "spt-adapter"])
def test_optimizer_state_only_for_trainables_and_frozen_bit_exact(method):
    model = _vit()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = make_plan(model, _scores(model), method, _BUDGETS.get(method))
    apply_plan(model, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
        opt.step()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert state_numel == 2 * plan.num_trainable(True)
    trained = {n for n, _, _ in plan.parameters()}
    for n, p in model.named_parameters():
        if n in frozen and n not in trained:
            assert torch.equal(p, frozen[n]), n  # bit-exact despite weight decay
    assert any(not torch.equal(model.get_parameter(n), frozen[n]) for n in trained if n in frozen) or method != "gps"


def test_plan_for_another_model_is_refused():
    plan = make_plan(_vit(), None, "lora")
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=5)
    with pytest.raises(ValueError, match="different model"):
        apply_plan(other, plan)
    wrong_head = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7)
    with pytest.raises(ValueError, match=r"shape mismatches \(e.g. head.weight"):
        apply_plan(wrong_head, plan)
    model = _vit()
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="already has a plan"):
        apply_plan(model, plan)


def test_state_dict_names_are_kept():
    model = _vit()
    names = set(model.state_dict())
    apply_plan(model, make_plan(model, _scores(model), "spt-lora", "2%"))
    new = set(model.state_dict())
    assert names <= new
    assert all(n.endswith(("_delta", "_delta_index", ".A", ".B")) for n in new - names)


def _moved(model, seed=1):
    """Move every trainable (LoRA B and adapter ups start at zero) so a copy that ran someone
    else's tensors could not match by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _pickled(model):
    # our own bytes, made a line above: what torch.save(model) / multiprocessing do with a model
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("copier", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["vit", "effnet"])
def test_a_copy_of_a_tuned_model_runs_its_own_tensors(copier, method, arch, vit, effnet):
    """A deepcopy used to run the original's AdaptFormer (its hooks were closures, shared by
    deepcopy), and pickle could not restore the tuned forward (a bound method)."""
    base = vit if arch == "vit" else effnet
    model = copy.deepcopy(base)
    apply_plan(model, make_plan(model, _scores(model), method, _BUDGETS.get(method)))
    _moved(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        clone = copier(model)
        torch.testing.assert_close(clone(x), y, atol=0, rtol=0)
        _moved(clone, seed=2)
        assert not torch.equal(clone(x), y)  # the clone's forward reads the clone's tensors
        torch.testing.assert_close(model(x), y, atol=0, rtol=0)  # and leaves the original alone
