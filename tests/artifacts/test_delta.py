"""save_delta / load_delta: exact round trips, only trained tensors, fingerprints, tampered files."""
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensitune.artifacts import (BaseMismatchError, DeltaError, base_fingerprint, index_dtype, load_delta, read_delta,
                                 save_delta)
from sensitune.artifacts.format import META_FILE, TENSORS_FILE
from sensitune.io import index_bits
from sensitune.tuners import apply_plan, applied_plan

from .helpers import images, lite0, make_plan, to_v1, trained, tuned_vit, units_for, vit


@pytest.mark.parametrize("kind", ["lora", "spt", "bilora1", "bilora2", "bilora4", "bilora8", "adaptformer"])
def test_round_trip_is_bit_identical(tmp_path, kind):
    model = tuned_vit(kind)
    x = images()
    with torch.no_grad():
        expected = model(x)
    save_delta(model, tmp_path / "d", meta={"class_names": list("abcde")})
    loaded = load_delta(vit(0), tmp_path / "d").eval()
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected), (got - expected).abs().max()
    # the delta matters: the untuned base gives other logits
    with torch.no_grad():
        assert not torch.allclose(vit(0)(x), expected, atol=1e-4)


def test_only_trained_tensors_are_stored(tmp_path):
    model = tuned_vit("spt")
    plan = applied_plan(model)
    save_delta(model, tmp_path / "d")
    delta = read_delta(tmp_path / "d")
    params = {info["param"] for info in delta.meta["tensors"].values() if "param" in info}
    assert params == {name for name, _, _ in plan.parameters()}
    trained_numel = sum(numel for _, _, numel in plan.parameters())
    value_numel = sum(t.numel() for k, t in delta.tensors.items() if not k.startswith("plan::"))
    assert value_numel == trained_numel == plan.num_trainable(include_head=True)
    # the payload: float32 values + each sparse unit's indices packed at ceil(log2 numel) bits (format 3)
    packed = sum(math.ceil(u.indices.numel() * index_bits(u.numel) / 8) for u in plan.units if u.indices is not None)
    assert delta.storage["tensor_bytes"] == 4 * plan.num_trainable(include_head=True) + packed
    # every frozen tensor is absent (e.g. the fc1 weight whose entries are sparse)
    assert "blocks.1.mlp.fc1.weight" not in delta.tensors
    on_disk = (tmp_path / "d" / TENSORS_FILE).stat().st_size + (tmp_path / "d" / META_FILE).stat().st_size
    assert delta.storage["on_disk_bytes"] == on_disk
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [META_FILE, TENSORS_FILE]


def test_indices_use_the_narrowest_integer_type(tmp_path):
    assert [index_dtype(n) for n in (1, 256, 257, 32768, 32769, 2**31, 2**31 + 1)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32, torch.int32, torch.int64]
    model = tuned_vit("spt")
    save_delta(model, tmp_path / "d")
    delta = read_delta(tmp_path / "d")
    dtypes = {k.split(":", 3)[-1]: t.dtype for k, t in delta.tensors.items() if k.startswith("plan::")}
    # fc1: 768x192 = 147456 entries -> int32; norm1 (192) -> uint8; pos_embed 5x192 = 960 -> int16
    assert dtypes == {"blocks.1.mlp.fc1.weight": torch.int32, "blocks.1.norm1.weight": torch.uint8,
                      "pos_embed": torch.int16}
    # storage report: the index minimum is nnz * ceil(log2(numel)) bits; format 3 stores each
    # unit's indices packed at that width (whole bytes per unit), format 2 in the integer dtypes
    row = delta.storage["by_part"]["sparse_indices"]
    assert row["minimum_bytes"] == math.ceil(300 * 18 / 8 + 3 * 8 / 8 + 3 * 10 / 8)
    assert row["stored_bytes"] == math.ceil(300 * 18 / 8) + math.ceil(3 * 8 / 8) + math.ceil(3 * 10 / 8)
    save_delta(model, tmp_path / "v2", format_version=2)
    v2 = read_delta(tmp_path / "v2")
    assert v2.storage["by_part"]["sparse_indices"]["stored_bytes"] == 300 * 4 + 3 * 1 + 3 * 2
    assert {k: t.dtype for k, t in v2.tensors.items() if k.startswith("plan::")} == {
        k: t.dtype for k, t in delta.tensors.items() if k.startswith("plan::")}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_low_bit_weights_are_stored_packed(tmp_path, bits):
    model = tuned_vit(f"bilora{bits}")
    save_delta(model, tmp_path / "d")
    delta = read_delta(tmp_path / "d")
    codes = {k: t for k, t in delta.tensors.items() if k.endswith("::codes")}
    assert len(codes) == 4 + (bits == 1)  # A and B of the q and v LoRAs (+ the 1-bit head's weight)
    for key, t in codes.items():
        numel = math.prod(delta.meta["tensors"][key]["param_shape"])
        assert t.dtype == torch.uint8 and t.numel() == math.ceil(numel * bits / 8), key
    assert not any(k.endswith((".A", ".B")) for k in delta.tensors)  # no float copy of the factors
    # 1-bit head weight packed too (bilora1 uses a Bi-Head)
    assert ("head.weight::codes" in delta.tensors) == (bits == 1)


