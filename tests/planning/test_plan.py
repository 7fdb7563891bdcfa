"""Plan: JSON + safetensors round trip, summary, budgets, presets and their errors."""
import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from sensitune.planning import METHODS, Plan, make_plan, parse_budget
from sensitune.planning.plan import index_key


def _vit(depth=2, classes=5):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth, num_classes=classes)


def _scores(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=g) ** 6 for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["spt-lora", "gps", "bi-lora", "adaptformer", "linear"])
def test_save_load_round_trip(tmp_path, method):
    model = _vit()
    plan = make_plan(model, _scores(model), method, "2%" if method == "spt-lora" else None)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert [u.indices.tolist() if u.indices is not None else None for u in again.units] == \
           [u.indices.tolist() if u.indices is not None else None for u in plan.units]
    assert again.num_trainable(True) == plan.num_trainable(True)
    assert not list(tmp_path.glob("*.tmp"))


def test_from_json_rebuilds_the_plan_and_names_bad_input():
    model = _vit()
    plan = make_plan(model, _scores(model), "spt-lora", "2%")
    indices = {index_key(i, u.target): u.indices.to(torch.int32) for i, u in enumerate(plan.units) if u.mode == "sparse"}
    assert indices  # the plan mixes sparse and structured units
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())), indices)
    assert again.to_json() == plan.to_json()
    assert all(u.indices.dtype == torch.int64 and torch.equal(u.indices, v.indices)
               for u, v in zip(again.units, plan.units) if u.mode == "sparse")
    # a prefix selects the keys (a delta stores them as plan::<i>:<target>)
    prefixed = Plan.from_json(plan.to_json(), {f"plan::{k}": v for k, v in indices.items()}, prefix="plan::")
    assert prefixed.to_json() == plan.to_json()
    meta = plan.to_json()
    first_sparse = next(i for i, u in enumerate(plan.units) if u.mode == "sparse")
    with pytest.raises(ValueError, match=f"unit {first_sparse} .*has no stored indices"):
        Plan.from_json(meta, {})
    broken = json.loads(json.dumps(meta))
    del broken["units"][0]["shape"]
    with pytest.raises(ValueError, match="unit 0.*: plan unit lacks 'shape'"):
        Plan.from_json(broken, indices)
    with pytest.raises(ValueError, match="plan lacks 'tensors'"):
        Plan.from_json({k: v for k, v in meta.items() if k != "tensors"}, indices)


@pytest.mark.parametrize("shape", [4, "4", None, [[2], 3]])
def test_from_json_refuses_a_malformed_shape(shape):
    model = _vit()
    plan = make_plan(model, _scores(model), "spt-lora", "2%")
    indices = {index_key(i, u.target): u.indices for i, u in enumerate(plan.units) if u.mode == "sparse"}
    for i in (0, next(i for i, u in enumerate(plan.units) if u.mode == "sparse")):
        meta = plan.to_json()
        meta["units"][i]["shape"] = shape
        with pytest.raises(ValueError, match=f"unit {i}"):
            Plan.from_json(meta, indices)


def test_plan_without_units_is_refused(tmp_path):
    """A plan JSON missing 'units' is a broken file, not a plan that tunes nothing."""
    model = _vit()
    plan = make_plan(model, _scores(model), "linear")
    path = plan.save(tmp_path / "plan.json")
    meta = json.loads(path.read_text())
    assert Plan.from_json(meta).units == plan.units  # head units only, no indices needed
    del meta["units"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"plan\.json: plan lacks 'units'"):
        Plan.load(path)
    with pytest.raises(ValueError, match="'units' must be a list, got NoneType"):
        Plan.from_json({**meta, "units": None})


def test_indices_are_stored_narrow_and_checked(tmp_path):
    model = _vit()
    plan = make_plan(model, _scores(model), "gps")
    plan.save(tmp_path / "p.json")
    stored = load_file(str(tmp_path / "p.safetensors"))
    dtypes = {k.split(":", 1)[1]: v.dtype for k, v in stored.items()}
    assert dtypes["blocks.0.attn.qkv.weight"] == torch.int32  # 576·192 = 110,592 entries > int16
    # a side file from another save is refused
    make_plan(model, _scores(model), "gps", K=2).save(tmp_path / "q.json")
    (tmp_path / "q.safetensors").replace(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="checksum"):
        Plan.load(tmp_path / "p.json")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON plan"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a sensitune plan"):
        Plan.load(tmp_path / "other.json")


