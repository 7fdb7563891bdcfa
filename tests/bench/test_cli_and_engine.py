"""The CLI entry points, and one real grid through the real engine (tiny random model)."""
from __future__ import annotations

import json

from sensitune.bench import run_bench, write_report
from sensitune.cli import main
from test_report import make_bench


def test_report_command_dispatches_a_bench_folder(tmp_path, capsys):
    make_bench(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| m1 |" in out and (tmp_path / "report.md").is_file() and (tmp_path / "groups.png").is_file()


def test_bench_command_refuses_bad_input(tmp_path, capsys):
    assert main(["bench", "--suite", "vtab1k", "--out", str(tmp_path / "r")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["bench", "--suite", "vtab1k", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "19 task folder(s) missing" in capsys.readouterr().err
    assert main(["bench", "--suite", "mini", "--methods", "lora,nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_real_engine_cells_feed_the_report(tmp_path):
    """Two real train() runs (random-init timm test model, 32 px, 2 epochs at lr 0.05): the linear probe
    learns and the report reads its results; BitFit's loss ends above its start, so the run is flagged
    diverged, listed, and left out of the table."""
    out = tmp_path / "res"
    manifest = run_bench(suite="mini", tasks=["textures"], model="test_efficientnet",
                         methods="linear:lr=0.05,bitfit:lr=0.05",
                         out=out, overrides={"pretrained": "none", "img_size": 32, "epochs": 2, "batch_size": 25,
                                    "train_split": "val200", "eval_split": "val200"},  # small and quick
                         isolate=False, threads=1, progress=False, echo=lambda s: None)
    assert not manifest["failed"]
    results = {m: json.loads((out / f"textures/{m}+lr=0.05/seed0/results.json").read_text()) for m in ("linear", "bitfit")}
    assert all(r["protocol"] == "final" and r["eval_split"] == "val200" for r in results.values())
    assert not results["linear"]["diverged"] and results["bitfit"]["diverged"]
    assert results["bitfit"]["train_loss"] > results["bitfit"]["train_loss_start"]
    assert list(manifest["diverged"]) == ["textures/bitfit+lr=0.05/seed0"]
    report = write_report(out, plots=False)
    linear, bitfit = report["summaries"]
    assert linear.task_mean["textures"] == results["linear"]["accuracy"]
    assert bitfit.missing == ["textures"] and "Diverged runs" in report["markdown"]
    assert linear.costs["params_no_head"] == 0
    assert linear.costs["bytes"] == results["linear"]["delta_bytes_on_disk"] > 0


def test_demo_sizes_bench_has_the_claims_columns_and_full_covers_every_method(tmp_path):
    import argparse

    import pytest

    from sensitune.bench.runner import parse_methods
    from sensitune.commands.demo import DEMO, FULL_METHODS, SIZES, TASKS, plan
    from sensitune.methods import METHODS

    specs = parse_methods(FULL_METHODS)
    assert {s.name for s in specs} == set(METHODS)
    assert {s.label for s in parse_methods(DEMO["methods"])} <= {s.label for s in specs}  # the demo is a subset

    def call(size, **kw):
        args = dict(size=size, methods=None, tasks=None, epochs=None, img_size=64, jobs=2, threads=1, out=None,
                    no_progress=True)
        return plan(argparse.Namespace(**{**args, **kw}))

    bench = call("bench")
    names = [(s.name, s.options) for s in parse_methods(bench["methods"])]
    for needed in ("linear", "full", "lora", "spt-lora", "gps", "bi-lora"):
        assert any(n == needed for n, _ in names)
    assert ("spt-lora", {"budget": 182272}) in names and ("bi-lora", {"bits": 32}) in names
    assert len(bench["seeds"]) >= 3 and bench["select_scope"] == "suite" and bench["lr_grid"]
    assert "textures" not in bench["tasks"] and bench["tasks"] == list(TASKS)
    demo = call("demo")
    assert demo["seeds"] == [0] and demo["overrides"]["train_split"] == "val200" and not demo["lr_grid"]
    # one recipe family: what differs is data, epochs, batch and seeds, nothing else
    same = {k for k in demo["overrides"] if k not in ("train_split", "epochs", "batch_size")}
    assert all(demo["overrides"][k] == bench["overrides"][k] for k in same)
    assert {s.label for s in parse_methods(SIZES["bench-extra"]["methods"])}.isdisjoint(
        {s.label for s in parse_methods(bench["methods"])})
    with pytest.raises(SystemExit, match="exclude each other"):
        main(["demo", "--full", "--methods", "linear", "--out", str(tmp_path / "x")])
