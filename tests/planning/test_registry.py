"""The planner registry: names, options read off the signatures, checks made before any planning."""
from __future__ import annotations

import pytest
import timm
import torch

from sensitune.planning import PLANNERS, Plan, Planner, make_plan, register
from sensitune.planning.common import Context, head_units, make


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


def _scores(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def test_an_unknown_planner_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown method 'lroa' \(did you mean 'lora'\?\); choose one of spt-lora, "
                                         r"spt-adapter, gps, topk-sparse, linear"):
        make_plan(_vit(), None, "lroa")


def test_bound_arguments_are_fixed_by_the_name_and_are_no_options():
    model = _vit()
    scores = _scores(model)
    assert "structured" not in PLANNERS["spt-lora"].options and PLANNERS["spt-adapter"].bound == {"structured": "adapter"}
    plan = make_plan(model, scores, "spt-adapter", "5%")
    assert plan.method == "spt-adapter" and "adapter" in {u.mode for u in plan.units} and "lora" not in {u.mode for u in plan.units}
    with pytest.raises(ValueError, match=r"unknown option 'structured'; the planner spt-lora takes: rank \(int\)"):
        make_plan(model, scores, "spt-lora", "5%", structured="adapter")


def test_a_preset_that_forwards_takes_its_targets_options():
    opts = PLANNERS["bi-lora"].options
    assert opts["bits"] is int and {"targets", "head", "head_bits"} <= set(opts)
    plan = make_plan(_vit(), None, "bi-lora", head=False, targets=r"qkv")
    assert plan.units and {u.mode for u in plan.units} == {"lora"} and all(u.bits == 1 for u in plan.units)
    with pytest.raises(ValueError, match="the planner bi-lora expects bool"):
        make_plan(_vit(), None, "bi-lora", head="no")


def test_options_and_budget_are_checked_before_the_planner_runs():
    calls = []

    def head_only(ctx: Context, head_bits: int = 32, note: str | None = None) -> Plan:
        calls.append(head_bits)
        return make(ctx, "test-head-only", head_units(ctx, True, head_bits), options={"head_bits": head_bits})

    register(Planner("test-head-only", head_only))
    try:
        assert PLANNERS["test-head-only"].options == {"head_bits": int, "note": str | None}
        model = _vit()
        plan = make_plan(model, None, "test-head-only", head_bits=8, note=None)
        assert calls == [8] and {u.mode for u in plan.units} == {"head"}
        assert [u.bits for u in plan.units if len(u.shape) > 1] == [8]
        for bad, message in [({"head_bits": "8"}, "expects int"), ({"head_bits": True}, "expects int"),
                             ({"note": 3}, r"expects str \| None"), ({"bits": 8}, "unknown option 'bits'")]:
            with pytest.raises(ValueError, match=message):
                make_plan(model, None, "test-head-only", **bad)
        with pytest.raises(ValueError, match="takes no budget"):
            make_plan(model, None, "test-head-only", "1%")
        assert calls == [8]  # no refused call reached the function
        with pytest.raises(ValueError, match="registered twice"):
            register(Planner("test-head-only", head_only))
    finally:
        PLANNERS.pop("test-head-only")


def test_a_planner_whose_options_cannot_be_listed_is_refused_at_registration():
    def loose(ctx, **kw):  # where would **kw go?
        return None

    with pytest.raises(ValueError, match=r"cannot be read off its signature"):
        Planner("loose", loose)
    with pytest.raises(ValueError, match="a scoreless planner takes none"):
        Planner("sized", lambda ctx: None, budget="required")
    assert "loose" not in PLANNERS


def test_a_scored_planner_without_scores_or_budget_is_refused():
    with pytest.raises(ValueError, match="needs scores"):
        make_plan(_vit(), None, "gps")
    with pytest.raises(ValueError, match=r"method 'topk-sparse' needs a budget"):
        make_plan(_vit(), _scores(_vit()), "topk-sparse")
