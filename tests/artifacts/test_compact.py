"""The compact delta layout (format 2): size, tampering, claims that disagree, all-or-nothing loading."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensitune.artifacts import DeltaError, load_delta, read_delta, save_delta
from sensitune.artifacts.compact import pack_json, unpack_json
from sensitune.artifacts.format import META_FILE, TENSORS_FILE
from sensitune.planning import make_plan
from sensitune.state import find_state
from sensitune.tuners import applied_plan, apply_plan, get_mode, registered
from sensitune.tuners.host import TUNING_ATTR

from .fixtures.v0_1.make_fixtures import moved as _moved
from .helpers import images, lite0, tuned_vit, vit


def _edit(folder, tensors=None, meta=None, packed=None):
    t = load_file(str(folder / TENSORS_FILE))
    m = json.loads((folder / META_FILE).read_text())
    if tensors:
        tensors(t)
    if packed:
        p = unpack_json(m["packed"], "test")
        packed(p)
        m["packed"] = pack_json(p)
    if meta:
        meta(m)
    save_file(t, str(folder / TENSORS_FILE))
    (folder / META_FILE).write_text(json.dumps(m))


@pytest.mark.parametrize("mode", registered())
def test_bytes_on_disk_are_the_tensors_bytes(mode, tmp_path):
    """≤ 1.10 × the tensor minimum + 4 KiB, for every mode, with BatchNorm statistics and class names."""
    base = lite0(num_classes=10)
    units = get_mode(mode).examples(base)
    from .helpers import make_plan as plan_of

    model = _moved(apply_plan(base, plan_of(base, units, method=mode)))
    save_delta(model, tmp_path / "d", meta={"class_names": [f"class {i}" for i in range(10)]})
    st = read_delta(tmp_path / "d").storage
    on_disk = sum(p.stat().st_size for p in (tmp_path / "d").iterdir())
    assert st["on_disk_bytes"] == on_disk
    assert on_disk <= 1.10 * st["minimum_bytes"] + 4096, st
    assert len(load_file(str(tmp_path / "d" / TENSORS_FILE))) <= 12  # one tensor per part and dtype


def test_a_lite0_bi_lora_delta_is_compact(tmp_path):
    """The issue's case: a 1-bit Bi-LoRA of EfficientNet-Lite0 was 210,916 B for 142,888 B of tensors."""
    model = lite0(num_classes=10)
    _moved(apply_plan(model, make_plan(model, None, "bi-lora")))
    save_delta(model, tmp_path / "d")
    st = read_delta(tmp_path / "d").storage
    assert st["on_disk_bytes"] <= 1.10 * st["minimum_bytes"] + 4096
    assert st["safetensors_header_bytes"] < 1024 and st["json_bytes"] < 4096


@pytest.fixture
def saved(tmp_path):
    model = tuned_vit("spt")
    save_delta(model, tmp_path / "d")
    return tmp_path / "d"


def test_truncated_padded_or_retyped_group_is_refused(saved):
    _edit(saved, tensors=lambda t: t.__setitem__("sparse_values.float32", t["sparse_values.float32"][:-1].clone()))
    with pytest.raises(DeltaError, match=r"sparse_values\.float32.*plan needs"):
        read_delta(saved)


def test_retyped_group_is_refused(saved):
    _edit(saved, tensors=lambda t: t.__setitem__("lora.float64", t.pop("lora.float32").double()))
    with pytest.raises(DeltaError, match=r"unexpected tensor.*lora\.float64|missing tensor 'lora\.float32'"):
        read_delta(saved)


def test_extra_and_missing_groups_are_refused(saved, tmp_path):
    _edit(saved, tensors=lambda t: t.__setitem__("sneaky.float32", torch.zeros(2)))
    with pytest.raises(DeltaError, match="unexpected tensor.*sneaky"):
        read_delta(saved)
    save_delta(tuned_vit("spt"), tmp_path / "e")
    _edit(tmp_path / "e", tensors=lambda t: t.pop("head.float32"))
    with pytest.raises(DeltaError, match="missing tensor 'head.float32'"):
        read_delta(tmp_path / "e")


def test_corrupt_packed_metadata_is_refused(saved):
    def bad(m):
        m["packed"] = m["packed"][:-20]
    _edit(saved, meta=bad)
    with pytest.raises(DeltaError, match="packed metadata is corrupt"):
        read_delta(saved)


