"""SPT allocation: a hand-built score map with hand-computed results, and budgets on real architectures."""
import math
import warnings

import pytest
import timm
import torch
from torch import nn

from sensitune.planning import make_plan
from sensitune.tuners import apply_plan


class Tiny(nn.Module):
    """attn.qkv (12 x 4: q, k, v slices 4 x 4, with bias 12), fc (8 x 4, no bias), norm (4), head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(4, 12)
        self.fc = nn.Linear(4, 8, bias=False)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)[:, :4] + self.attn.qkv(x)[:, 4:8]))


# the picked entries, highest score first (flat indices into each tensor)
PICKS = [("norm.weight", 1), ("norm.weight", 3),
         ("attn.qkv.weight", 16 + 2), ("attn.qkv.weight", 16 + 9),  # two in the k slice (rows 4..7)
         ("attn.qkv.bias", 5), ("norm.bias", 0),
         ("fc.weight", 30), ("fc.weight", 7), ("fc.weight", 12),
         ("attn.qkv.weight", 0), ("attn.qkv.weight", 5), ("attn.qkv.weight", 10), ("attn.qkv.weight", 15),
         ("attn.qkv.weight", 3)]  # five in the q slice (rows 0..3)


def _scores(model):
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
    for rank, (name, idx) in enumerate(PICKS):
        scores[name].view(-1)[idx] = 30.0 - rank
    return scores


# rank 1, alpha 2, beta 2: LoRA costs q/k/v 1·(4+4) = 8 (switch at c ≥ 4), fc 1·(4+8) = 12 (c ≥ 6);
# vectors switch at c ≥ d/2: qkv.bias at 6, norm.* at 2. Totals by τ (top-τ picks):
# τ=12: norm.w whole 4 + k 2 + bias 1 + norm.b 1 + fc 3 + q 3 entries = 14;  τ=13: q has 4 → LoRA 8: total 19.
OPTS = dict(rank=1, alpha=2.0, beta=2.0)


def test_hand_computed_allocation_exact_budget():
    model = Tiny()
    plan = make_plan(model, _scores(model), "spt-lora", 19, **OPTS)
    units = {(u.target, u.mode, u.slice): u for u in plan.units if u.mode != "head"}
    assert set(units) == {("attn.qkv.weight", "lora", "q"), ("attn.qkv.weight", "sparse", None),
                          ("fc.weight", "sparse", None), ("attn.qkv.bias", "sparse", None),
                          ("norm.weight", "full", None), ("norm.bias", "sparse", None)}
    assert units[("attn.qkv.weight", "lora", "q")].slice_rows == (0, 4)
    # the q picks are dropped (the slice has its LoRA); only the k picks stay as entries
    assert units[("attn.qkv.weight", "sparse", None)].indices.tolist() == [18, 25]
    assert units[("fc.weight", "sparse", None)].indices.tolist() == [7, 12, 30]
    assert units[("attn.qkv.bias", "sparse", None)].indices.tolist() == [5]
    assert units[("norm.bias", "sparse", None)].indices.tolist() == [0]
    assert plan.num_trainable(include_head=False) == 19
    assert plan.num_trainable(include_head=True) == 19 + 10
    assert plan.stats["structured"] == 1 and plan.stats["sparse_entries"] == 7 and plan.stats["whole_vectors"] == 1
    # SPT-LoRA defaults from spt.md §3
    lora = units[("attn.qkv.weight", "lora", "q")]
    assert (lora.rank, lora.scale, lora.dropout, lora.drop_path) == (1, 1.0, 0.1, 0.1)


def test_hand_computed_below_a_jump_keeps_entries():
    model = Tiny()
    plan = make_plan(model, _scores(model), "spt-lora", 14, **OPTS)
    sparse_qkv = next(u for u in plan.units if u.target == "attn.qkv.weight" and u.mode == "sparse")
    assert sparse_qkv.indices.tolist() == [0, 5, 10, 18, 25]  # three q picks + two k picks, no LoRA
    assert not any(u.mode == "lora" for u in plan.units)
    assert plan.num_trainable(False) == 14


def test_overshooting_jump_is_trimmed_from_the_lowest_entries():
    """Budget 16: τ=12 gives 14, τ=13 gives 19; dropping the 3 lowest-scored entries (fc's) gives 16."""
    model = Tiny()
    plan = make_plan(model, _scores(model), "spt-lora", 16, **OPTS)
    assert plan.num_trainable(False) == 16
    assert not any(u.target == "fc.weight" for u in plan.units)
    assert any(u.mode == "lora" and u.slice == "q" for u in plan.units)
    assert plan.stats["trimmed_entries"] == 3


def test_adapter_cost_formula():
    # adapter on a 4-row slice at rank 1: 2·1·4 + 1 + 4 = 13 (switch at c ≥ 6.5 with alpha 2); τ=14: q has 5 < 6.5
    model = Tiny()
    plan = make_plan(model, _scores(model), "spt-adapter", 14, **OPTS)
    assert not any(u.mode == "adapter" for u in plan.units)
    plan = make_plan(model, _scores(model), "spt-adapter", 12, rank=1, alpha=1.0, beta=2.0)
    # alpha 1: the q slice (5 picks) never reaches 13 picks; fc (8 rows: 2·8+1+8 = 25) neither
    assert not any(u.mode == "adapter" for u in plan.units)
    plan = make_plan(model, _scores(model), "spt-adapter", 22, rank=1, alpha=2.6, beta=2.0)  # q switches at c ≥ 5
    ad = next(u for u in plan.units if u.mode == "adapter")
    assert (ad.slice, ad.num_params) == ("q", 13)
    assert plan.num_trainable(False) == 22
    apply_plan(model, plan)
    assert model.attn.qkv.adapter.q.down_w.shape == (1, 4)


def _grad_scores(model, size):
    model.train()
    x = torch.randn(4, 3, size, size)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    scores = {n: p.grad.detach() ** 2 for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return scores


@pytest.fixture(scope="module")
def vit_small():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, depth=3, img_size=32)
    return model, _grad_scores(model, 32)


@pytest.fixture(scope="module")
def effnet_lite0():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    return model, _grad_scores(model, 64)


@pytest.mark.parametrize("method,budget", [("spt-lora", "0.1M"), ("spt-lora", "0.5%"), ("spt-adapter", 60000)])
@pytest.mark.parametrize("arch", ["vit", "effnet"])
def test_budget_hit_within_one_percent(arch, method, budget, vit_small, effnet_lite0):
    model, scores = vit_small if arch == "vit" else effnet_lite0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = make_plan(model, scores, method, budget)
    target = plan.budget
    assert abs(plan.num_trainable(include_head=False) - target) <= 0.01 * target
    assert plan.stats["structured"] > 0 and plan.stats["sparse_entries"] > 0
    if arch == "vit":  # fused qkv is allocated per slice
        assert all(u.slice in ("q", "k", "v") for u in plan.units if u.mode != "sparse" and "qkv.weight" in u.target)
    else:  # depthwise convs never get a structured module
        assert not any(u.mode in ("lora", "adapter") and "conv_dw" in u.target for u in plan.units)


def test_budget_errors():
    model = Tiny()
    with pytest.raises(ValueError, match="must be > 0"):
        make_plan(model, _scores(model), "spt-lora", 0, **OPTS)
    with pytest.raises(ValueError, match="exceeds"):
        make_plan(model, _scores(model), "spt-lora", "5M", **OPTS)
    with pytest.raises(ValueError, match="needs a budget"):
        make_plan(model, _scores(model), "spt-lora")
    bad = _scores(model)
    bad["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="fc.weight.*shape"):
        make_plan(model, bad, "spt-lora", 10)
    with pytest.raises(ValueError, match="not a parameter"):
        make_plan(model, {"blocks.0.x": torch.zeros(1)}, "spt-lora", 10)


class _Mixed(nn.Module):
    """A fused qkv (q/k/v slices), two MLP matrices, a 3×3 conv, a depthwise conv, norms, a head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(16, 48)
        self.fc1 = nn.Linear(16, 40)
        self.fc2 = nn.Linear(40, 16, bias=False)
        self.conv = nn.Conv2d(8, 12, 3)
        self.dw = nn.Conv2d(12, 12, 3, groups=12)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)


def _plan_key(plan):
    units = sorted((u.target, u.mode, u.slice, tuple(u.indices.tolist()) if u.indices is not None else ())
                   for u in plan.units)
    return units, plan.stats


@pytest.mark.parametrize("seed", range(6))
def test_candidate_floor_gives_the_full_sort_allocation(seed, monkeypatch):
    """Sorting only the candidates above a sampled floor changes nothing, whatever the floor.

    Reference: every entry a candidate (one stable full sort per group). Compared: the default
    floor and a floor far too high (every query falls back to scans and lowered floors), on
    continuous, heavy-tailed and heavily tied scores.
    """
    from sensitune.planning import spt as spt_module

    model = _Mixed()
    g = torch.Generator().manual_seed(seed)
    kind = seed % 3
    scores = {}
    for n, p in model.named_parameters():
        if kind == 0:
            s = torch.rand(p.shape, generator=g)
        elif kind == 1:
            s = torch.randn(p.shape, generator=g).mul(3).exp()
        else:  # few distinct values: ties at every cut
            s = torch.randint(0, 6, p.shape, generator=g).float()
        scores[n] = s
    for method in ("spt-lora", "spt-adapter"):
        for budget in (10, 60, 200, 500):
            opts = dict(rank=2, alpha=4.0, beta=3.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                monkeypatch.setattr(spt_module, "CANDIDATES_PER_BUDGET", math.inf)
                ref = _plan_key(make_plan(model, scores, method, budget, **opts))
                for share in (4.0, 1e-9):  # the default and a floor at the top score
                    monkeypatch.setattr(spt_module, "CANDIDATES_PER_BUDGET", share)
                    assert _plan_key(make_plan(model, scores, method, budget, **opts)) == ref, (method, budget, share)
