"""Bad input stops before any work, a diverged run keeps a usable checkpoint, and nothing a
refused or failed run leaves behind blocks the corrected command (CLI: exit 2, one line)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_helpers import make_vtab
from sensitune.cli import main as cli_main

MODEL = "test_vit"
BASE = ["--pretrained", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_vtab(tmp_path_factory.mktemp("data") / "bands")


@pytest.fixture
def fresh_task(tmp_path) -> Path:
    """A task folder a test may break."""
    return make_vtab(tmp_path / "data" / "bands")


def argv(task: Path, out: Path, method: str = "linear", *extra: str) -> list[str]:
    return ["train", "--model", MODEL, "--task", str(task), "--method", method, "--out", str(out), *BASE, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit 2 and one error line without a traceback; return it."""
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sensitune train: error: ")]
    assert len(lines) == 1, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Scoring, planning or training would fail the test: a refusal must come before them."""
    import sensitune.engine.pipeline as pipeline
    import sensitune.planning as planning
    import sensitune.scoring as scoring

    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(scoring, "score", forbidden)
    monkeypatch.setattr(planning, "make_plan", forbidden)
    for name in ("score", "make_plan", "fit"):  # the names the pipeline calls, imported at its top
        monkeypatch.setattr(pipeline, name, forbidden)


@pytest.mark.parametrize("budget,message", [
    ("abc", "budget 'abc' is not a count"),
    ("0", "budget 0 is 0 parameters; it must be > 0"),
    ("150%", "budget '150%' is a share of the backbone's parameters: it must be above 0% and at most 100%"),
    ("10M", "budget '10M' = 10,000,000 parameters is more than the whole backbone"),
])
def test_a_bad_budget_is_refused_before_scoring_and_writes_nothing(task, tmp_path, capsys, no_work, budget, message):
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, "spt-lora", "--budget", budget))
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize("method,options,message", [
    ("lora", "{rnk: 4}", "method 'lora': unknown option 'rnk' (did you mean 'rank'?); the planner lora takes: "
                         "rank (int), targets (any), slices (str | None)"),
    ("lora", "{rank: '4'}", "method 'lora': option rank='4' has the wrong type: the planner lora expects int"),
    ("spt-lora", "{alpha: ten}", "option alpha='ten' has the wrong type: the planner spt-lora expects float"),
    ("gps", "{k: 2}", "unknown option 'k' (did you mean 'K'?); the planner gps takes: K (int), head (bool)"),
])
def test_bad_method_options_are_refused_before_any_work(task, tmp_path, capsys, no_work, method, options, message):
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, method, "--set", f"method_options={options}"))
    assert message in err
    assert not out.exists()


def test_an_option_the_model_cannot_take_is_refused_before_anything_is_written(task, tmp_path, capsys):
    # a plan without scores is made before the folder is touched, so its own checks come first too
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, "lora", "--set", "method_options={targets: no_such_layer}"))
    assert "no_such_layer" in err and not out.exists()


def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(task, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, "spt-lora", "--batch-size", "64"))
    assert "batch_size 64 is larger than the training split train800 (24 images): no full batch" in err
    assert not out.exists()


def test_an_empty_eval_split_is_refused_before_any_work(fresh_task, tmp_path, capsys, no_work):
    (fresh_task / "val200.txt").write_text("")
    out = tmp_path / "run"
    err = refused(capsys, argv(fresh_task, out))
    assert "val200.txt lists no samples: the split is empty" in err and not out.exists()


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_bad_image_of_every_split_is_reported_together_before_any_work(fresh_task, tmp_path, capsys, no_work):
    _truncated_jpeg(fresh_task / "images" / "val200" / "cut.jpg")
    lines = (fresh_task / "val200.txt").read_text().splitlines()
    lines[4] = "images/val200/cut.jpg 1"
    (fresh_task / "val200.txt").write_text("\n".join(lines) + "\n")
    (fresh_task / "images" / "train800" / "000007.png").write_bytes(b"broken")
    (fresh_task / "images" / "train800" / "000011.png").unlink()
    out = tmp_path / "run"
    err = refused(capsys, argv(fresh_task, out))
    assert "3 problems in the splits this run reads (train800, val200)" in err
    assert "train800.txt:8: image " in err and "000007.png is not a readable image" in err
    assert "train800.txt:12: image " in err and "000011.png does not exist" in err
    assert "val200.txt:5: image " in err and "cut.jpg is not a readable image" in err and "truncated" in err
    assert not out.exists()


def test_a_stray_label_is_refused_listing_the_labels_found(fresh_task, tmp_path, capsys, no_work):
    lines = (fresh_task / "train800.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 99"
    (fresh_task / "train800.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    err = refused(capsys, argv(fresh_task, out))
    assert "train800.txt has labels 0-2, 99 (4 distinct), so labels 3-98 have no training image" in err
    assert "train800.txt:2: label 99 lies above label 3" in err
    assert not out.exists()


def test_a_refused_overwrite_leaves_the_old_run_byte_identical(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(argv(task, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    refused(capsys, argv(task, out, "spt-lora", "--overwrite", "--budget", "abc"))
    refused(capsys, argv(task, out, "linear", "--overwrite", "--batch-size", "64"))
    assert snapshot(out) == before


def test_a_run_that_failed_before_training_does_not_block_the_corrected_command(task, tmp_path, capsys, monkeypatch):
    """A failure after the folder was written but before the first checkpoint (run.json and
    plan.json exist, nothing trained) leaves a folder the next command may use."""
    import sensitune.engine.pipeline as pipeline

    out = tmp_path / "run"
    calls = []
    real_fit = pipeline.fit

    def failing_fit(*a, **k):  # a setup that fails after the folder was written
        calls.append(1)
        raise ValueError("simulated failure before the first checkpoint")
    monkeypatch.setattr(pipeline, "fit", failing_fit)
    refused(capsys, argv(task, out, "linear"))
    assert (out / "run.json").is_file() and (out / "plan.json").is_file() and calls
    monkeypatch.setattr(pipeline, "fit", real_fit)
    assert cli_main(argv(task, out, "bitfit")) == 0  # another method, no --overwrite: the folder was free
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "bitfit" and "never started training" in capsys.readouterr().out


def test_lr_1e6_stops_with_one_line_and_keeps_the_last_finite_checkpoint(task, tmp_path, capsys):
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, "full", "--lr", "1e6", "--epochs", "3", "--set", "warmup_epochs=0",
                               "--set", "checkpoint_every=1"))
    assert "training stopped: non-finite" in err and "Try a lower lr" in err
    # step 1 leaves huge but finite weights (checkpointed), a later step goes non-finite
    from sensitune.engine.checkpoint import load_checkpoint

    ckpt_path = out / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert f"the last checkpoint with finite weights is kept: {ckpt_path} (after global step {ckpt['global_step']}, " \
        in err
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (out / "results.json").exists()


def _delta_with_nan(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "delta.safetensors")
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, dst / "delta.safetensors")
    return dst


def test_eval_predict_and_export_refuse_non_finite_weights(task, tmp_path, capsys):
    from sensitune.engine.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert cli_main(argv(task, out)) == 0
    capsys.readouterr()
    bad_delta = _delta_with_nan(out / "delta", tmp_path / "bad_delta")
    image = sorted((task / "images" / "test").iterdir())[0]
    for args in (["predict", "--delta", str(bad_delta), str(image)],
                 ["export", "--run", str(bad_delta), "--format", "delta", "--out", str(tmp_path / "exp")]):
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert "holds non-finite weights" in err and "Traceback" not in err, err
    assert not (tmp_path / "exp").exists()
    ckpt_path = out / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    ckpt["model"]["head.weight"][0, 0] = float("inf")
    save_checkpoint(ckpt_path, **{k: v for k, v in ckpt.items() if k != "format"})
    assert cli_main(["eval", "--run", str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "holds non-finite weights (1 of " in err and "head.weight" in err
    assert not (out / "eval_test.json").exists()


def test_resuming_a_finished_run_with_other_settings_is_refused_listing_them(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(argv(task, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    err = refused(capsys, argv(task, out, "linear", "--resume", "--epochs", "5", "--lr", "0.5"))
    assert "the run is complete and these settings differ from it: epochs: was 1, now 5, lr: was 0.01, now 0.5" in err
    assert "--overwrite" in err
    assert snapshot(out) == before
    assert cli_main(argv(task, out, "linear", "--resume")) == 0  # the same settings: its results, unchanged
    assert "run already complete" in capsys.readouterr().out
    assert snapshot(out) == before


def test_scorer_options_for_a_method_without_scores_are_refused_before_any_work(task, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    err = refused(capsys, argv(task, out, "lora", "--set", "score_options={batches: 8}"))
    assert "method 'lora' computes no scores" in err and not out.exists()