def test_out_of_range_indices_are_refused(tmp_path):
    """Format 2: an integer index past the target's numel."""
    saved = save_delta(tuned_vit("spt"), tmp_path / "d", format_version=2)

    def bad(t):
        idx = t["sparse_indices.int32"].clone()
        idx[-1] = 768 * 192
        t["sparse_indices.int32"] = idx
    _edit(saved, tensors=bad)
    with pytest.raises(DeltaError, match="out of range"):
        read_delta(saved)


# ----------------------------------------------------------------------------- delta.json's claims
def test_norm_stats_false_while_storing_statistics_is_refused(tmp_path):
    model = _moved(apply_plan(lite0(), make_plan(lite0(), None, "bitfit")))
    save_delta(model, tmp_path / "d", norm_stats=True)
    _edit(tmp_path / "d", meta=lambda m: m.__setitem__("norm_stats", False))
    with pytest.raises(DeltaError, match="norm_stats=false but the delta stores .* BatchNorm statistics"):
        read_delta(tmp_path / "d")


@pytest.mark.parametrize("n", [4, 6, "5", 5.0])
def test_num_classes_disagreeing_with_the_head_is_refused(saved, n):
    _edit(saved, meta=lambda m: m.__setitem__("num_classes", n))
    with pytest.raises(DeltaError, match="num_classes"):
        read_delta(saved)


def test_class_names_disagreeing_with_num_classes_are_refused(saved):
    _edit(saved, meta=lambda m: m.__setitem__("class_names", ["a", "b"]))
    with pytest.raises(DeltaError, match="2 class names for num_classes=5"):
        read_delta(saved)


# ----------------------------------------------------------------------------- all or nothing
def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()])


def _same(model, snap):
    params, buffers, grads, modules = snap
    now = _snapshot(model)
    assert list(now[0]) == list(params) and list(now[1]) == list(buffers) and now[3] == modules
    assert all(torch.equal(now[0][n], params[n]) for n in params)
    assert all(torch.equal(now[1][n], buffers[n]) for n in buffers)
    assert now[2] == grads
    assert not any(TUNING_ATTR in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert applied_plan(model) is None and (find_state(model) is None or find_state(model).delta is None)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_delta_failing_late_leaves_the_model_as_it_was(tmp_path):
    """Every parameter (the head and biases it replaces too) was written before the last statistic fails."""
    base = lite0()
    plan = make_plan(base, None, "bitfit")
    save_delta(_moved(apply_plan(base, plan)), tmp_path / "d")
    # the last BatchNorm statistic names a buffer the model does not have: found only at the very end
    _edit(tmp_path / "d", packed=lambda p: p["norm_buffers"][-1].__setitem__(0, "bn2.running_nothing"))
    model = lite0()
    with torch.no_grad():
        want = model(images(2, 64))
    snap = _snapshot(model)
    with pytest.raises(DeltaError, match="running_nothing.*no such buffer"):
        load_delta(model, tmp_path / "d")
    _same(model, snap)
    with torch.no_grad():
        assert torch.equal(model(images(2, 64)), want)


def test_a_failed_load_with_a_reset_head_and_adapters_restores_everything(tmp_path):
    """AdaptFormer hooks, LoRA modules and a head reset to the delta's class count are all undone."""
    from .helpers import make_plan as plan_of, units_for

    base = vit(0)
    units = units_for("adaptformer", base) + units_for("lora", base)[:2]
    save_delta(_moved(apply_plan(base, plan_of(base, units))), tmp_path / "d")

    def late_float_as_int(t):  # the head's float values become integers: refused when they are copied
        t["head.int32"] = t.pop("head.float32").round().to(torch.int32)

    def retype(p):
        p["dtypes"] = {"head.weight": "int32", "head.bias": "int32"}
    _edit(tmp_path / "d", tensors=late_float_as_int, packed=retype)
    model = vit(0)
    model.reset_classifier(11)  # the delta's 5 classes would reset it again
    snap = _snapshot(model)
    with pytest.raises(DeltaError, match="expected float"):
        load_delta(model, tmp_path / "d", force=True)
    _same(model, snap)
    assert model.head.out_features == 11 and model.num_classes == 11
