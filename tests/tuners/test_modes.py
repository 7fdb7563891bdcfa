"""Every registered tuning mode through every stage: attach, count, bytes, merge, save/load, export.

The matrix is built from the registry (each mode's ``examples`` units on a tiny ViT and a tiny
CNN), so a new mode is tested by being registered. Unknown modes and options must raise.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from sensitune.artifacts import DeltaError, load_delta, merge, read_delta, save_delta
from sensitune.artifacts.export import peft_parts
from sensitune.artifacts.merge import is_plain
from sensitune.planning import Plan, make_plan
from sensitune.planning.plan import Unit, model_shapes
from sensitune.tuners import apply_plan, get_mode, register, registered
from sensitune.tuners.modes import Mode, unregister

MODELS = ("test_vit", "test_efficientnet")
NUM_CLASSES = 5


def base(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {"img_size": 32} if name == "test_vit" else {}
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw).eval()


def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def plan_of(model: nn.Module, units: list[Unit], mode: str) -> Plan:
    head = [n for n, _ in model.named_parameters() if n.startswith(("head.", "classifier."))]
    return Plan(f"only-{mode}", units, model_shapes(model), head=head)


def tuned(name: str, mode: str, seed: int = 1) -> tuple[nn.Module, Plan]:
    model = base(name)
    plan = plan_of(model, get_mode(mode).examples(model), mode)
    apply_plan(model, plan)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), plan


CASES = [(name, mode) for mode in registered() for name in MODELS]


@pytest.mark.parametrize("name,mode", CASES)
def test_attach_and_count(name, mode):
    model = base(name)
    with torch.no_grad():
        before = model(x())
    units = get_mode(mode).examples(model)
    assert units and all(u.mode == mode for u in units)
    plan = plan_of(model, units, mode)
    apply_plan(model, plan)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n: k for n, _, k in plan.parameters()}
    assert sum(trainable.values()) == plan.num_trainable(True) == sum(u.num_params for u in units)
    # a new module starts as the identity (zero up-projection, unit scale, zero shift, zero delta);
    # a quantised one cannot (a 1-bit matrix of zeros has no direction), nor a replaced tensor change
    if all(u.bits == 32 for u in units):
        with torch.no_grad():
            assert torch.allclose(model(x()), before, atol=1e-6)


@pytest.mark.parametrize("name,mode", CASES)
def test_bytes_match_the_stored_tensors(name, mode, tmp_path):
    model, plan = tuned(name, mode)
    save_delta(model, tmp_path / "d", norm_stats=False)
    delta = read_delta(tmp_path / "d")
    assert delta.storage["tensor_bytes"] == plan.nbytes()
    # and the estimate is the mode's own arithmetic: 4 B per float, packed codes + 8 B stats, indices
    for u in plan.units:
        q = u.spec.quantised(u)
        floats = sum(k for n, _, k in u.parameters() if n not in q)
        codes = sum(math.ceil(k * q[n] / 8) + 8 for n, _, k in u.parameters() if n in q)
        idx = 0 if u.indices is None else math.ceil(u.indices.numel() * max(1, (u.numel - 1).bit_length()) / 8)
        assert u.nbytes() == 4 * floats + codes + idx


@pytest.mark.parametrize("name,mode", CASES)
def test_merge_or_refusal(name, mode):
    model, plan = tuned(name, mode)
    with torch.no_grad():
        want = model(x())
    if not get_mode(mode).mergeable:
        with pytest.raises(ValueError, match="non-linear"):
            merge(model)
        return
    plain = merge(model)
    assert is_plain(plain) == []
    fresh = base(name)
    fresh.load_state_dict(plain.state_dict(), strict=True)  # the base's own keys and classes
    with torch.no_grad():
        got = fresh.eval()(x())
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("name,mode", CASES)
def test_save_load_round_trip(name, mode, tmp_path):
    model, plan = tuned(name, mode)
    with torch.no_grad():
        want = model(x())
    save_delta(model, tmp_path / "d")
    loaded = load_delta(base(name), tmp_path / "d").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x()), want)
    assert [(u.target, u.mode, u.options) for u in read_delta(tmp_path / "d").plan.units] == [
        (u.target, u.mode, u.options) for u in plan.units]


@pytest.mark.parametrize("name,mode", CASES)
def test_peft_export_or_refusal(name, mode):
    model, plan = tuned(name, mode)
    factors, saved, left_out, _ = peft_parts(model, plan)
    spec = get_mode(mode)
    labels = [f"{u.mode}:{u.target}" + (f"[{u.slice}]" if u.slice else "") for u in plan.units]
    if spec.peft == "refuse":
        assert spec.peft_refusal
        for lab in labels:  # every unit is left out with its mode's reason (BatchNorm statistics may be too)
            assert f"{lab} ({spec.peft_refusal})" in left_out
        assert not factors
    elif spec.peft == "lora":
        carried = {(f.module, f.rows) for f in factors}
        missing = [u for u in plan.units if (u.module, u.slice_rows) not in carried]
        assert all(any(s.startswith(f"lora:{u.target}") for s in left_out) for u in missing)  # each one explained
        assert factors
    else:  # whole modules (modules_to_save), or left out saying why (a root-level tensor, a clash)
        for u, lab in zip(plan.units, labels):
            assert u.module in saved or any(s.startswith(lab) for s in left_out), lab
        assert saved


def test_ssf_peft_export_is_refused_with_its_reason(tmp_path):
    from sensitune.artifacts.export import export

    model, plan = tuned("test_vit", "ssf")
    # with a LoRA beside it, the export has a target but still cannot carry SSF
    save_delta(model, tmp_path / "d")
    with pytest.raises(ValueError, match="SSF scale and shift"):
        export(tmp_path / "d", tmp_path / "peft", "peft", base=base("test_vit"))


# ----------------------------------------------------------------------------- refusals
def test_unknown_mode_raises_everywhere(tmp_path):
    with pytest.raises(ValueError, match="unknown tuning mode 'ia3'.*registered modes: full"):
        Unit("blocks.0.attn.qkv.weight", "ia3", (192, 64))
    with pytest.raises(ValueError, match="unknown tuning mode"):
        get_mode("ia3")
    with pytest.raises(ValueError, match="unknown tuning mode"):
        Plan.from_json({"method": "m", "units": [{"target": "a", "mode": "ia3", "shape": [2]}], "tensors": {"a": [2]}})
    # a delta that names one is a DeltaError, not a silent fall-through
    model, _ = tuned("test_vit", "lora")
    save_delta(model, tmp_path / "d")
    import json

    from sensitune.artifacts.compact import pack_json, unpack_json

    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    packed = unpack_json(meta["packed"], "test")
    packed["plan"]["units"][0]["mode"] = "ia3"
    meta["packed"] = pack_json(packed)
    (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
    with pytest.raises(DeltaError, match="unknown tuning mode 'ia3'"):
        load_delta(base("test_vit"), tmp_path / "d")


@pytest.mark.parametrize("mode,options,match", [
    ("lora", {"rank": 2, "alpha": 4}, "takes no option 'alpha'.*rank, bits, scale, dropout, drop_path"),
    ("lora", {}, "option 'rank' is required"),
    ("lora", {"rank": 0}, "rank=0 must be > 0"),
    ("lora", {"rank": 2.5}, "must be an integer"),
    ("lora", {"rank": 2, "bits": 3}, "bits=3 is not one of 1, 2, 4, 8, 32"),
    ("lora", {"rank": 2, "dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ("lora", {"rank": True}, "must be int, not bool"),
    ("full", {"rank": 2}, "mode 'full' takes no option 'rank' \\(its options: none\\)"),
    ("ssf", {"scale": 2.0}, "mode 'ssf' takes no option 'scale'"),
])
def test_bad_options_raise_naming_the_option(mode, options, match):
    with pytest.raises(ValueError, match=match):
        Unit("blocks.0.attn.qkv.weight", mode, (192, 64), **options)


def test_clashes_are_refused():
    model = base("test_vit")
    s = model_shapes(model)
    qkv = "blocks.0.attn.qkv.weight"
    with pytest.raises(ValueError, match="incompatible ways"):
        plan_of(model, [Unit("blocks.0.attn.qkv", "ssf", (192,)), Unit(qkv, "lora", s[qkv], rank=2)], "x")
    with pytest.raises(ValueError, match="incompatible ways"):
        plan_of(model, [Unit(qkv, "full", s[qkv]), Unit(qkv, "sparse", s[qkv], indices=torch.tensor([1]))], "x")
    with pytest.raises(ValueError, match="two lora units"):
        plan_of(model, [Unit(qkv, "lora", s[qkv], rank=2), Unit(qkv, "lora", s[qkv], rank=3)], "x")
    with pytest.raises(ValueError, match="needs a module with a bias"):
        plan_of(model, [Unit("blocks.0.attn.q_norm", "ssf", (64,))], "x")
    # sparse and LoRA on one matrix, SSF on a norm next to a tuned Linear: fine
    plan_of(model, [Unit(qkv, "sparse", s[qkv], indices=torch.tensor([1])), Unit(qkv, "lora", s[qkv], rank=2),
                    Unit("blocks.0.norm1", "ssf", (64,))], "x")


def test_a_registered_mode_joins_every_stage():
    """A throwaway mode (a scalar gain on a LayerNorm's weight) is planned, applied, counted, refused by PEFT."""
    from sensitune.tuners.host import tuning_state  # noqa: F401  (the machinery a real mode would use)

    class Gain(Mode):
        name = "gain-test"
        site = "parameter"
        peft_refusal = "a test mode"

        def parameters(self, unit):
            return [(unit.target, "full", unit.numel)]

        def attach(self, module, unit):
            module._parameters[unit.leaf].requires_grad_(True)

        def examples(self, model):
            return [Unit("blocks.0.norm1.weight", self.name, (64,))]

    register(Gain())
    try:
        assert "gain-test" in registered()
        with pytest.raises(ValueError, match="already registered"):
            register(Gain())
        model = base("test_vit")
        plan = plan_of(model, Gain().examples(model), "gain-test")
        apply_plan(model, plan)
        assert plan.num_trainable() == 64 and plan.nbytes() == 256
        _, _, left_out, _ = peft_parts(model, plan)
        assert left_out == ["gain-test:blocks.0.norm1.weight (a test mode)"]
    finally:
        unregister("gain-test")
    with pytest.raises(ValueError, match="unknown tuning mode"):
        get_mode("gain-test")


# ----------------------------------------------------------------------------- SSF
@pytest.mark.parametrize("name", MODELS)
def test_ssf_preset_covers_biased_layers_and_norms(name):
    model = base(name)
    plan = make_plan(model, None, "ssf")
    modules = dict(model.named_modules())
    targets = {u.target for u in plan.units if u.mode == "ssf"}
    norms = {n for n, m in modules.items() if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))}
    linears = {n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None}
    head = {n.rsplit(".", 1)[0] for n in plan.head}
    assert targets == (norms | linears) - head
    # two vectors per channel: the count is 2 x the channels of every target
    assert plan.num_trainable(False) == sum(2 * modules[t].bias.numel() for t in targets)


