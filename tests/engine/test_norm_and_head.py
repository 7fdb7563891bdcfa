"""Norm statistics are a setting of their own (``norm_stats``): by default every BatchNorm layer
normalises with its pretrained statistics whatever the plan trains; head learning rate and init."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from engine_helpers import Crash, TinyTask
from sensitune.engine.config import build_config
from sensitune.engine.evaluation import evaluate_model
from sensitune.engine.pipeline import train
from sensitune.engine.trainer import fit, frozen_norm_layers, param_groups
from sensitune.planning import make_plan
from sensitune.tuners import apply_plan

from test_pipeline import make_vtab


def bn_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3)


def norm_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


def cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=1e-2, warmup_epochs=0, progress=False, eval_every=1)
    base.update(kw)
    return build_config(overrides=base)


def fitted(method: str, **kw) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.nn.Module]:
    """(statistics before, after, model) of a short fit; eval_every=1 also runs evaluation mid-training."""
    model = apply_plan(bn_model(), make_plan(bn_model(), None, method))
    before = norm_stats(model)
    fit(model, TinyTask(32), cfg(**kw), eval_data=TinyTask(8, seed=3), log=lambda s: None)
    return before, norm_stats(model), model


def test_linear_probe_leaves_every_norm_statistic_bit_identical():
    before, after, model = fitted("linear", epochs=3)
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plans_that_train_norm_parameters_keep_every_statistic_by_default():
    """bitfit trains every BN bias: under the default its layers still normalise with pretrained statistics."""
    before, after, model = fitted("bitfit")
    assert any(p.requires_grad for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
               for p in m.parameters(recurse=False))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_norm_stats_batch_and_the_legacy_rule_move_statistics():
    before, after, _ = fitted("linear", norm_stats="batch")  # batch statistics everywhere
    assert all(not torch.equal(before[k], after[k]) for k in before)
    before, after, _ = fitted("bitfit", norm_stats="pretrained-if-frozen")  # 0.1: a trained layer trains
    assert all(not torch.equal(before[k], after[k]) for k in before)
    before, after, _ = fitted("linear", norm_stats="pretrained-if-frozen")  # ... a frozen one does not
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_sparse_pick_in_a_norm_vector_no_longer_switches_it_to_batch_statistics():
    """The defect of 0.1: one trained entry in a BN weight made the layer use batch statistics."""
    model = bn_model()
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns[1].register_parameter("weight_delta", torch.nn.Parameter(torch.zeros(2)))
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    before = norm_stats(model)
    fit(model, TinyTask(32), cfg(), log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in norm_stats(model).items())


def test_frozen_norm_layers_are_those_without_a_trained_own_parameter():
    model = bn_model()
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(frozen_norm_layers(model)) == len(bns)
    bns[0].bias.requires_grad_(True)  # a whole vector the plan trains
    bns[1].register_parameter("weight_delta", torch.nn.Parameter(torch.zeros(2)))  # a sparse pick's values
    frozen = frozen_norm_layers(model)
    assert bns[0] not in frozen and bns[1] not in frozen and len(frozen) == len(bns) - 2


def test_evaluation_restores_each_module_mode():
    model, data = bn_model(), TinyTask(8)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()
    evaluate_model(model, data, batch_size=4)
    assert model.training and not bn.training


def test_head_lr_gets_its_own_groups():
    model = apply_plan(bn_model(), make_plan(bn_model(), None, "bitfit"))
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = param_groups(model, 0.1, head=lambda n, p: id(p) in head, head_lr=0.5)
    head_groups = [g for g in groups if g.get("lr") == 0.5]
    assert {id(p) for g in head_groups for p in g["params"]} == head
    assert sorted(g["weight_decay"] for g in head_groups) == [0.0, 0.1]  # head bias undecayed, weight decayed
    assert len(param_groups(model, 0.1, head=lambda n, p: id(p) in head)) == 2  # no head_lr: no extra group


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("data") / "bands")


FAST = dict(pretrained="none", img_size=32, epochs=1, batch_size=8, progress=False, lr=1e-2)


def _parts(run) -> set[str]:
    from sensitune.artifacts import read_delta

    return {info["part"] for info in read_delta(run / "delta").meta["tensors"].values()}


def test_delta_carries_norm_statistics_only_when_training_moved_them(task, tmp_path):
    train("test_efficientnet", task, "linear", tmp_path / "linear", log=lambda s: None, **FAST)
    assert "norm_stats" not in _parts(tmp_path / "linear")
    train("test_efficientnet", task, "bitfit", tmp_path / "bitfit", log=lambda s: None, **FAST)
    assert "norm_stats" not in _parts(tmp_path / "bitfit")
    train("test_efficientnet", task, "bitfit", tmp_path / "bitfit-batch", norm_stats="batch", log=lambda s: None,
          **FAST)
    assert "norm_stats" in _parts(tmp_path / "bitfit-batch")


def test_zero_head_init(task, tmp_path):
    """With lr ~0 the trained head is what it started as: zeros for head_init=zero, timm's init otherwise."""
    still = dict(FAST, lr=1e-12, warmup_lr=1e-12, min_lr=0.0)
    heads = {}
    for init in ("zero", "default"):
        train("test_efficientnet", task, "linear", tmp_path / init, head_init=init, log=lambda s: None, **still)
        ckpt = torch.load(tmp_path / init / "checkpoints" / "last.pt", weights_only=True)
        heads[init] = ckpt["model"]["classifier.weight"]
    assert heads["zero"].abs().max() < 1e-9
    assert heads["default"].abs().max() > 1e-3