def test_summary_reports_counts():
    model = _vit()
    plan = make_plan(model, _scores(model), "spt-lora", "2%")
    text = plan.summary()
    assert f"{plan.num_trainable(True):,} with head" in text
    assert f"{plan.num_trainable(False):,} without" in text
    assert "blocks.0" in text and "head" in text and "structured modules:" in text
    m = plan.mix()
    assert m["structured_params"] + m["sparse_entries"] + sum(
        u.num_params for u in plan.units if u.mode == "full") == plan.num_trainable(False)


def test_bytes_on_disk_estimate():
    model = _vit()
    plan = make_plan(model, None, "bi-lora", head=False)
    # 2 blocks x (q, v) x (A: 32x192, B: 192x32) at 1 bit + 8 B stats each (low-bit spec §4)
    assert plan.nbytes() == 2 * 2 * 2 * (32 * 192 // 8 + 8)
    gps = make_plan(model, _scores(model), "gps", head=False)
    sparse = [u for u in gps.units if u.mode == "sparse"]
    # 4 B per value + indices packed at ceil(log2 numel) bits (delta format 3)
    assert sum(u.nbytes() for u in sparse) == sum(
        4 * u.num_params + math.ceil(u.num_params * (u.shape[0] * u.shape[1] - 1).bit_length() / 8) for u in sparse)


@pytest.mark.parametrize("text,expected", [(400000, 400000), ("0.4M", 400000), ("400k", 400000), ("1.5e5", 150000),
                                           ("0.5%", 5000), ("12", 12)])
def test_parse_budget(text, expected):
    assert parse_budget(text, backbone_params=1_000_000) == expected


@pytest.mark.parametrize("bad,match", [(0, "must be > 0"), (-5, "must be > 0"), ("0%", "must be > 0"),
                                       ("2M", "exceeds"), ("lots", "not a count"), ("1..2k", "not a count"),
                                       (True, "count or a share")])
def test_parse_budget_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(bad, backbone_params=1_000_000)


def test_presets():
    model = _vit()
    n_blocks, d = 2, 192
    lora = make_plan(model, None, "lora", head=False)
    per_block = 8 * (d + 3 * d) + 8 * (d + d) + 8 * (d + 4 * d) + 8 * (4 * d + d)  # qkv, proj, fc1, fc2
    assert lora.num_trainable() == n_blocks * per_block
    only_fc = make_plan(model, None, "lora", rank=2, targets=r"mlp\.fc1", head=False)
    assert {u.target for u in only_fc.units} == {"blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"}
    with pytest.raises(ValueError, match="match no weight matrix"):
        make_plan(model, None, "lora", targets=r"nothing_here")
    with pytest.raises(ValueError, match="unknown method"):
        make_plan(model, None, "magic")
    with pytest.raises(ValueError, match=r"unknown option 'rnk' \(did you mean 'rank'\?\); the planner lora takes: rank"):
        make_plan(model, None, "lora", rnk=4)
    bitfit = make_plan(model, None, "bitfit")
    assert all(u.target.endswith("bias") for u in bitfit.units if u.mode != "head")
    assert make_plan(model, None, "linear").num_trainable(False) == 0
    assert make_plan(model, None, "full").num_trainable(True) == sum(p.numel() for p in model.parameters())
    af = make_plan(model, None, "bi-adaptformer")
    assert [(u.target, u.rank, u.bits) for u in af.units if u.mode == "adaptformer"] == [
        ("blocks.0", 32, 1), ("blocks.1", 32, 1)]
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    pw = make_plan(cnn, None, "lora", head=False)
    assert pw.units and all(u.shape[2:] == (1, 1) for u in pw.units)
    assert set(METHODS) >= {"spt-lora", "spt-adapter", "gps", "topk-sparse", "linear", "full", "bitfit", "lora",
                            "adapter", "adaptformer", "bi-lora", "bi-adaptformer"}
