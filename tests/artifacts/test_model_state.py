"""The one tuned-state object on a model (sensitune.state.ModelState): who sets which field, and
that copies, merges, loads and task banks carry or clear it as they should."""
from __future__ import annotations

import copy

import pytest
import torch

from sensitune.artifacts import DeltaError, TaskBank, load_delta, merge, read_delta, save_delta
from sensitune.artifacts.delta import quantised_params
from sensitune.models import create_backbone, data_config
from sensitune.state import STATE_ATTR, ModelState, find_state, source_of, state_of
from sensitune.tuners import applied_plan, apply_plan
from sensitune.tuners import merge as merge_in_place
from sensitune.tuners import unmerge
from sensitune.tuners.host import TUNING_ATTR, tuning_of

from .helpers import images, make_plan, trained, tuned_vit, units_for, vit

VIT = "vit_tiny_patch16_224"


def _backbone():
    torch.manual_seed(0)
    return create_backbone(VIT, 5, pretrained="none", img_size=32, depth=2).eval()


def _sensitune_attrs(module) -> list[str]:
    return [k for k in module.__dict__ if "sensitune" in k]


def test_a_plain_model_has_no_state():
    model = vit()
    assert find_state(model) is None and applied_plan(model) is None and source_of(model) == {}
    assert _sensitune_attrs(model) == []
    assert not any(tuning_of(m) for m in model.modules())


def test_create_backbone_records_source_and_preprocessing_in_the_state():
    model = _backbone()
    st = find_state(model)
    assert isinstance(st, ModelState) and st.plan is None and st.delta is None
    assert st.source["name"] == VIT and st.source["pretrained"] == "none" and st.source["num_classes"] == 5
    assert data_config(model)["input_size"] == tuple(st.data_config["input_size"]) == (3, 32, 32)
    assert _sensitune_attrs(model) == [STATE_ATTR]
    assert source_of(model) == st.source and source_of(model) is not st.source  # a copy: callers may edit it


def test_apply_plan_records_the_plan_in_the_existing_state_and_tunes_modules():
    model = _backbone()
    st = find_state(model)
    plan = make_plan(model, units_for("spt", model))
    apply_plan(model, plan)
    assert find_state(model) is st and st.plan is plan and applied_plan(model) is plan
    assert st.source["name"] == VIT  # what create_backbone recorded stays
    # the model-wide state in one attribute; each tuned module (the root too: a sparse pos_embed)
    # has its own Tuning in one attribute; full and head units swap nothing in a forward
    assert sorted(_sensitune_attrs(model)) == sorted([STATE_ATTR, TUNING_ATTR])
    tuned = {name for name, m in model.named_modules() if tuning_of(m) is not None}
    assert tuned == {u.module for u in plan.units if u.mode not in ("full", "head")}
    assert tuned == {"", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.norm1"}
    for name, m in model.named_modules():
        if name:
            assert _sensitune_attrs(m) == ([TUNING_ATTR] if name in tuned else []), name
    with pytest.raises(ValueError, match="already has a plan"):
        apply_plan(model, plan)


def test_deepcopy_carries_an_independent_state():
    model = tuned_vit("lora")
    twin = copy.deepcopy(model)
    st, st2 = find_state(model), find_state(twin)
    assert st2 is not st and st2.plan is not st.plan
    assert st2.plan.to_json() == st.plan.to_json()
    assert applied_plan(twin) is st2.plan
    st2.source = {"name": "edited"}
    assert st.source is None
    x = images(2)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


def test_in_place_merge_and_unmerge_keep_the_plan_and_flip_each_module():
    model = tuned_vit("lora")
    plan = applied_plan(model)
    merge_in_place(model)
    assert applied_plan(model) is plan
    flags = [st.merged for st in map(tuning_of, model.modules()) if st is not None]
    assert flags and all(flags)
    unmerge(model)
    assert applied_plan(model) is plan
    assert not any(st.merged for st in map(tuning_of, model.modules()) if st is not None)


def test_merged_copy_keeps_the_source_and_forgets_the_tuning():
    model = _backbone()
    plan = make_plan(model, units_for("lora", model))
    trained(model, plan)
    plain = merge(model)
    st = find_state(plain)
    assert st.plan is None and st.delta is None and applied_plan(plain) is None
    assert st.source == find_state(model).source and st.data_config == find_state(model).data_config
    assert applied_plan(model) is plan  # the tuned model itself is unchanged
    assert not any(TUNING_ATTR in m.__dict__ for m in plain.modules())


def test_load_delta_records_where_the_tuning_came_from(tmp_path):
    tuned = tuned_vit("bilora1")
    save_delta(tuned, tmp_path / "d", meta={"class_names": list("abcde")})
    model = load_delta(vit(), tmp_path / "d")
    st = find_state(model)
    assert st.delta.path == str(tmp_path / "d") and st.delta.method == "bilora1"
    assert st.delta.class_names == list("abcde")
    # the model runs the float copy of the plan; the state keeps the stored one with its bits
    assert {u.bits for u in st.plan.units} == {32}
    assert {u.bits for u in st.delta.plan.units} == {1, 32}
    assert st.delta.plan.to_json() == applied_plan(tuned).to_json()
    # every 1-bit weight keeps its codes, so saving again writes the same tensors
    assert set(st.delta.packed) == set(quantised_params(st.delta.plan))
    save_delta(model, tmp_path / "again", meta={"class_names": list("abcde")})
    assert (tmp_path / "again" / "delta.safetensors").read_bytes() == (tmp_path / "d" / "delta.safetensors").read_bytes()
    # merged, the copy no longer claims the delta
    assert find_state(merge(model)).delta is None


def test_load_onto_a_backbone_keeps_its_source(tmp_path):
    base = _backbone()
    save_delta(trained(base, make_plan(base, units_for("bitfit", base))), tmp_path / "d")
    model = load_delta(_backbone(), tmp_path / "d")
    st = find_state(model)
    assert st.source["name"] == VIT and st.delta.method == "handmade" and st.plan is not None


def test_a_failed_load_restores_an_existing_state(tmp_path):
    save_delta(tuned_vit("lora"), tmp_path / "d")
    model = vit(seed=5)  # another base: refused by its fingerprint ...
    st = state_of(model)
    st.source = {"name": "mine"}
    with pytest.raises(DeltaError, match="different base weights"):
        load_delta(model, tmp_path / "d")
    assert find_state(model) is st and st.plan is None and st.delta is None
    # ... and a delta that fails half-way through applying leaves the same state object as it was
    model = vit()
    st = state_of(model)
    st.source = {"name": "mine"}
    delta = read_delta(tmp_path / "d")
    key = next(k for k, info in delta.meta["tensors"].items() if "param" in info)
    delta.tensors[key] = delta.tensors[key].to(torch.int32)  # not a float: found after apply_plan ran
    with pytest.raises(DeltaError, match="expected float"):
        load_delta(model, delta)
    assert find_state(model) is st and st.plan is None and st.delta is None and st.source == {"name": "mine"}
    assert not any(TUNING_ATTR in m.__dict__ for m in model.modules())


def test_task_bank_shells_carry_their_own_state(tmp_path):
    for kind in ("lora", "bitfit"):
        save_delta(tuned_vit(kind), tmp_path / kind)
    base = vit()
    bank = TaskBank(base)
    bank.add("lora", tmp_path / "lora")
    bank.add("bitfit", tmp_path / "bitfit")
    assert applied_plan(base) is None
    for kind in ("lora", "bitfit"):
        shell = bank._task(kind).shell
        assert find_state(shell).delta.method == kind and applied_plan(shell) is not None