def test_config_checks_new_keys():
    with pytest.raises(ValueError, match=r"norm_stats='off' is invalid: choose one of \('pretrained', 'batch'"):
        build_config(overrides={"norm_stats": "off"})
    with pytest.raises(ValueError, match="frozen_bn='off' is invalid.*replaced by norm_stats"):
        build_config(overrides={"frozen_bn": "off"})
    with pytest.warns(DeprecationWarning, match="frozen_bn is replaced by norm_stats"):
        assert build_config(overrides={"frozen_bn": "eval"}).norm_stats == "pretrained-if-frozen"
    with pytest.warns(DeprecationWarning):
        assert build_config(config={"frozen_bn": "train"}).norm_stats == "batch"
    with pytest.raises(ValueError, match="contradict"):
        build_config(overrides={"frozen_bn": "train", "norm_stats": "pretrained"})
    with pytest.raises(ValueError, match="head_init"):
        build_config(overrides={"head_init": "xavier"})
    with pytest.raises(ValueError, match="head_lr"):
        build_config(overrides={"head_lr": -1.0})
    paper = build_config(config="paper")
    assert paper.head_lr is None and paper.head_init == "default"


def _half_trained_bn_model() -> torch.nn.Module:
    """The head plus the first half of the BN layers' biases train: the rest must stay frozen."""
    model = bn_model()
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns[:len(bns) // 2]:
        m.bias.requires_grad_(True)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("mode", ["pretrained", "pretrained-if-frozen"])
def test_resume_keeps_norm_statistics_as_the_mode_says_and_matches_an_uninterrupted_run(tmp_path, mode):
    c = cfg(epochs=2, batch_size=8, eval_every=0, checkpoint_every=3, norm_stats=mode)
    ref = _half_trained_bn_model()
    start = norm_stats(ref)
    fit(ref, TinyTask(32), c, log=lambda s: None)
    crashed = _half_trained_bn_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, Crash(32 + 8 * 2 + 3, n=32), c, out_dir=tmp_path, log=lambda s: None)
    resumed = _half_trained_bn_model()
    fit(resumed, TinyTask(32), c, out_dir=tmp_path, resume=True, log=lambda s: None)
    end_ref, end = norm_stats(ref), norm_stats(resumed)
    assert all(torch.equal(end_ref[k], end[k]) for k in end)
    if mode == "pretrained":
        assert all(torch.equal(start[k], end[k]) for k in end)
    else:  # the 0.1 rule: only the layers none of whose parameters trains keep their statistics
        frozen = {n for n, m in ref.named_modules() if m in frozen_norm_layers(ref)}
        assert frozen and all(torch.equal(start[k], end[k]) == (k.rsplit(".", 1)[0] in frozen) for k in end)


