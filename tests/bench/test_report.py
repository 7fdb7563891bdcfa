"""Report tables and plots on a synthetic bench folder with hand-computed numbers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from sensitune.bench.report import (MEAN_OF_GROUPS, MEAN_OF_TASKS, fmt_acc, load_cells, pareto_front, summarize,
                                    write_report)

TASKS = [("a", "g1"), ("b", "g1"), ("c", "g2")]
# method -> task -> [acc seed 0, acc seed 1]; m2 never finished task c
ACC = {"m1": {"a": [80.0, 82.0], "b": [60.0, 64.0], "c": [90.0, 90.0]},
       "m2": {"a": [70.0, 70.0], "b": [50.0, 52.0]}}
PARAMS = {"m1": (2_000_000, 1_000_000, 8_000_000), "m2": (20_000, 10_000, 40_000)}


def make_bench(root: Path) -> Path:
    cells = []
    for method, per_task in ACC.items():
        for task, group in TASKS:
            for seed in (0, 1):
                path = f"{task}/{method}/seed{seed}"
                cells.append({"task": task, "group": group, "method": method, "seed": seed, "path": path})
                if task not in per_task:
                    continue
                p, p_nh, b = PARAMS[method]
                (root / path).mkdir(parents=True)
                (root / path / "results.json").write_text(json.dumps({
                    "status": "complete", "accuracy": per_task[task][seed], "lr": 1e-3,
                    "trainable_params": p + seed, "trainable_params_without_head": p_nh,
                    "delta_bytes_on_disk": b, "bytes_estimate_without_head": b // 2,
                    "train_seconds": 10.0 + seed, "peak_memory_mb": 500.0, "images_per_s": 40.0}))
    manifest = {"format": "sensitune-bench/1", "suite": "synthetic", "model": "tiny", "seeds": [0, 1],
                "tasks": [{"task": t, "group": g} for t, g in TASKS], "methods": ["m1", "m2"], "cells": cells,
                "failed": {"c/m2/seed0": "RuntimeError: fake"}}
    (root / "bench.json").write_text(json.dumps(manifest))
    return root


def test_summary_means_and_seed_spread_by_hand(tmp_path):
    _, cells = load_cells(make_bench(tmp_path))
    m1, m2 = summarize(cells, TASKS, ["m1", "m2"])
    assert m1.task_mean == {"a": 81.0, "b": 62.0, "c": 90.0}
    assert m1.task_std["a"] == pytest.approx(math.sqrt(2.0))  # sample std of (80, 82)
    assert m1.task_std["c"] == 0.0
    assert m1.group_mean == {"g1": 71.5, "g2": 90.0}
    assert m1.mean_of_groups == pytest.approx(80.75)
    assert m1.mean_of_tasks == pytest.approx(233 / 3)
    # per seed: mean of groups 80.0 and 81.5; mean over tasks 230/3 and 236/3
    assert m1.mean_of_groups_std == pytest.approx(1.5 / math.sqrt(2))
    assert m1.mean_of_tasks_std == pytest.approx(2 / math.sqrt(2))
    assert m1.costs["params"] == pytest.approx(2_000_000.5)
    assert m1.costs["train_seconds"] == pytest.approx(10.5)
    # m2 lacks task c: its g2 mean and both overall means are undefined, g1 is not
    assert m2.missing == ["c"]
    assert m2.group_mean == {"g1": 60.5, "g2": None}
    assert m2.mean_of_groups is None and m2.mean_of_tasks is None


def test_pareto_front_on_a_hand_made_set():
    xs = [10, 100, 50, 100, 1000, 5]
    ys = [50, 70, 40, 65, 70, 30]
    # (50,40) is beaten by (10,50); (100,65) by (100,70); (1000,70) ties (100,70) on y at larger x
    assert pareto_front(xs, ys) == [True, True, False, False, False, True]
    assert pareto_front([1, 1], [5, 5]) == [True, True]  # duplicates do not dominate each other


def test_report_files_tables_and_plots(tmp_path):
    folder = make_bench(tmp_path)
    report = write_report(folder)
    md = (folder / "report.md").read_text()
    assert MEAN_OF_GROUPS in md and MEAN_OF_TASKS in md
    row = next(line for line in md.splitlines() if line.startswith("| m1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # method, a, b, c, g1 mean, g2 mean, mean of group means, mean over tasks; ± = 95 % t half-width over
    # 2 seeds = t(0.975, 1) * sd / sqrt(2) with t(0.975, 1) = 12.7062 (tables): sd sqrt 2 -> 12.7
    t = 12.7062
    assert cells == ["m1", fmt_acc(81.0, t), fmt_acc(62.0, 2 * t), "90.0 ± 0.0",
                     "71.5", "90.0", fmt_acc(80.75, t * 0.75), fmt_acc(233 / 3, t)]
    m2_row = next(line for line in md.splitlines() if line.startswith("| m2 |"))
    assert m2_row.count("—") == 4  # task c, g2 mean and both overall means
    assert "c/m2/seed0" in md  # failures are listed, not hidden
    with open(folder / "accuracy.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["m1"][MEAN_OF_GROUPS]) == pytest.approx(80.75)
    assert float(rows["m1"]["g1 mean"]) == pytest.approx(71.5)
    assert rows["m2"][MEAN_OF_TASKS] == ""
    with open(folder / "cells.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 10
    # plots: real PNGs with pixels; m2 lacks an overall mean so the trade-off plots hold m1 only
    import matplotlib.image as mpimg

    for name in ("acc_vs_params.png", "acc_vs_bytes.png", "groups.png"):
        path = folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
        assert f"]({name})" in md
    assert {p.name for p in report["files"]} >= {"report.md", "accuracy.csv", "costs.csv", "cells.csv"}


def test_not_a_bench_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench.json"):
        write_report(tmp_path)


def test_heatmap_of_a_scored_run(tmp_path):
    """A run folder with scores.safetensors gets a heat map for its budget (k = params without head)."""
    import matplotlib.image as mpimg
    import torch

    from sensitune.scoring import ScoreMap

    folder = make_bench(tmp_path)
    # m2's runs trained 10,000 parameters without the head: place the top 10,000 of 30,000 scores
    scores = {"blocks.0.mlp.fc1.weight": torch.rand(100, 100), "blocks.1.mlp.fc1.weight": torch.rand(100, 100) + 1.0,
              "blocks.1.attn.proj.weight": torch.rand(100, 100)}
    ScoreMap(scores, {"method": "sensitivity"}).save(folder / "a/m2/seed0/scores.safetensors")
    report = write_report(folder)
    (png,) = [p for p in report["files"] if p.parent.name == "heatmaps"]
    assert png.name == "a__m2.png" and mpimg.imread(png).std() > 0
    assert "](heatmaps/a__m2.png)" in report["markdown"]


def test_std_spread_paired_differences_and_one_seed_by_hand(tmp_path):
    from sensitune.bench.report import accuracy_table, paired_differences

    _, cells = load_cells(make_bench(tmp_path))
    summaries = summarize(cells, TASKS, ["m1", "m2"])
    _, rows = accuracy_table(summaries, TASKS, spread="std")
    assert rows[0][:4] == ["m1", fmt_acc(81.0, math.sqrt(2)), fmt_acc(62.0, math.sqrt(8)), "90.0 ± 0.0"]
    (d,) = paired_differences(summaries, TASKS, "m1")
    # m2 - m1 per seed: a (70-80, 70-82), b (50-60, 52-64) -> mean -11, sd sqrt 2, half-width 12.7
    assert d.task["a"][0] == pytest.approx(-11.0) and d.task["a"][1] == pytest.approx(12.7062, abs=1e-3)
    assert d.task["b"][:1] == (-11.0,) and "c" not in d.task and d.mean_of_tasks is None
    md = write_report(tmp_path, plots=False, reference="m1")["markdown"]
    assert "| m2 − m1 | -11.0 ± 12.7 | -11.0 ± 12.7 | — | — |" in md
    # one seed: no interval, said in words, never a ± 0
    manifest = json.loads((tmp_path / "bench.json").read_text())
    manifest["seeds"] = [0]
    manifest["cells"] = [c for c in manifest["cells"] if c["seed"] == 0]
    (tmp_path / "bench.json").write_text(json.dumps(manifest))
    md = write_report(tmp_path, plots=False)["markdown"]
    assert "no confidence interval (an interval needs at least 2 seeds)" in md
    assert "| m1 | 80.0 | 60.0 | 90.0 |" in md and "±" not in md.split("Costs")[0].split("\n\n", 2)[2]
    with pytest.raises(ValueError, match="confidence level between 0 and 1"):
        write_report(tmp_path, plots=False, ci=95)
