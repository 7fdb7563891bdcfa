"""Training and artifacts on every device: a short `sensitune train` under bf16 and fp16 (gradient
scaler), an interrupted run resumed from its checkpoint, a delta saved on the device loaded on CPU."""
from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch

import sensitune
from cuda_helpers import sibling
from sensitune.cli import main as cli_main
from sensitune.engine.checkpoint import load_checkpoint
from sensitune.engine.config import build_config
from sensitune.engine.trainer import fit

ENGINE = sibling("engine/engine_helpers.py")  # tiny_vit, TinyTask, Crash, trainable, same_history
PIPELINE = sibling("engine/test_pipeline.py")  # make_vtab
cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    sizes = {"train800": 48, "val200": 12, "test": 12}
    return PIPELINE.make_vtab(tmp_path_factory.mktemp("data") / "bands", sizes=sizes)


@pytest.mark.parametrize("device, precision, method", [
    ("cpu", "bf16", "gps"),
    pytest.param("cuda", "bf16", "gps", marks=cuda),
    pytest.param("cuda", "bf16", "spt-lora", marks=cuda),
    pytest.param("cuda", "fp16", "gps", marks=cuda),
    pytest.param("cuda", "fp16", "spt-lora", marks=cuda),
])
def test_short_train_under_mixed_precision(task, tmp_path, device, precision, method):
    """`sensitune train` end to end; under fp16 the gradient scaler's state is checkpointed and
    steps were taken (the sparse values moved), whatever steps it skipped for overflow."""
    out = tmp_path / "run"
    argv = ["train", "--model", "test_vit", "--task", str(task), "--method", method, "--pretrained", "none",
            "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--precision", precision,
            "--device", device, "--no-progress", "--out", str(out),
            "--set", "score_batches=1", "--set", "score_batch_size=8"]
    if method == "spt-lora":
        argv += ["--budget", "2%"]
    assert cli_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["precision"] == precision and res["device"].startswith(device)
    assert res["steps"] == 2 * 48 // 8
    assert math.isfinite(res["train_loss"]) and math.isfinite(res["eval_loss"])
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    if precision == "fp16":
        scale = ckpt["scaler"]["scale"]
        assert 0 < scale <= 2.0 ** 16 and math.isfinite(scale)
    else:
        assert ckpt["scaler"] is None
    deltas = [v for k, v in ckpt["model"].items() if k.endswith("weight_delta")]
    assert deltas and any(bool(d.abs().sum() > 0) for d in deltas)  # sparse values trained from zero
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point())


def _gps_vit(drop_path: float) -> torch.nn.Module:
    model = ENGINE.tiny_vit(drop_path=drop_path)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    return sensitune.apply_plan(model, sensitune.make_plan(model, scores, "gps"))


@pytest.mark.parametrize("device, precision", [
    ("cpu", "fp32"), pytest.param("cuda", "fp32", marks=cuda), pytest.param("cuda", "fp16", marks=cuda)])
def test_checkpoint_made_on_the_device_resumes_exactly(tmp_path, device, precision):
    """Crash mid-epoch, resume from the mid-epoch checkpoint: the same weights and metrics as an
    uninterrupted run. Drop-path draws from the device's RNG and augmentation from the CPU's, so
    both RNG states (and, under fp16, the scaler's) must come back. Where two uninterrupted runs
    agree bit for bit (CPU; CUDA with deterministic kernels) the resumed run must too; otherwise it
    may differ by no more than a few times the run-to-run difference of the kernels."""
    cfg = build_config(overrides=dict(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=1, progress=False,
                                      weight_decay=0.05, checkpoint_every=3, device=device, precision=precision))
    quiet = {"log": lambda s: None}
    refs = []
    for _ in range(2 if device == "cuda" else 1):  # CPU training runs deterministic algorithms
        ref = _gps_vit(0.2)
        refs.append((fit(ref, ENGINE.TinyTask(32, augment=True), cfg, **quiet), ENGINE.trainable(ref)))
    refs += refs[:1] * (2 - len(refs))
    crashed = _gps_vit(0.2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, ENGINE.Crash(32 + 8 * 2 + 3, n=32, augment=True), cfg, out_dir=tmp_path, **quiet)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 2)
    assert ("cuda" in ckpt["rng"]) == torch.cuda.is_available()
    resumed = _gps_vit(0.2)
    r = fit(resumed, ENGINE.TinyTask(32, augment=True), cfg, out_dir=tmp_path, resume=True, **quiet)
    assert r.resumed_from == {"epoch": 1, "step_in_epoch": 2, "global_step": 6}
    (r1, a), (_, b) = refs
    got = ENGINE.trainable(resumed)
    assert got.keys() == a.keys()
    deterministic = all(torch.equal(a[n], b[n]) for n in a)
    for n in a:
        assert got[n].device.type == device, n
        if deterministic:
            assert torch.equal(got[n], a[n]), n
        else:
            noise = (a[n] - b[n]).abs().max().item()
            assert (got[n] - a[n]).abs().max().item() <= 4 * noise + 1e-7, n
    if deterministic:
        ENGINE.same_history(r1.history, r.history)


@pytest.mark.parametrize("method, budget", [("spt-lora", "2%"), ("bi-lora", None)])
def test_delta_saved_on_the_device_loads_on_cpu(tmp_path, device, method, budget, exact_float32):
    """Sparse values + LoRA (SPT-LoRA) and 1-bit codes (Bi-LoRA) saved from a model on ``device``:
    loaded onto a fresh CPU base they give the CPU logits of the trained model bit for bit, and
    the device's own logits to float32 accuracy."""
    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    sensitune.apply_plan(model, sensitune.make_plan(model, scores, method, budget))
    model.to(device)
    with torch.no_grad():  # "trained" values: every trainable tensor moved off its initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(device) * 0.05)
    path = sensitune.save_delta(model, tmp_path / "delta")
    loaded = sensitune.load_delta(copy.deepcopy(base), path)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randn(4, 3, 32, 32, generator=g)
    model.eval()
    with torch.no_grad():
        on_device = model(x.to(device)).cpu()
        on_cpu = copy.deepcopy(model).cpu()(x)
        got = loaded.eval()(x)
    assert torch.equal(got, on_cpu)
    torch.testing.assert_close(got, on_device, rtol=1e-4, atol=1e-5 * on_cpu.abs().max().item())
