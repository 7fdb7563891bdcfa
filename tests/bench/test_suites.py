"""A folder of task folders is a suite: every task under it, grouped by an optional groups.txt."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sensitune.bench.suites import suite_tasks
from sensitune.cli import main
from test_runner import bench, calls

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from test_pipeline import make_vtab  # noqa: E402


@pytest.fixture
def suite_dir(tmp_path):
    root = tmp_path / "mytasks"
    for name in ("eurosat", "scans", "widgets"):
        make_vtab(root / name, sizes={"train800": 3, "val200": 3, "test": 3}, size=16)
    (root / "notes").mkdir()  # not a task folder: skipped
    return root


def test_folder_suite_default_groups_and_a_groups_file(suite_dir):
    tasks = suite_tasks(str(suite_dir))
    assert [(t.name, t.group) for t in tasks] == [("eurosat", "specialized"), ("scans", "tasks"), ("widgets", "tasks")]
    assert tasks[1].task == str(suite_dir / "scans")
    (suite_dir / "groups.txt").write_text("# mine\neurosat remote\nscans medical  # CT\nwidgets retail\n")
    assert [t.group for t in suite_tasks(str(suite_dir))] == ["remote", "medical", "retail"]
    (suite_dir / "groups.txt").write_text("eurosat remote\nscans\ngizmos retail\n")
    with pytest.raises(ValueError) as err:
        suite_tasks(str(suite_dir))
    msg = str(err.value)  # every bad line together, and the task left without a group
    assert "line 2: 'scans'" in msg and "line 3: 'gizmos retail' (gizmos is no task here)" in msg
    assert "no group for scans, widgets" in msg


def test_bench_runs_every_task_of_a_folder_and_refuses_an_empty_one(suite_dir, tmp_path):
    manifest = bench(tmp_path, suite=str(suite_dir), tasks=None, methods="linear", seeds=[0])
    assert [t["task"] for t in manifest["tasks"]] == ["eurosat", "scans", "widgets"]
    assert sorted(c["task"] for c in calls(tmp_path / "calls.jsonl")) == ["eurosat", "scans", "widgets"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no task folder under it"):
        suite_tasks(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown suite 'nowhere'.*or give a folder"):
        suite_tasks("nowhere")


def test_bench_cli_refuses_a_confidence_interval_over_one_seed_before_any_work(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["bench", "--suite", "mini", "--methods", "linear", "--seeds", "0", "--ci", "0.95",
                 "--out", str(out)]) == 2
    assert "a confidence interval needs at least 2 seeds" in capsys.readouterr().err
    assert not out.exists()
