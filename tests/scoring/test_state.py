"""``score`` leaves the model exactly as it found it: weights, buffers, flags, requires_grad, .grad."""
from __future__ import annotations

import pytest
import torch

from sensitune.scoring import score

from .helpers import jitter_view, tensor_data, tiny_effnet


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "hooks": _hooks(model),
    }


def _hooks(model):
    """Tensor hooks of every parameter (scoring adds its own while it runs and must remove them)."""
    return {n: list((p._backward_hooks or {}).values()) for n, p in model.named_parameters()}


def _assert_same(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), f"{k} changed"
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["requires_grad"]
    for n, p in model.named_parameters():
        obj, value = snap["grad"][n]
        assert p.grad is obj, f"{n}.grad object replaced"
        if value is not None:
            assert torch.equal(p.grad, value), f"{n}.grad changed"
    assert _hooks(model) == snap["hooks"], "tensor hooks left behind or removed"


def _messy_model():
    """Mixed flags: some modules in eval, some frozen tensors, some with accumulated .grad."""
    model = tiny_effnet()
    model.train()
    model.blocks[0].eval()
    model.conv_stem.weight.requires_grad_(False)
    model.blocks[1][0].conv_pwl.weight.grad = torch.ones_like(model.blocks[1][0].conv_pwl.weight)
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 3.0)
    model.blocks[1][0].conv_pwl.weight.register_hook(lambda g: None)  # a user's hook stays
    return model


@pytest.mark.parametrize("method,options", [
    ("sensitivity", {"batch_size": 4, "batches": 2}),
    ("sensitivity", {"batch_size": 4, "batches": 2, "batchnorm": "train"}),
    ("gps", {"batch_size": 4, "view_transform": jitter_view}),
    ("gps", {"batch_size": 4, "loss": "ce", "batchnorm": "train"}),
])
def test_model_is_exactly_restored(method, options):
    model = _messy_model()
    snap = _snapshot(model)
    scores = score(model, tensor_data(8), method, **options)
    _assert_same(model, snap)
    assert "conv_stem.weight" in scores  # frozen by the user, still scored (SPT: every parameter)
    assert all(bool(torch.isfinite(t).all()) for t in scores.values())


def test_batchnorm_train_mode_uses_batch_statistics_but_restores_running_ones():
    model = tiny_effnet()
    snap = _snapshot(model)
    data = tensor_data(8)
    bn_eval = score(model, data, "sensitivity", batch_size=4, batches=2, train_mode=False)
    bn_train = score(model, data, "sensitivity", batch_size=4, batches=2, train_mode=False, batchnorm="train")
    _assert_same(model, snap)
    assert not torch.allclose(bn_eval["conv_stem.weight"], bn_train["conv_stem.weight"], rtol=1e-3)
    with pytest.raises(ValueError, match="batchnorm"):
        score(model, data, "sensitivity", batchnorm="frozen")


def test_model_is_restored_after_an_error():
    model = _messy_model()
    snap = _snapshot(model)
    bad = tensor_data(8)
    bad.tensors[0][5] = float("inf")
    with pytest.raises(FloatingPointError):
        score(model, bad, "sensitivity", batch_size=4, batches=2, batchnorm="train")
    _assert_same(model, snap)