def test_reloaded_low_bit_delta_saves_its_original_codes(tmp_path):
    model = tuned_vit("bilora1")
    save_delta(model, tmp_path / "a")
    loaded = load_delta(vit(0), tmp_path / "a")
    save_delta(loaded, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / TENSORS_FILE)), load_file(str(tmp_path / "b" / TENSORS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_base_is_refused_unless_forced(tmp_path):
    save_delta(tuned_vit("lora"), tmp_path / "d")
    with pytest.raises(BaseMismatchError, match="different base weights") as info:
        load_delta(vit(seed=123), tmp_path / "d")
    assert "force=True" in str(info.value) and isinstance(info.value, DeltaError)
    plan = applied_plan(tuned_vit("lora"))  # the fingerprints it carries are the two models'
    assert info.value.want == json.loads((tmp_path / "d" / META_FILE).read_text())["base_fingerprint"]
    assert info.value.have == base_fingerprint(vit(seed=123), plan) != info.value.want
    with pytest.warns(UserWarning, match="force=True"):
        model = load_delta(vit(seed=123), tmp_path / "d", force=True)
    assert applied_plan(model) is not None


def test_a_changed_frozen_weight_is_detected_but_full_tensors_are_not_the_base(tmp_path):
    save_delta(tuned_vit("bitfit"), tmp_path / "d")
    other = vit(0)
    with torch.no_grad():  # a tensor the delta replaces does not identify the base
        other.blocks[0].mlp.fc2.bias.add_(1.0)
    load_delta(other, tmp_path / "d")
    other = vit(0)
    with torch.no_grad():  # a frozen one does
        other.blocks[1].attn.qkv.weight[0, 0] += 1e-3
    with pytest.raises(DeltaError, match="different base weights"):
        load_delta(other, tmp_path / "d")


def test_head_with_another_class_count_is_reset(tmp_path):
    save_delta(tuned_vit("lora"), tmp_path / "d")
    other = vit(0)
    other.reset_classifier(11)
    model = load_delta(other, tmp_path / "d")
    assert model.head.out_features == 5


def _rewrite(folder: Path, edit_tensors=None, edit_meta=None):
    tensors = load_file(str(folder / TENSORS_FILE))
    meta = json.loads((folder / META_FILE).read_text())
    if edit_tensors:
        edit_tensors(tensors, meta)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(folder / TENSORS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta))


def _sync(meta, tensors, key):
    meta["tensors"][key]["shape"] = list(tensors[key].shape)
    meta["tensors"][key]["dtype"] = str(tensors[key].dtype).removeprefix("torch.")


@pytest.fixture
def saved(tmp_path):
    """A delta in format 1 (one tensor per key + a manifest): the tampering tests edit single tensors."""
    save_delta(tuned_vit("spt"), tmp_path / "d")
    to_v1(tmp_path / "d", vit(0))
    return tmp_path / "d"


IDX = "plan::0:blocks.1.mlp.fc1.weight"
VALUES = "blocks.1.mlp.fc1.weight_delta"


def test_tampered_shape_names_the_key(saved):
    def grow(t, meta):
        t["head.bias"] = torch.zeros(6)
        _sync(meta, t, "head.bias")
    _rewrite(saved, grow)
    with pytest.raises(DeltaError, match=r"head.bias"):
        load_delta(vit(0), saved)


def test_shape_disagreeing_with_manifest(saved):
    def shrink(t, meta):
        t[VALUES] = t[VALUES][:-1].clone()
    _rewrite(saved, shrink)
    with pytest.raises(DeltaError, match=VALUES.replace(".", r"\.") + ".*shape"):
        read_delta(saved)


def test_indices_out_of_range(saved):
    def bad(t, meta):
        t[IDX] = t[IDX].clone()
        t[IDX][-1] = 768 * 192  # one past the end
    _rewrite(saved, bad)
    with pytest.raises(DeltaError, match=f"{IDX}.*out of range"):
        load_delta(vit(0), saved)


@pytest.mark.parametrize("shape", [4, None, "768", [[768], 192], {"rows": 768}])
def test_tampered_plan_shape_is_a_delta_error(saved, shape):
    """A malformed shape in delta.json's plan is refused as invalid (before any index check uses it)."""
    def bad(meta):
        meta["plan"]["units"][0]["shape"] = shape  # unit 0 is the sparse fc1 unit (key IDX)
    _rewrite(saved, edit_meta=bad)
    with pytest.raises(DeltaError, match=r"delta\.json.*invalid plan.*unit 0.*shape"):
        read_delta(saved).plan


def test_plan_without_units_is_a_delta_error(saved):
    def drop(meta):
        del meta["plan"]["units"]
    _rewrite(saved, edit_meta=drop)
    with pytest.raises(DeltaError, match="invalid plan.*lacks 'units'"):
        load_delta(vit(0), saved)


def test_repeated_indices_and_wrong_nnz(saved, tmp_path):
    def repeat(t, meta):
        t[IDX] = t[IDX].clone()
        t[IDX][1] = t[IDX][0]
    _rewrite(saved, repeat)
    with pytest.raises(DeltaError, match=f"{IDX} has repeated indices"):
        read_delta(saved).plan

    save_delta(tuned_vit("spt"), tmp_path / "e")
    to_v1(tmp_path / "e", vit(0))

    def nnz(meta):
        meta["plan"]["units"][0]["nnz"] += 1
    _rewrite(tmp_path / "e", edit_meta=nnz)
    with pytest.raises(DeltaError, match=f"{IDX} holds 300 indices but the plan says nnz=301"):
        read_delta(tmp_path / "e").plan


def test_missing_and_extra_keys(saved, tmp_path):
    def drop(t, meta):
        del t["head.weight"]
    _rewrite(saved, drop)
    with pytest.raises(DeltaError, match=r"missing tensor.*head\.weight"):
        read_delta(saved)

    save_delta(tuned_vit("spt"), tmp_path / "e")
    to_v1(tmp_path / "e", vit(0))

    def extra(t, meta):
        t["blocks.0.attn.qkv.weight"] = torch.zeros(3)
        meta["tensors"]["blocks.0.attn.qkv.weight"] = {"dtype": "float32", "shape": [3], "param": "blocks.0.attn.qkv.weight",
                                                         "part": "full", "role": "full", "unit": 0}
    _rewrite(tmp_path / "e", extra)
    with pytest.raises(DeltaError, match=r"blocks\.0\.attn\.qkv\.weight.*does not train"):
        load_delta(vit(0), tmp_path / "e")

    save_delta(tuned_vit("spt"), tmp_path / "f")
    to_v1(tmp_path / "f", vit(0))

    def unlisted(t, meta):
        t["sneaky"] = torch.zeros(2)
    _rewrite(tmp_path / "f", unlisted)
    with pytest.raises(DeltaError, match="unexpected tensor.*sneaky"):
        read_delta(tmp_path / "f")


def test_wrong_dtype(saved):
    def to_int(t, meta):
        t[VALUES] = t[VALUES].to(torch.int32)
        _sync(meta, t, VALUES)
    _rewrite(saved, to_int)
    with pytest.raises(DeltaError, match=f"{VALUES}.*int32"):
        load_delta(vit(0), saved)

    def float_idx(t, meta):
        t[IDX] = t[IDX].to(torch.float32)
        _sync(meta, t, IDX)
    _rewrite(saved, float_idx)
    with pytest.raises(DeltaError, match=f"{IDX}.*integer"):
        load_delta(vit(0), saved)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.marker),))