def test_zero_head_comes_after_scoring_and_spares_a_quantised_head(task, tmp_path):
    from safetensors.torch import load_file

    train("test_efficientnet", task, "spt-lora", tmp_path / "spt", score_batches=1, score_batch_size=8,
          log=lambda s: None, **FAST)
    scores = load_file(tmp_path / "spt" / "scores.safetensors")
    assert any(t.abs().sum() > 0 for k, t in scores.items() if "classifier" not in k)  # sensitivities not zeroed
    notes: list[str] = []
    train("test_efficientnet", task, "linear", tmp_path / "bihead", method_options={"head_bits": 1},
          log=notes.append, **FAST)
    assert any("skipped for a quantised head" in n for n in notes)


def test_zero_head_init_spares_a_head_the_plan_freezes(task, tmp_path):
    """A frozen zero head would output zeros and pass no gradient: the loss would sit at ln C exactly."""
    notes: list[str] = []
    res = train("test_efficientnet", task, "lora", tmp_path / "frozen-head", method_options={"head": False},
                log=notes.append, **FAST)
    assert any("plan does not train the head" in n for n in notes)
    classes = len(json.loads((tmp_path / "frozen-head" / "delta" / "delta.json").read_text())["class_names"])
    assert abs(res["train_loss"] - math.log(classes)) > 1e-3


@pytest.mark.parametrize("method", ["spt-lora", "bitfit"])
def test_default_spt_lora_and_bitfit_on_lite0_keep_every_running_statistic_and_store_none(task, tmp_path, method):
    """The issue's case: on real EfficientNet-Lite0 these plans train BatchNorm parameters (SPT picks BN
    entries, BitFit every BN bias), yet every running statistic stays pretrained and the delta holds none."""
    from sensitune.models import create_backbone

    run = tmp_path / method
    train("efficientnet_lite0", task, method, run, score_batches=1, score_batch_size=8, log=lambda s: None,
          **{**FAST, "pretrained": "auto", "lr": 1e-2})
    plan = json.loads((run / "plan.json").read_text())
    bn_names = {n for n, m in create_backbone("efficientnet_lite0", 3).named_modules()
                if isinstance(m, torch.nn.BatchNorm2d)}
    trained_bn = {u["target"] for u in plan["units"] if {u["target"], u["target"].rsplit(".", 1)[0]} & bn_names}
    assert len(trained_bn) >= 5, "the plan must train BatchNorm parameters for this test to mean anything"
    assert "norm_stats" not in _parts(run)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    base = {k: v for k, v in create_backbone("efficientnet_lite0", 3).state_dict().items()
            if k.endswith(("running_mean", "running_var"))}
    stats = {k: v for k, v in ckpt.items() if k in base}
    assert len(stats) == len(base) or not stats  # either the checkpoint stores them all, or none
    assert all(torch.equal(base[k], v) for k, v in stats.items())


def test_the_head_group_follows_its_own_schedule_after_warm_up():
    """head_lr: the head's groups warm up to head_lr and decay from it on the same cosine, every
    other group from lr (compared with the closed form at every step, past the warm-up too)."""
    from dataclasses import replace

    from sensitune.engine.trainer import make_scheduler, schedule_lr

    model = apply_plan(bn_model(), make_plan(bn_model(), None, "bitfit"))
    head = {id(p) for p in model.get_classifier().parameters()}
    cfg = build_config(overrides={"lr": 1e-3, "head_lr": 2e-2, "epochs": 3, "warmup_epochs": 1.0,
                                  "warmup_lr": 1e-6, "min_lr": 1e-5})
    opt = torch.optim.AdamW(param_groups(model, 0.1, head=lambda n, p: id(p) in head, head_lr=cfg.head_lr),
                            lr=cfg.lr)
    steps = 5
    sched = make_scheduler(opt, cfg, steps)
    head_cfg = replace(cfg, lr=cfg.head_lr)
    for step in range(cfg.epochs * steps):
        sched.step_update(step)
        for g in opt.param_groups:
            is_head = {id(p) for p in g["params"]} <= head
            want = schedule_lr(step, head_cfg if is_head else cfg, steps)
            assert g["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), (step, is_head)
    assert any({id(p) for p in g["params"]} <= head for g in opt.param_groups)
