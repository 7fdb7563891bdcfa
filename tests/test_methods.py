"""Methods and options scoped by stage: every preset names registered stages, ``plan.`` / ``score.``
/ ``train.`` options reach their stage, and ambiguous or unknown names are refused listing the valid ones."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm

from sensitune.commands.train import staged_overrides
from sensitune.engine.config import TrainConfig, build_config
from sensitune.methods import METHODS, SCOPES, budgeted, get_method
from sensitune.planning import PLANNERS, make_plan
from sensitune.scoring import SCORERS


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_names_registered_stages_that_take_its_options(name):
    m = get_method(name)
    assert m.planner is PLANNERS[m.plan]
    assert m.scorer_spec is (SCORERS[m.scorer] if m.scorer else None)
    m.check_options()  # its own plan/score options are ones its stages take
    # the budget declared for --help (torch-free) agrees with the planner, which decides
    assert (m.budget == "none") == (m.planner.budget == "none")
    assert (m.default_budget is not None) == (m.budget == "optional")
    # a method that plans from scores computes them
    assert (m.scorer is not None) == m.planner.scored


@pytest.mark.parametrize("budget", [None, "0.5%", "20k", "abc", "0", "150%", "0%", float("nan")])
@pytest.mark.parametrize("name", ["lora", "spt-lora", "gps", "topk-sparse"])
def test_method_and_make_plan_accept_and_refuse_the_same_budgets(name, budget):
    """One budget check: a budget the method passes is one make_plan plans with, and one it refuses
    make_plan refuses with the same words."""
    model = _vit()
    m = get_method(name)
    scores = {n: p.detach().abs() + 1e-3 for n, p in model.named_parameters()} if m.planner.scored else None
    try:
        effective = m.check_budget(budget)
    except ValueError as method_error:
        planner_budget = budget if budget is not None or m.planner.budget == "none" else m.default_budget
        with pytest.raises(ValueError) as plan_error:
            make_plan(model, scores, m.plan, budget=planner_budget)
        assert m.plan == name and str(method_error).startswith(str(plan_error.value))
        return
    plan = make_plan(model, scores, m.plan, budget=effective)
    if effective is not None:
        assert plan.budget is not None and plan.num_trainable(False) > 0
    else:
        assert name in ("lora", "gps") and budget is None


def test_an_unknown_method_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown method 'lorra' \(did you mean 'lora'\?\); choose one of linear, full, "
                                         r"bitfit, lora"):
        get_method("lorra")


def test_no_budget_names_the_budgeted_methods():
    with pytest.raises(ValueError, match=f"takes no budget .*use a budgeted method: {', '.join(budgeted())}"):
        get_method("lora").check_budget("1M")


def test_scoped_options_reach_their_stage():
    lora = get_method("lora")
    staged = lora.stage_options({"plan.rank": 4, "train.drop_path": 0.1, "epochs": 3, "head": False}, "here")
    assert (staged.plan, staged.score, staged.train) == ({"rank": 4, "head": False}, {}, {"drop_path": 0.1, "epochs": 3})
    # the plan made with the planner's share has rank-4 modules and no head; the backbone's drop-path is
    # the training setting's (the LoRA modules keep their default 0)
    plan = make_plan(_vit(), None, "lora", **staged.plan)
    assert {u.rank for u in plan.units} == {4} and all(u.mode == "lora" for u in plan.units)
    assert {u.drop_path for u in plan.units} == {0.0}
    cfg = build_config(lora.train, None, staged_overrides("lora", list({"plan.rank": 4, "train.drop_path": 0.1,
                                                                          "epochs": 3}.items())))
    assert (cfg.drop_path, cfg.epochs, cfg.method_options, cfg.score_options) == (0.1, 3, {"rank": 4}, {})
    # and the other way round: the planner's drop-path, the backbone's untouched
    cfg = build_config(lora.train, None, staged_overrides("lora", [("plan.drop_path", 0.2)]))
    assert cfg.drop_path == TrainConfig().drop_path and cfg.method_options == {"drop_path": 0.2}
    units = make_plan(_vit(), None, "lora", **cfg.method_options).units
    assert {u.drop_path for u in units if u.mode == "lora"} == {0.2}


def test_scorer_options_go_to_score_options_and_merge_with_the_setting():
    over = staged_overrides("gps", [("score_options", {"loss": "ce"}), ("score.batches", 2), ("K", 2),
                                    ("method_options", {"head": False})])
    cfg = build_config(get_method("gps").train, None, over)
    assert cfg.score_options == {"loss": "ce", "batches": 2} and cfg.method_options == {"head": False, "K": 2}
    assert cfg.to_dict()["score_options"] == {"loss": "ce", "batches": 2}


def test_an_empty_score_options_leaves_the_recorded_settings_as_before():
    # run.json and a bench folder's engine_defaults compare TrainConfig().to_dict(): a new empty
    # setting there would make every folder made before it another experiment
    assert "score_options" not in TrainConfig().to_dict()
    assert build_config(None, TrainConfig(score_options={"batches": 3})).score_options == {"batches": 3}


def test_an_ambiguous_bare_name_is_refused_naming_both_spellings():
    with pytest.raises(ValueError, match=r"'drop_path' is ambiguous: .*planner lora and a training setting; "
                                         r"write plan\.drop_path=\.\.\. .* or train\.drop_path=\.\.\."):
        get_method("lora").stage_options({"drop_path": 0.1}, "--set")
    # linear's planner takes no drop_path: the bare name is the training setting
    assert get_method("linear").stage_options({"drop_path": 0.1}, "--set").train == {"drop_path": 0.1}


@pytest.mark.parametrize("options,message", [
    ({"pln.rank": 4}, r"names no stage 'pln' \(did you mean 'plan'\?\); scope an option as plan\.NAME"),
    ({"rnk": 4}, r"unknown option 'rnk' \(did you mean 'rank'\?\); the planner lora takes: rank, targets"),
    ({"plan.rnk": 4}, r"unknown option 'rnk' \(did you mean 'rank'\?\); the planner lora takes: rank \(int\)"),
    ({"train.lrr": 4}, r"unknown config key 'lrr' \(did you mean 'lr'\?\)"),
    ({"score.batches": 4}, r"method 'lora' computes no scores"),
    ({"plan.rank": "4"}, r"option rank='4' has the wrong type: the planner lora expects int"),
    ({"train.epochs": "many"}, r"epochs='many' has the wrong type"),
    ({"plan.rank": 4, "rank": 2}, r"plan\.rank is given twice"),
])
def test_unknown_or_badly_typed_options_are_refused_with_the_valid_ones(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("lora").stage_options(options, "--set")


def test_scorer_options_need_their_scope_and_their_type():
    gps = get_method("gps")
    with pytest.raises(ValueError, match=r"'batches' is an option of the scorer gps: write score\.batches="):
        gps.stage_options({"batches": 8}, "--set")
    with pytest.raises(ValueError, match=r"option batches='8' has the wrong type: the scorer gps expects int \| None"):
        gps.stage_options({"score.batches": "8"}, "--set")
    with pytest.raises(ValueError, match=r"unknown option 'los' \(did you mean 'loss'\?\); the scorer gps takes"):
        gps.stage_options({"score.los": "ce"}, "--set")
    assert set(SCOPES) == {"plan", "score", "train"}


def test_train_set_refuses_an_ambiguous_name_before_any_work(tmp_path, capsys):
    from sensitune.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", "vit_tiny_patch16_224", "--task", "digits", "--method", "lora",
                 "--out", str(out), "--set", "drop_path=0.1"])
    err = capsys.readouterr().err
    assert code == 2 and "plan.drop_path" in err and "train.drop_path" in err and not out.exists()


def test_listing_the_methods_imports_no_torch():
    code = ("import sys; from sensitune.methods import describe, get_method; describe(); get_method('lora'); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_an_exponent_without_a_dot_is_a_float_where_the_option_takes_one():
    """PyYAML reads ``1e-3`` as a string; a float option still gets the number."""
    from sensitune.commands.train import _key_value

    key, value = _key_value("plan.alpha=1e1")
    assert value == "1e1"  # what YAML 1.1 gives
    staged = get_method("spt-lora").stage_options({key: value}, "--set")
    assert staged.plan == {"alpha": 10.0} and isinstance(staged.plan["alpha"], float)
    staged = get_method("gps").stage_options({"score.temperature": "7e-2"}, "--set")
    assert staged.score == {"temperature": 0.07}
    with pytest.raises(ValueError, match="wrong type"):  # a word stays a word, and is refused
        get_method("spt-lora").stage_options({"plan.alpha": "ten"}, "--set")


def test_a_replaced_training_setting_is_still_read_through_set():
    """``--set frozen_bn=eval`` (sensitune 0.1) means what it meant, with a deprecation warning."""
    with pytest.warns(DeprecationWarning, match="frozen_bn is replaced by norm_stats"):
        staged = get_method("lora").stage_options({"frozen_bn": "eval"}, "--set")
    assert staged.train == {"norm_stats": "pretrained-if-frozen"}


def test_sensitune_plan_lists_every_registered_planner():
    from sensitune.commands.plan import planner_names
    from sensitune.planning import PLANNERS

    assert sorted(planner_names()) == sorted(PLANNERS)  # ssf included: the hand-written list lacked it