def test_a_pickle_is_never_executed(saved, tmp_path):
    _Boom.marker = str(tmp_path / "pwned")
    (saved / TENSORS_FILE).write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(DeltaError, match="not a readable safetensors"):
        load_delta(vit(0), saved)
    assert not (tmp_path / "pwned").exists()


def test_not_a_delta(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_delta(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a delta"):
        read_delta(tmp_path / "x")
    (tmp_path / "x" / META_FILE).write_text("[1, 2")
    with pytest.raises(DeltaError, match="not valid JSON"):
        read_delta(tmp_path / "x")
    (tmp_path / "x" / META_FILE).write_text(json.dumps({"format": "sensitune-delta", "format_version": 99}))
    with pytest.raises(DeltaError, match="version 99"):
        read_delta(tmp_path / "x")


def test_save_is_atomic(tmp_path):
    out = tmp_path / "d"
    save_delta(tuned_vit("lora"), out)
    before = (out / TENSORS_FILE).read_bytes()
    model = tuned_vit("lora")
    del model.blocks[1].mlp.fc1.lora  # the model no longer carries what its plan trains
    with pytest.raises(ValueError, match="no parameter"):
        save_delta(model, out)
    assert (out / TENSORS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind
    save_delta(tuned_vit("lora", train_seed=5), out)  # replacing works
    assert (out / TENSORS_FILE).read_bytes() != before


def test_batchnorm_statistics_travel_with_the_delta(tmp_path):
    """EfficientNet-Lite0 (random init): training in train mode moves BN statistics."""
    from sensitune.planning.plan import Unit, model_shapes

    base = lite0()
    s = model_shapes(base)
    w = "blocks.1.0.conv_pwl.weight"
    units = [Unit(w, "lora", s[w], rank=2), Unit("blocks.2.0.conv_pw.weight", "sparse", s["blocks.2.0.conv_pw.weight"],
                                                  indices=torch.arange(0, 500, 7)),
             Unit("classifier.weight", "head", s["classifier.weight"]), Unit("classifier.bias", "head", s["classifier.bias"])]
    model = trained(base, make_plan(base, units))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_delta(model, tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(load_delta(lite0(), tmp_path / "d")(x), expected)
    assert read_delta(tmp_path / "d").storage["by_part"]["norm_stats"]["tensors"] > 0
    save_delta(model, tmp_path / "frozen_bn", norm_stats=False)
    # the statistics moved but this delta leaves them out: a fresh base's differ, so it is refused
    with pytest.raises(DeltaError, match="different base weights"):
        load_delta(lite0(), tmp_path / "frozen_bn")
    with pytest.warns(UserWarning, match="force=True"), torch.no_grad():
        assert not torch.allclose(load_delta(lite0(), tmp_path / "frozen_bn", force=True)(x), expected, atol=1e-4)


def _perturbed_bn_base():
    base = lite0()
    bn = base.bn1  # the stem BatchNorm, which every output passes through
    with torch.no_grad():
        bn.running_mean.add_(0.5)
    return base


def test_a_delta_without_norm_stats_relies_on_the_base_statistics(tmp_path):
    """BN kept frozen (norm_stats=False): the base's running statistics are part of the fingerprint."""
    from sensitune.artifacts import base_fingerprint
    from sensitune.planning.plan import Unit, model_shapes

    base = lite0()
    s = model_shapes(base)
    w = "blocks.1.0.conv_pwl.weight"
    units = [Unit(w, "lora", s[w], rank=2), Unit("classifier.weight", "head", s["classifier.weight"]),
             Unit("classifier.bias", "head", s["classifier.bias"])]
    plan = make_plan(base, units)
    model = trained(base, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_delta(model, tmp_path / "frozen", norm_stats=False)
    save_delta(model, tmp_path / "with_stats")
    assert read_delta(tmp_path / "frozen").meta["norm_stats"] is False
    with torch.no_grad():  # the untouched base: both load and reproduce the outputs
        assert torch.equal(load_delta(lite0(), tmp_path / "frozen")(x), expected)
    with pytest.raises(DeltaError, match="different base weights.*force=True"):
        load_delta(_perturbed_bn_base(), tmp_path / "frozen")
    with pytest.warns(UserWarning, match="applying anyway because force=True"):
        load_delta(_perturbed_bn_base(), tmp_path / "frozen", force=True)
    with torch.no_grad():  # the delta's own statistics replace the perturbed ones
        assert torch.equal(load_delta(_perturbed_bn_base(), tmp_path / "with_stats")(x), expected)

    # a delta.json from before the 'norm_stats' field: the old rule (statistics never fingerprinted)
    def old(meta):
        del meta["norm_stats"]
        meta["base_fingerprint"] = base_fingerprint(lite0(), plan, delta_has_norm_stats=True)
    _rewrite(tmp_path / "frozen", edit_meta=old)
    load_delta(_perturbed_bn_base(), tmp_path / "frozen")


def test_plan_is_required(tmp_path):
    with pytest.raises(ValueError, match="needs the plan"):
        save_delta(vit(0), tmp_path / "d")
    model = apply_plan(vit(0), make_plan(vit(0), units_for("linear", vit(0))))
    save_delta(model, tmp_path / "d", meta={"class_names": ["a", "b", "c", "d", "e"], "task": "x"})
    delta = read_delta(tmp_path / "d")
    assert delta.class_names == list("abcde") and delta.meta["extra"] == {"task": "x"}
    assert delta.meta["sensitune_version"] and delta.meta["format_version"] == 3
    with pytest.raises(ValueError, match="3 names but the head has 5"):
        save_delta(model, tmp_path / "e", meta={"class_names": ["a", "b", "c"]})


def _method_plan(model, method):
    from sensitune.planning import make_plan

    g = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    budget = {"spt-lora": 20000, "spt-adapter": 20000, "topk-sparse": 3000}.get(method)
    options = {"gps": {"K": 1}}.get(method, {})
    return make_plan(model, scores, method, budget=budget, **options)


@pytest.mark.parametrize("method", ["linear", "full", "bitfit", "lora", "adapter", "adaptformer", "bi-lora",
                                    "bi-adaptformer", "gps", "topk-sparse", "spt-lora", "spt-adapter"])
def test_every_method_round_trips(tmp_path, method):
    base = vit(0)
    model = trained(base, _method_plan(vit(0), method))
    x = images(2)
    with torch.no_grad():
        expected = model(x)
    save_delta(model, tmp_path / "d")
    delta = read_delta(tmp_path / "d")
    assert delta.method == method
    with torch.no_grad():
        assert torch.equal(load_delta(vit(0), tmp_path / "d").eval()(x), expected)
    if method != "full":  # a delta is small: only what was trained
        assert delta.storage["tensor_bytes"] < 0.5 * 4 * sum(p.numel() for p in vit(0).parameters())


def test_hugging_face_backbone_rebuilt_by_name(tmp_path):
    """An ``hf:<local dir>`` backbone: the delta rebuilds it from its recorded name; merge keeps
    the backbone's own logits wrapper but no tuning code."""
    transformers = pytest.importorskip("transformers")
    from sensitune.artifacts import merge
    from sensitune.artifacts.merge import is_plain
    from sensitune.models import create_backbone
    from sensitune.planning import make_plan

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=4)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    base = create_backbone(f"hf:{tmp_path / 'hf'}", 3)
    model = trained(base, make_plan(base, None, "lora", rank=2))
    x = images(2)
    with torch.no_grad():
        expected = model(x)
    save_delta(model, tmp_path / "d")
    assert read_delta(tmp_path / "d").meta["backbone"]["pretrained"] == "auto"
    with torch.no_grad():
        assert torch.equal(load_delta(None, tmp_path / "d").eval()(x), expected)
        plain = merge(model).eval()
        assert is_plain(plain) == []
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)
