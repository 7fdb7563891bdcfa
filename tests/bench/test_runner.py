"""The grid runner against a fake engine: every cell, skip on restart, resume, lr selection, failures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sensitune.bench import write_report
from sensitune.bench.runner import choose_lr, parse_methods, run_bench

FAKE = "bench_fake_engine:train"


def calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bench(tmp_path, **kw):
    opts = dict(suite="mini", tasks=["digits", "textile"], model="tiny", methods="linear,lora", seeds=[0, 1],
                out=tmp_path / "res", isolate=False, progress=False, train=FAKE, echo=lambda s: None,
                overrides={"calls_file": str(tmp_path / "calls.jsonl"), "epochs": 1})
    opts.update(kw)
    return run_bench(**opts)


def test_every_cell_once_then_skipped_and_a_killed_cell_resumes(tmp_path):
    log = tmp_path / "calls.jsonl"
    manifest = bench(tmp_path)
    first = calls(log)
    assert len(first) == 8 and len(manifest["cells"]) == 8
    assert {(c["task"], c["method"], c["seed"]) for c in first} == {
        (t, m, s) for t in ("digits", "textile") for m in ("linear", "lora") for s in (0, 1)}
    assert all(c["protocol"] == "final" and not c["resume"] and c["overrides"]["epochs"] == 1 for c in first)
    bench(tmp_path)
    assert len(calls(log)) == 8  # all finished: nothing ran again
    # a cell killed midway leaves run.json but no results.json: it is resumed, the rest skipped
    (tmp_path / "res/textile/lora/seed1/results.json").unlink()
    bench(tmp_path)
    again = calls(log)[8:]
    assert len(again) == 1 and again[0]["resume"] and again[0]["out"].endswith("textile/lora/seed1")
    # the report over the fake grid: linear on digits = 50 + len("digits") + seed; ± = 12.7062 * 0.5
    text = write_report(tmp_path / "res", plots=False)["markdown"]
    assert "| linear | 56.5 ± 6.4 |" in text


def test_lr_selected_on_val_smaller_wins_near_ties_and_test_uses_it(tmp_path):
    log = tmp_path / "calls.jsonl"
    manifest = bench(tmp_path, methods="lora", tasks=["digits"], lr_grid=[1e-1, 1e-2, 1e-3])
    c = calls(log)
    select = [x for x in c if x["protocol"] == "val"]
    final = [x for x in c if x["protocol"] == "final"]
    assert sorted(x["lr"] for x in select) == [1e-3, 1e-2, 1e-1] and {x["seed"] for x in select} == {0}
    # val: 1e-3 -> 80.0, 1e-2 -> 80.5 (within 1 point of the best), 1e-1 -> 60.0
    assert manifest["selection"]["digits/lora"]["lr"] == 1e-3
    assert [(x["seed"], x["lr"]) for x in final] == [(0, 1e-3), (1, 1e-3)]
    # every selection ran before the first final cell: test never informs the choice
    assert max(i for i, x in enumerate(c) if x["protocol"] == "val") < min(i for i, x in enumerate(c) if x["protocol"] == "final")
    tight = bench(tmp_path / "t", methods="lora", tasks=["digits"], lr_grid=[1e-2, 1e-3], tie_tolerance=0.1,
                  overrides={"calls_file": str(tmp_path / "t.jsonl")})
    assert tight["selection"]["digits/lora"]["lr"] == 1e-2


def test_diverged_lr_is_never_chosen_and_is_recorded(tmp_path):
    manifest = bench(tmp_path, methods="lora", tasks=["digits"], seeds=[0], lr_grid=[1e-3, 1.0])
    assert manifest["selection"]["digits/lora"]["lr"] == 1e-3
    assert list(manifest["failed"]) == ["digits/lora/select/lr1"]
    assert "NaN" in manifest["failed"]["digits/lora/select/lr1"]


def test_failed_cell_is_kept_failed_until_retried(tmp_path):
    log = tmp_path / "calls.jsonl"
    over = {"calls_file": str(log), "fail_on": ["lora"]}
    manifest = bench(tmp_path, overrides=over, seeds=[0])
    assert sorted(manifest["failed"]) == ["digits/lora/seed0", "textile/lora/seed0"]
    assert (tmp_path / "res/logs/digits__lora__seed0.log").read_text().count("FloatingPointError: loss became NaN") == 1
    n = len(calls(log))
    bench(tmp_path, overrides=over, seeds=[0])
    assert len(calls(log)) == n  # a failure is not silently rerun
    manifest = bench(tmp_path, overrides=over, seeds=[0], retry_failed=True)
    retried = calls(log)[n:]
    assert len(retried) == 2 and all(c["overwrite"] and not c["resume"] for c in retried)


def test_method_options_reach_the_engine_and_label_the_column(tmp_path):
    log = tmp_path / "calls.jsonl"
    manifest = bench(tmp_path, methods="lora,bi-lora:bits=32:epochs=3", tasks=["digits"], seeds=[0])
    assert manifest["methods"] == ["lora", "bi-lora:bits=32:epochs=3"]
    lora, twin = calls(log)
    # planner options go to method_options, training settings override the grid's for this column only
    assert twin["options"] == {"bits": 32} and twin["overrides"]["epochs"] == 3
    assert twin["out"].endswith("digits/bi-lora+bits=32+epochs=3/seed0")
    assert lora["options"] is None and lora["overrides"]["epochs"] == 1
    bench(tmp_path / "lr", methods="lora:lr=0.01", tasks=["digits"], seeds=[0],
          overrides={"calls_file": str(tmp_path / "lr.jsonl")})
    assert calls(tmp_path / "lr.jsonl")[0]["lr"] == 0.01  # a column's own lr, without a grid
    bench(tmp_path / "b", methods="lora,bi-lora:budget=5%", tasks=["digits"], seeds=[0], budget="1M",
          overrides={"calls_file": str(tmp_path / "b.jsonl")})
    lora, bi = calls(tmp_path / "b.jsonl")
    # lora takes no budget (the grid's is not passed); a column's own budget is, and is no planner option
    assert lora["budget"] is None and bi["budget"] == "5%" and bi["options"] is None
    with pytest.raises(ValueError, match="exclude each other"):
        bench(tmp_path / "lr2", methods="lora:lr=0.01", lr_grid=[1e-3])


def test_restart_with_other_settings_or_foreign_folder_is_refused(tmp_path):
    bench(tmp_path, seeds=[0])
    with pytest.raises(ValueError, match="model: was 'tiny', now 'other'"):
        bench(tmp_path, seeds=[0], model="other")
    # cells trained under other engine defaults (an older sensitune) are another experiment
    manifest_path = tmp_path / "res" / "bench.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["engine_defaults"]["norm_stats"] = "batch"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="engine_defaults: norm_stats was 'batch', now 'pretrained'"):
        bench(tmp_path, seeds=[0])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        bench(tmp_path, out=tmp_path / "junk")
    with pytest.raises(ValueError, match="set by the bench protocol"):
        bench(tmp_path / "p", overrides={"seed": 3, "calls_file": "x"})


def test_cells_run_in_their_own_processes_side_by_side(tmp_path):
    log = tmp_path / "calls.jsonl"
    manifest = bench(tmp_path, methods="linear", seeds=[0], isolate=True, jobs=2, threads=1)
    got = calls(log)
    assert len(got) == 2 and all(c["pid"] != os.getpid() for c in got)
    assert got[0]["pid"] != got[1]["pid"] and {c["threads"] for c in got} == {1}
    assert not manifest["failed"] and all((tmp_path / "res" / c["path"] / "results.json").is_file()
                                          for c in manifest["cells"])
    assert set(manifest["cpu_seconds"]) == {c["path"] for c in manifest["cells"]}
    with pytest.raises(ValueError, match="in-process"):
        bench(tmp_path / "x", jobs=2)


def test_choose_lr_and_parse_methods():
    assert choose_lr({1e-3: 80.0, 1e-2: 80.5, 3e-2: 81.2}) == 1e-2  # 80.5 >= 81.2 - 1
    assert choose_lr({1e-3: 80.0, 1e-2: None}) == 1e-3
    with pytest.raises(ValueError, match="every learning rate"):
        choose_lr({1e-3: None, 1e-2: float("nan")})
    specs = parse_methods("linear, bi-lora:bits=32:rank=8")
    assert [(s.label, s.name, s.options) for s in specs] == [
        ("linear", "linear", {}), ("bi-lora:bits=32:rank=8", "bi-lora", {"bits": 32, "rank": 8})]
    with pytest.raises(ValueError, match="unknown method 'lroa'"):
        parse_methods("lroa")
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("lora:bits")
    with pytest.raises(ValueError, match="given twice"):
        parse_methods("lora,lora")
