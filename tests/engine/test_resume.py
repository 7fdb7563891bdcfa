"""Exact resume: an interrupted run continued from its checkpoint ends like an uninterrupted one."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_child
from engine_helpers import Crash, TinyTask, freeze_first_block, same_history, tiny_vit, trainable
from sensitune.engine.checkpoint import load_checkpoint
from sensitune.engine.config import build_config
from sensitune.engine.trainer import fit

CHILD = Path(__file__).with_name("train_child.py")


def _cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=1, progress=False, weight_decay=0.05)
    return build_config(overrides={**base, **kw})


@pytest.mark.parametrize("checkpoint_every", [0, 3])
def test_resume_after_crash_matches_uninterrupted(tmp_path, checkpoint_every):
    # drop-path and augmentation make every step consume randomness: resume must restore it exactly
    ref = tiny_vit(drop_path=0.2)
    freeze_first_block(ref)
    r_ref = fit(ref, TinyTask(32, augment=True), _cfg(checkpoint_every=checkpoint_every), log=lambda s: None)

    crashed = tiny_vit(drop_path=0.2)
    freeze_first_block(crashed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, Crash(32 + 8 * 2 + 3, n=32, augment=True), _cfg(checkpoint_every=checkpoint_every),
            out_dir=tmp_path, log=lambda s: None)  # dies in epoch 2, step 3
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == ((1, 0) if checkpoint_every == 0 else (1, 2))

    resumed = tiny_vit(drop_path=0.2)  # a fresh process would rebuild the same initial model
    freeze_first_block(resumed)
    r = fit(resumed, TinyTask(32, augment=True), _cfg(checkpoint_every=checkpoint_every), out_dir=tmp_path,
            resume=True, log=lambda s: None)
    assert r.resumed_from["epoch"] == 1
    a, b = trainable(ref), trainable(resumed)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    same_history(r_ref.history, r.history)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_resume_refuses_changed_settings(tmp_path):
    model = tiny_vit()
    fit(model, TinyTask(16), _cfg(epochs=1), out_dir=tmp_path, log=lambda s: None)
    with pytest.raises(ValueError, match=r"settings differ.*lr: was 0.001, now 0.002"):
        fit(tiny_vit(), TinyTask(16), _cfg(epochs=1, lr=2e-3, warmup_epochs=0), out_dir=tmp_path, resume=True, log=lambda s: None)


def test_a_checkpoint_from_before_new_settings_resumes_under_their_legacy_values(tmp_path):
    """Keys added later (norm_stats, head_init, head_lr) are read as the behaviour old runs had:
    no norm setting at all = batch statistics; 0.1's ``frozen_bn: eval`` = pretrained-if-frozen."""
    from sensitune.engine.checkpoint import save_checkpoint

    fit(tiny_vit(), TinyTask(16), _cfg(epochs=1), out_dir=tmp_path, log=lambda s: None)
    path = tmp_path / "checkpoints" / "last.pt"
    old = load_checkpoint(path)
    for key in ("norm_stats", "head_init", "head_lr"):
        del old["config"][key]
    save_checkpoint(path, **{k: v for k, v in old.items() if k != "format"})
    with pytest.raises(ValueError, match=r"norm_stats: was 'batch', now 'pretrained'.*--set norm_stats=batch"):
        fit(tiny_vit(), TinyTask(16), _cfg(epochs=1), out_dir=tmp_path, resume=True, log=lambda s: None)
    r = fit(tiny_vit(), TinyTask(16), _cfg(epochs=1, norm_stats="batch", head_init="default"), out_dir=tmp_path,
            resume=True, log=lambda s: None)
    assert r.resumed_from is not None
    old["config"]["frozen_bn"] = "eval"  # as sensitune 0.1 wrote it
    save_checkpoint(path, **{k: v for k, v in old.items() if k != "format"})
    with pytest.raises(ValueError, match=r"norm_stats: was 'pretrained-if-frozen', now 'pretrained'"):
        fit(tiny_vit(), TinyTask(16), _cfg(epochs=1, head_init="default"), out_dir=tmp_path, resume=True,
            log=lambda s: None)
    r = fit(tiny_vit(), TinyTask(16), _cfg(epochs=1, norm_stats="pretrained-if-frozen", head_init="default"),
            out_dir=tmp_path, resume=True, log=lambda s: None)
    assert r.resumed_from is not None


def _child(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(out), "--augment", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    victim = _child(run_dir, "--slow", "0.02")
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until training is under way (epoch 1 done), then kill
        if (run_dir / "metrics.csv").is_file():
            break
        if victim.poll() is not None:
            pytest.fail(f"child ended early: {victim.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    time.sleep(0.15)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert ckpt.is_file() and not (run_dir / "final.safetensors").exists()
    state = load_checkpoint(ckpt)
    assert 4 <= state["global_step"] < 12  # killed mid-training, after at least one epoch

    resumed = _child(run_dir)
    train_child.main([str(ref_dir), "--augment"])  # the uninterrupted reference, in this process meanwhile
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-3000:]
    meta = json.loads((run_dir / "history.json").read_text())
    assert meta["resumed_from"]["global_step"] == state["global_step"]
    a, b = load_file(ref_dir / "final.safetensors"), load_file(run_dir / "final.safetensors")
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    same_history(json.loads((ref_dir / "history.json").read_text())["history"], meta["history"])
