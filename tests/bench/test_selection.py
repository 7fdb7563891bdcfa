"""lr selection: the rule, its scopes, diverged runs, fall-back on final training, bootstrap stability."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sensitune.bench.selection import bootstrap_stability, choose_lr, rank_lrs, suite_accuracy, usable
from test_runner import bench, calls


def test_rank_puts_the_rule_first_then_the_rest_best_first():
    val = {1e-3: 80.0, 1e-2: 80.5, 3e-2: 81.2, 1e-1: 40.0}
    assert rank_lrs(val) == [1e-2, 3e-2, 1e-3, 1e-1]  # 80.5 is within 1 of 81.2 and smaller
    assert rank_lrs(val, tie_tolerance=0.0) == [3e-2, 1e-2, 1e-3, 1e-1]
    assert usable({1e-3: 50.0, 1e-2: 90.0, 1e-1: None, 1.0: float("nan")}, {1e-2: "diverged"}) == {1e-3: 50.0}
    assert choose_lr({1e-3: 50.0, 1e-2: 90.0}, diverged={1e-2: "loss ended above its start"}) == 1e-3
    with pytest.raises(ValueError, match="failed or diverged"):
        choose_lr({1e-3: None}, diverged={})


def test_suite_accuracy_averages_tasks_and_drops_a_rate_bad_anywhere():
    per_task = {"a": {1e-3: 70.0, 1e-2: 90.0, 1e-1: 99.0}, "b": {1e-3: 80.0, 1e-2: 60.0, 1e-1: None}}
    assert suite_accuracy(per_task) == {1e-3: 75.0, 1e-2: 75.0}
    assert suite_accuracy(per_task, {"a": {1e-3: "diverged"}}) == {1e-2: 75.0}


def test_bootstrap_stability_matches_the_exact_multinomial_share():
    """Two rates that differ on exactly two of n images (one right on each): with no tolerance the
    smaller rate keeps the choice when its image is drawn at least as often as the other's, so the
    share is (1 + P(equal counts)) / 2 under multinomial(n; 1/n, 1/n, rest)."""
    n = 10
    a = np.zeros(n)
    b = np.zeros(n)
    a[0], b[1] = 1, 1
    a[2:], b[2:] = 1, 1
    p_equal = sum(math.factorial(n) / (math.factorial(k) ** 2 * math.factorial(n - 2 * k))
                  * (1 / n) ** (2 * k) * (1 - 2 / n) ** (n - 2 * k) for k in range(n // 2 + 1))
    share = bootstrap_stability({"t": {1e-3: a, 1e-2: b}}, {"t": 1e-3}, "task", tie_tolerance=0.0, rounds=40000)
    assert share["t"] == pytest.approx((1 + p_equal) / 2, abs=0.01)
    # far apart rates never flip; the suite scope pools tasks
    far = {"t": {1e-3: np.ones(50), 1e-2: np.zeros(50)}, "u": {1e-3: np.ones(50), 1e-2: np.zeros(50)}}
    assert bootstrap_stability(far, 1e-3, "suite", rounds=200) == {"suite": 1.0}


def test_a_diverged_validation_run_is_never_chosen_even_when_best(tmp_path):
    over = {"calls_file": str(tmp_path / "calls.jsonl"), "epochs": 1, "diverge_at": [["val", 1e-2]]}
    manifest = bench(tmp_path, methods="lora", tasks=["digits"], seeds=[0], lr_grid=[1e-3, 1e-2],
                     tie_tolerance=0.0, overrides=over)
    sel = manifest["selection"]["digits/lora"]
    assert sel["lr"] == 1e-3 and sel["ranking"] == [1e-3] and "0.01" in sel["diverged"]
    assert "digits/lora/select/lr0.01" in manifest["diverged"]


def test_final_training_that_diverges_falls_back_to_the_next_lr_for_every_seed(tmp_path):
    over = {"calls_file": str(tmp_path / "calls.jsonl"), "epochs": 1, "diverge_at": [["final", 1e-3, 1]]}
    manifest = bench(tmp_path, methods="lora", tasks=["digits"], seeds=[0, 1], lr_grid=[1e-3, 1e-2, 1e-1],
                     overrides=over)
    assert manifest["selection"]["digits/lora"]["ranking"] == [1e-3, 1e-2, 1e-1]
    assert manifest["fallback"]["digits/lora"]["from"] == 1e-3 and manifest["fallback"]["digits/lora"]["to"] == 1e-2
    cells = {c["seed"]: c for c in manifest["cells"]}
    assert all(c["lr"] == 1e-2 and c["fallback_from"] == 1e-3 for c in cells.values())
    assert cells[1]["path"] == "digits/lora/fallback-lr0.01/seed1"
    finals = [(c["seed"], c["lr"]) for c in calls(tmp_path / "calls.jsonl") if c["protocol"] == "final"]
    assert finals == [(0, 1e-3), (1, 1e-3), (0, 1e-2), (1, 1e-2)]
    # a restart reruns nothing and reaches the same cells
    again = bench(tmp_path, methods="lora", tasks=["digits"], seeds=[0, 1], lr_grid=[1e-3, 1e-2, 1e-1],
                  overrides=over)
    assert len(calls(tmp_path / "calls.jsonl")) == 3 + 4 and again["cells"] == manifest["cells"]
    from sensitune.bench import write_report

    text = write_report(tmp_path / "res", plots=False)["markdown"]
    assert "- digits/lora: lr 0.001 → 0.01 (training loss ended above where it started (fake))" in text
    # 70 + len("digits") + seed + 100 * lr at lr 1e-2 for seeds 0 and 1; t(0.975, 1) * 0.707 / sqrt(2) = 6.35
    assert "| lora | 77.5 ± 6.4† |" in text


def test_suite_scope_chooses_one_rate_per_method_from_the_mean_over_tasks(tmp_path):
    table = {"digits": {"0.001": 70.0, "0.01": 90.0}, "textile": {"0.001": 80.0, "0.01": 50.0}}
    over = {"calls_file": str(tmp_path / "calls.jsonl"), "epochs": 1, "val_table": table}
    manifest = bench(tmp_path, methods="lora", seeds=[0], lr_grid=[1e-3, 1e-2], select_scope="suite", overrides=over)
    sel = manifest["selection"]
    assert sel["*/lora"]["lr"] == 1e-3 and sel["*/lora"]["val_accuracy"] == {"0.001": 75.0, "0.01": 70.0}
    assert sel["digits/lora"]["lr"] == 1e-3 == sel["textile/lora"]["lr"]  # per task, digits alone would take 1e-2
    stab = manifest["selection_stability"]["lora"]
    assert stab["task"] == 1.0 and 0.5 < stab["suite"] <= 1.0
    with pytest.raises(ValueError, match="select_scope: was 'suite', now 'task'"):
        bench(tmp_path, methods="lora", seeds=[0], lr_grid=[1e-3, 1e-2], overrides=over)
    with pytest.raises(ValueError, match="choose one of task, suite"):
        bench(tmp_path / "x", methods="lora", seeds=[0], lr_grid=[1e-3], select_scope="global", overrides=over)


def test_a_grid_of_factors_scales_each_columns_own_lr(tmp_path):
    from sensitune.bench.runner import parse_lr_grid

    assert parse_lr_grid(["x2", "x0.5"]) == ([0.5, 2.0], True) and parse_lr_grid([1e-3]) == ([1e-3], False)
    for bad, msg in ((["x2", "1e-3"], "not both"), (["x0"], "positive"), (["fast"], "expected numbers")):
        with pytest.raises(ValueError, match=msg):
            parse_lr_grid(bad)
    val = {"digits": {f"{lr:g}": 80.0 for lr in (5e-4, 2e-3, 5e-3, 2e-2)}}
    over = {"calls_file": str(tmp_path / "calls.jsonl"), "epochs": 1, "val_table": val}
    manifest = bench(tmp_path, methods="lora,linear:lr=0.01", tasks=["digits"], seeds=[0], lr_grid=["x0.5", "x2"],
                     overrides=over)
    select = sorted((c["method"], c["lr"]) for c in calls(tmp_path / "calls.jsonl") if c["protocol"] == "val")
    # lora's preset lr is 1e-3, the linear column's own 1e-2; the column's lr is never a planner option
    assert select == [("linear", 5e-3), ("linear", 2e-2), ("lora", 5e-4), ("lora", 2e-3)]
    assert all(c["options"] is None for c in calls(tmp_path / "calls.jsonl"))
    assert manifest["lr_grid"] == ["x0.5", "x2"] and manifest["selection"]["digits/linear:lr=0.01"]["lr"] == 5e-3
