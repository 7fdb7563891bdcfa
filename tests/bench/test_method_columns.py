"""Bench columns with options scoped by stage: old column strings mean what they meant (same label,
options and folder, so old bench folders resume), scoped ones reach their stage, bad ones are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sensitune.bench.runner import parse_methods, run_bench

FAKE = "bench_fake_engine:train"

#: columns as earlier versions parsed them (label, name, options, folder): bench.json records these
OLD_COLUMNS = [
    ("linear", "linear", {}, "linear"),
    ("bi-lora:bits=32:rank=8", "bi-lora", {"bits": 32, "rank": 8}, "bi-lora+bits=32+rank=8"),
    ("gps:score_batches=8", "gps", {"score_batches": 8}, "gps+score_batches=8"),
    ("spt-lora:budget=5%", "spt-lora", {"budget": "5%"}, "spt-lora+budget=5+"),
    ("lora:lr=0.01:head_init=default", "lora", {"lr": 0.01, "head_init": "default"}, "lora+lr=0.01+head_init=default"),
    ("bi-lora:bits=32:epochs=3", "bi-lora", {"bits": 32, "epochs": 3}, "bi-lora+bits=32+epochs=3"),
    ("lora:rank=4:targets=qkv:head=false", "lora", {"rank": 4, "targets": "qkv", "head": False},
     "lora+rank=4+targets=qkv+head=false"),
]


def test_old_column_strings_parse_as_before():
    specs = parse_methods(",".join(c[0] for c in OLD_COLUMNS))
    assert [(s.label, s.name, s.options, s.folder) for s in specs] == OLD_COLUMNS


def _calls(path: Path) -> dict[str, dict]:
    return {Path(c["out"]).parent.name: c for c in map(json.loads, path.read_text().splitlines())}


def _bench(tmp_path: Path, methods: str, **kw) -> dict[str, dict]:
    log = tmp_path / "calls.jsonl"
    run_bench(suite="mini", tasks=["digits"], model="tiny", methods=methods, seeds=[0], out=tmp_path / "res",
              isolate=False, progress=False, train=FAKE, echo=lambda s: None,
              overrides={"calls_file": str(log), "epochs": 1}, **kw)
    return _calls(log)


def test_old_columns_call_the_engine_as_before(tmp_path):
    got = _bench(tmp_path, "bi-lora:bits=32:epochs=3,gps:score_batches=8,spt-lora:budget=5%", budget="1M")
    bi, gps, spt = got["bi-lora+bits=32+epochs=3"], got["gps+score_batches=8"], got["spt-lora+budget=5+"]
    assert bi["options"] == {"bits": 32} and bi["overrides"]["epochs"] == 3 and bi["budget"] is None
    assert gps["options"] is None and gps["overrides"]["score_batches"] == 8 and "score_options" not in gps["overrides"]
    assert spt["budget"] == "5%" and spt["options"] is None


def test_scoped_options_reach_their_stage(tmp_path):
    got = _bench(tmp_path, "lora:plan.rank=4:train.drop_path=0.1,lora:plan.drop_path=0.2,gps:score.batches=8:K=2,"
                           "spt-lora:plan.budget=2%")
    lora = got["lora+plan.rank=4+train.drop_path=0.1"]
    assert lora["options"] == {"rank": 4} and lora["overrides"]["drop_path"] == 0.1
    planner_dp = got["lora+plan.drop_path=0.2"]
    assert planner_dp["options"] == {"drop_path": 0.2} and "drop_path" not in planner_dp["overrides"]
    gps = got["gps+score.batches=8+K=2"]
    assert gps["options"] == {"K": 2} and gps["overrides"]["score_options"] == {"batches": 8}
    assert got["spt-lora+plan.budget=2+"]["budget"] == "2%"


def test_a_scoped_lr_is_the_columns_lr(tmp_path):
    got = _bench(tmp_path, "lora:train.lr=0.01")
    assert got["lora+train.lr=0.01"]["lr"] == 0.01
    with pytest.raises(ValueError, match="exclude each other"):
        _bench(tmp_path / "grid", "lora:train.lr=0.01", lr_grid=[1e-3])


@pytest.mark.parametrize("column,message", [
    ("lora:drop_path=0.1", r"'drop_path' is ambiguous: .*write plan\.drop_path=\.\.\. .* or train\.drop_path="),
    ("lora:plna.rank=4", r"names no stage 'plna' \(did you mean 'plan'\?\)"),
    ("lora:rnk=4", r"unknown option 'rnk' \(did you mean 'rank'\?\); the planner lora takes: rank"),
    ("lora:plan.rank=four", r"option rank='four' has the wrong type: the planner lora expects int"),
    ("lora:score.batches=8", r"computes no scores"),
    ("lora:seed=3", r"'seed' is not a column's to set \(the bench protocol sets it per cell\)"),
    ("lora:method_options={}", r"'method_options' is not a column's to set \(write plan\.NAME"),
    ("gps:train.score_options={}", r"'score_options' is not a column's to set \(write score\.NAME"),
    ("spt-lora:budget=1%:plan.budget=2%", r"budget and plan\.budget are the same option"),
])
def test_bad_columns_are_refused_when_parsed(column, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(column)


def test_bench_set_takes_training_settings_bare_or_scoped():
    import argparse

    from sensitune.commands.bench import _key_value

    assert _key_value("train.min_lr=0.001") == _key_value("min_lr=0.001") == ("min_lr", 0.001)
    with pytest.raises(argparse.ArgumentTypeError, match=r"give plan options per column, e\.g\. --methods lora:plan"):
        _key_value("plan.rank=4")
