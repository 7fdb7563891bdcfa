"""train(): the whole pipeline into a run folder, its guards, and re-evaluation of a run."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from engine_helpers import make_vtab
from sensitune.cli import main as cli_main
from sensitune.engine.pipeline import evaluate_run, train

FAST = dict(pretrained="none", img_size=32, epochs=2, batch_size=8, progress=False, lr=3e-3)
MODEL = "test_vit"  # timm's tiny test ViT: 64 wide, 6 blocks


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_vtab(tmp_path_factory.mktemp("data") / "bands")


@pytest.fixture(scope="module")
def lora_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return out, train(MODEL, task, "lora", out, log=lambda s: None, **FAST)


def test_run_folder_and_results(lora_run, task):
    out, res = lora_run
    for name in ("run.json", "plan.json", "checkpoints/last.pt", "metrics.csv", "results.json",
                 "eval_val200_confusion.csv", "eval_val200_confusion.png"):
        assert (out / name).is_file(), name
    assert not (out / "scores.safetensors").exists()  # lora needs no scores
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert (res["train_split"], res["eval_split"], res["eval_samples"]) == ("train800", "val200", 12)
    # trainable counts: the plan's figure equals what has requires_grad; the head is 192*3 + 3
    assert res["trainable_params"] == res["trainable_params_measured"]
    assert res["trainable_params"] - res["trainable_params_without_head"] == 64 * 3 + 3
    # LoRA rank 8 on qkv (64->192), proj (64->64), fc1 (64->192), fc2 (192->64) of 6 blocks: r*(in+out) each
    assert res["trainable_params_without_head"] == 6 * 8 * ((64 + 192) + (64 + 64) + (64 + 192) + (192 + 64))
    assert res["accuracy"] > 60 and res["steps"] == 2 * 3
    assert res["wall_seconds"] > 0 and res["images_per_s"] > 0 and res["peak_memory_mb"] > 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["train_loss"]) == pytest.approx(res["train_loss"])


def test_evaluate_run_reproduces_the_training_time_evaluation(lora_run):
    out, res = lora_run
    again = evaluate_run(out, "val200", log=lambda s: None)
    assert again["accuracy"] == res["accuracy"]
    assert again["loss"] == pytest.approx(res["eval_loss"], rel=1e-5)
    test = evaluate_run(out, "test", log=lambda s: None)
    assert test["num_samples"] == 12 and (out / "eval_test.json").is_file()
    assert (out / "eval_test_confusion.png").is_file()


def test_out_folder_guards(lora_run, task, tmp_path):
    out, res = lora_run
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(MODEL, task, "lora", out, log=lambda s: None, **FAST)
    with pytest.raises(ValueError, match=r"holds a different run \(method: was 'lora', now 'bitfit'\)"):
        train(MODEL, task, "bitfit", out, resume=True, log=lambda s: None, **FAST)
    # resuming a finished run returns its results without training again
    assert train(MODEL, task, "lora", out, resume=True, log=lambda s: None, **FAST) == json.loads(
        (out / "results.json").read_text())
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no sensitune run"):
        train(MODEL, task, "lora", other, overwrite=True, log=lambda s: None, **FAST)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(MODEL, task, "lora", tmp_path / "absent", resume=True, log=lambda s: None, **FAST)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="lorra"), r"unknown method 'lorra' \(did you mean 'lora'\?\)"),
    (dict(method="lora", budget="0.4M"), "takes no budget"),
    (dict(method="lora", learning_rate=0.1), "unknown config key 'learning_rate'"),
    (dict(method="lora", precision="fp64"), "precision"),
])
def test_bad_input_is_refused_before_any_work(task, tmp_path, kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        train(MODEL, task, method, tmp_path / "r", log=lambda s: None, **{**FAST, **kwargs})
    assert not (tmp_path / "r").exists()


def test_scored_method_under_the_final_protocol(task, tmp_path):
    out = tmp_path / "spt"
    (out).mkdir()
    import timm

    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=3)  # a model object works too
    res = train(small, task, "spt-lora", out, budget="1%", protocol="final", score_batches=2, score_batch_size=8,
                log=lambda s: None, **{**FAST, "epochs": 1})
    assert (res["train_split"], res["eval_split"]) == ("train800val200", "test")
    assert (out / "scores.safetensors").is_file() and (out / "plan.json").is_file()
    target = 0.01 * res["backbone_params"]
    assert abs(res["trainable_params_without_head"] - target) <= 0.01 * target  # budget hit within 1 %
    assert res["trainable_params"] == res["trainable_params_measured"]


def test_score_options_reach_the_scorer(task, tmp_path):
    """``score_options`` (``--set score.kinds=[matrix]``) is what the scorer is called with: the
    saved score map holds matrices only, and the SPT plan trains no vector whole or sparsely."""
    from safetensors import safe_open

    from sensitune.models import tunable_tensors
    from sensitune.planning import Plan

    out = tmp_path / "spt-matrices"
    train(MODEL, task, "spt-lora", out, budget="2%", score_batches=2, score_batch_size=8,
          score_options={"kinds": ["matrix"]}, log=lambda s: None, **{**FAST, "epochs": 1})
    with safe_open(str(out / "scores.safetensors"), "pt") as f:
        scored = set(f.keys())
    import timm

    kinds = {t.name: t.kind for t in tunable_tensors(timm.create_model(MODEL, pretrained=False, num_classes=3))}
    assert scored and {kinds[n] for n in scored} == {"matrix"}
    plan = Plan.load(out / "plan.json")
    assert all(kinds.get(u.target, "matrix") != "vector" for u in plan.units if u.mode != "head")


def test_cli_train_and_eval(task, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--model", MODEL, "--task", str(task), "--method", "bitfit", "--out", str(out),
            "--pretrained", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--no-progress",
            "--set", "warmup_epochs=0"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert '"method": "bitfit"' in printed and '"accuracy"' in printed
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "bitfit" and res["config"]["warmup_epochs"] == 0.0
    assert cli_main(argv) == 2  # the folder now holds a run
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite", "--epochs", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    assert cli_main(["eval", "--run", str(out), "--split", "test"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert cli_main(["train", "--model", MODEL, "--task", str(task), "--method", "gps", "--budget", "1%",
                     "--out", str(tmp_path / "x")]) == 2
    assert "takes no budget" in capsys.readouterr().err


def test_a_model_object_must_match_the_task(task, tmp_path):
    import timm

    wrong = timm.create_model(MODEL, img_size=32, depth=1, num_classes=5)
    with pytest.raises(ValueError, match="head has 5 outputs but the task has 3 classes"):
        train(wrong, task, "linear", tmp_path / "r", log=lambda s: None, **FAST)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(augment="mixup"), ValueError, "augment='mixup' is unknown"),
    (dict(eval_split="validation"), Exception, "validation"),
    (dict(model="no_such_net_xyz"), Exception, "no_such_net_xyz"),
])
def test_setup_errors_leave_no_run_behind(task, tmp_path, kwargs, error, match):
    model = kwargs.pop("model", MODEL)
    with pytest.raises(error, match=match):
        train(model, task, "linear", tmp_path / "r", log=lambda s: None, **{**FAST, **kwargs})
    assert not (tmp_path / "r" / "run.json").exists()


# -- results.json stays what the bench, the report and earlier run folders read ---------------------
#: results.json of the lora_run above, written by train() before it became stages over a TrainRun
#: (the ~40-key dict built by hand); its keys, their order and types are the contract
BEFORE_STAGES = Path(__file__).with_name("fixtures") / "results_lora_before_stages.json"
WALL_CLOCK = {"wall_seconds", "train_seconds", "stage_seconds", "images_per_s", "peak_memory_mb"}


def test_results_json_keeps_the_keys_order_and_types_of_earlier_runs(lora_run):
    out, res = lora_run
    before = json.loads(BEFORE_STAGES.read_text())
    now = json.loads((out / "results.json").read_text())
    assert list(now) == list(before)  # same keys, same order
    assert list(now["stage_seconds"]) == list(before["stage_seconds"]) == ["setup", "plan", "train", "evaluate", "save"]
    assert {k: type(v).__name__ for k, v in now.items()} == {k: type(v).__name__ for k, v in before.items()}
    assert list(now["config"]) == list(before["config"]) and list(now["model_source"]) == list(before["model_source"])
    # what does not depend on numerics or the clock is equal, value for value
    same = ("format", "status", "model", "method", "budget", "task_name", "group", "num_classes", "protocol",
            "train_split", "eval_split", "eval_samples", "epochs", "steps", "lr", "seed", "trainable_params",
            "trainable_params_without_head", "trainable_params_measured", "backbone_params", "plan_mix",
            "bytes_estimate", "bytes_estimate_without_head", "delta", "resumed_from", "device", "world_size",
            "precision", "model_source", "img_size", "diverged")
    # (base_fingerprint is left out: the seeded test base initialises a few ULPs apart on another
    # CPU, so its hash is per machine; its key and type are checked above)
    assert {k: now[k] for k in same} == {k: before[k] for k in same}
    assert {k: v for k, v in now["config"].items() if k != "data_root"} == \
        {k: v for k, v in before["config"].items() if k != "data_root"}
    assert all(now[k] > 0 for k in WALL_CLOCK - {"stage_seconds"})


def test_results_json_is_the_returned_dict_as_indented_json(lora_run):
    """The bytes are json.dumps(indent=2) + newline (what pipeline's own writer wrote before
    sensitune.io's replaced it), and the file holds what train() returned."""
    out, res = lora_run
    text = (out / "results.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert json.loads(text) == json.loads(json.dumps(res))
    run = json.loads((out / "run.json").read_text())
    assert (out / "run.json").read_text() == json.dumps(run, indent=2) + "\n"
    assert list(run) == ["format", "model", "task", "method", "budget", "config", "splits", "world_size",
                         "base_fingerprint"]


def test_run_results_fields_are_results_json_keys():
    from dataclasses import fields

    from sensitune.engine.pipeline import RunResults

    assert [f.name for f in fields(RunResults)] == list(json.loads(BEFORE_STAGES.read_text()))