def test_ssf_count_on_vit_b16_shapes():
    """ViT-B/16: 2 x 768 per norm (25) and per proj/fc2 (24) + patch embedding, 2 x 2304 per qkv, 2 x 3072 per fc1."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    plan = make_plan(model, None, "ssf", head=False)
    per_block = 2 * (768 + 2304 + 768 + 768 + 3072 + 768)
    assert plan.num_trainable(False) == 12 * per_block + 2 * 768 + 2 * 768 == 205_824


def test_ssf_trains_through_the_engine(tmp_path):
    import numpy as np
    from PIL import Image

    from sensitune.engine.pipeline import train

    root = tmp_path / "bands"
    rng = np.random.default_rng(0)
    for split, n in {"train800": 12, "val200": 6, "test": 6}.items():
        (root / "images" / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            img[:, (i % 3) * 10:(i % 3) * 10 + 10] += 150
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            rows.append(f"images/{split}/{i}.png {i % 3}")
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "train800val200.txt").write_text((root / "train800.txt").read_text() + (root / "val200.txt").read_text())
    out = tmp_path / "run"
    res = train("test_vit", root, "ssf", out, pretrained="none", img_size=32, epochs=1, batch_size=6, progress=False,
                log=lambda s: None)
    delta = read_delta(out / "delta")
    assert delta.plan.method == "ssf" and {u.mode for u in delta.plan.units} == {"ssf", "head"}
    scales = [delta.param_tensor(n) for n in delta.params() if n.endswith("ssf.scale")]
    assert scales and any(not torch.equal(s, torch.ones_like(s)) for s in scales)  # training moved them
