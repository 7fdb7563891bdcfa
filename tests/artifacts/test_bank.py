"""TaskBank: several deltas on one base, switching back and forth equals fresh loads exactly."""
import pytest
import torch

from sensitune.artifacts import DeltaError, TaskBank, load_delta, save_delta
from sensitune.tuners import applied_plan

from .helpers import images, make_plan, trained, tuned_vit, units_for, vit

KINDS = ["lora", "spt", "adaptformer", "bilora1", "bitfit"]


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    out = {}
    for i, kind in enumerate(KINDS):
        save_delta(tuned_vit(kind, train_seed=10 + i), root / kind)
        out[kind] = root / kind
    # a task with another class count (linear probe on 3 classes)
    base = vit(0)
    base.reset_classifier(3)
    save_delta(trained(base, make_plan(base, units_for("linear", base))), root / "three")
    out["three"] = root / "three"
    return out


def test_switching_equals_fresh_loads(deltas):
    x = images(4)
    with torch.no_grad():
        fresh = {k: load_delta(vit(0), p).eval()(x) for k, p in deltas.items()}
        plain = vit(0)(x)
    base = vit(0)
    bank = TaskBank(base)
    for name, path in deltas.items():
        bank.add(name, path)
    order = ["lora", "spt", "adaptformer", "lora", "bilora1", "three", "spt", "bitfit", "adaptformer", "bilora1", "lora"]
    with torch.no_grad():
        for name in order:
            model = bank.activate(name)
            assert model is base and bank.active == name
            assert torch.equal(model(x), fresh[name]), name
        bank.deactivate()
        assert torch.equal(base(x), plain)  # the base is back, bit for bit
        assert applied_plan(base) is None


def test_frozen_weights_are_shared_not_copied(deltas):
    base = vit(0)
    bank = TaskBank(base)
    bank.add("spt", deltas["spt"])
    bank.add("bitfit", deltas["bitfit"])
    base_ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    bank.activate("spt")
    shared = {n for n, p in base.named_parameters() if base_ptrs.get(n) == p.data_ptr()}
    # only the tensors spt replaces (head, one bias) are its own; sparse targets stay shared
    assert set(base_ptrs) - shared == {"head.weight", "head.bias", "blocks.0.mlp.fc2.bias", "pos_embed"}
    # pos_embed is the one root tensor swapped (W + scatter(values) of its sparse unit)
    bank.activate("bitfit")
    own = {n for n, p in base.named_parameters() if base_ptrs.get(n) != p.data_ptr()}
    assert own == {n for n in base_ptrs if n.endswith(".bias")} | {"head.weight"}
    # what a switch touches: the units' modules only
    assert "blocks.0.attn.qkv" not in bank.touched("spt")
    assert set(bank.touched("spt")) == {"head", "blocks.1.mlp.fc1", "blocks.1.norm1", "blocks.0.mlp.fc2",
                                        "blocks.1.attn.proj", "<root>.pos_embed"}


def test_bank_refuses_a_foreign_delta_and_duplicates(deltas):
    bank = TaskBank(vit(seed=99))
    with pytest.raises(DeltaError, match="different base weights"):
        bank.add("lora", deltas["lora"])
    bank = TaskBank(vit(0))
    bank.add("lora", deltas["lora"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("lora", deltas["lora"])
    with pytest.raises(KeyError, match="no task 'nope'"):
        bank.activate("nope")
    bank.remove("lora")
    assert len(bank) == 0


def test_adding_while_active_keeps_the_active_task(deltas):
    x = images(2)
    base = vit(0)
    bank = TaskBank(base)
    bank.add("lora", deltas["lora"])
    bank.activate("lora")
    bank.add("spt", deltas["spt"])  # must copy the plain base, not the active task
    assert bank.active == "lora"
    with torch.no_grad():
        assert torch.equal(bank.activate("spt")(x), load_delta(vit(0), deltas["spt"]).eval()(x))
