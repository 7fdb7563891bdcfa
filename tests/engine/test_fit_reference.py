"""fit() keeps its numerics bit for bit: every trained tensor and buffer, the history and the log
of a few fixed-seed runs equal what the code recorded in ``fixtures/fit_reference.json`` produced.

The first reference was written by the loop as it was before it became a ``TrainState`` and
named steps (see its ``made_by``); a change that means to alter the numerics re-records it with
``python tests/engine/test_fit_reference.py --record`` and says so.

Bit equality holds for one torch build on one kind of CPU: the Intel Xeon of 2026-12 and the
machine of the first recording initialise the same seeded timm model a few ULPs apart, and
their kernels round differently from there. So each reference carries a *probe* of the
machine's float kernels (the seeded models' initial tensors, one forward/backward and one AdamW
step, in plain torch with none of this project's code) and a machine compares with the
reference of its own probe. A machine with
no reference of its own (another CPU, another torch) skips with its probe in the reason, except
that a result equal to some other machine's reference still passes; ``--record`` adds the
reference of the machine it runs on.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import Crash, TinyTask  # noqa: E402
from sensitune.engine.config import build_config  # noqa: E402
from sensitune.engine.trainer import NonFiniteLossError, fit  # noqa: E402

FIXTURE = Path(__file__).with_name("fixtures") / "fit_reference.json"
WALL_CLOCK = {"epoch_seconds", "images_per_s"}


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=3, drop_path_rate=0.1)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _is_head(name: str, p: nn.Parameter) -> bool:
    return name.startswith(("head.", "8."))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return "pos_embed" in name


#: name -> (model, training data, settings, with an evaluation split): drop-path, augmentation,
#: head lr, clipping, label smoothing, mid-epoch checkpoints, a partial last batch, each norm_stats
CASES: dict[str, tuple[Any, Any, dict[str, Any], bool]] = {
    "vit": (_vit, lambda: TinyTask(40, augment=True), dict(
        epochs=2, batch_size=8, lr=2e-3, warmup_epochs=1, progress=False, weight_decay=0.05, head_lr=5e-3,
        grad_clip=1.0, label_smoothing=0.1, eval_every=1, checkpoint_every=2, norm_stats="pretrained"), True),
    "cnn_batchnorm": (_cnn, lambda: TinyTask(42), dict(
        epochs=2, batch_size=8, lr=3e-3, warmup_epochs=0.5, progress=False, drop_last=False, norm_stats="batch",
        weight_decay=0.01), False),
    "cnn_frozen_norms": (_cnn, lambda: TinyTask(42), dict(
        epochs=1, batch_size=8, lr=3e-3, progress=False, norm_stats="pretrained-if-frozen"), False),
}


def _digest(model: nn.Module) -> dict[str, str]:
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().cpu().contiguous()
        out[name] = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16] + f":{t.dtype}"
    return out


def _summary(model: nn.Module, r: Any, logs: list[str], out: Path | None) -> dict[str, Any]:
    return {"tensors": _digest(model), "requires_grad": [n for n, p in model.named_parameters() if p.requires_grad],
            "history": [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in r.history],
            "global_step": r.global_step, "steps_per_epoch": r.steps_per_epoch, "resumed_from": r.resumed_from,
            "last_eval": None if r.last_eval is None else
            {k: r.last_eval[k] for k in ("accuracy", "loss", "num_samples")},
            # the epoch lines without their wall-clock tail (lr ... img/s)
            "logs": [s for s in logs if "img/s" not in s] + [s.rsplit(" lr ", 1)[0] for s in logs if "img/s" in s],
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out else None}


def run_case(name: str, root: Path) -> dict[str, Any]:
    make_model, make_data, settings, with_eval = CASES[name]
    model = make_model()
    if name == "cnn_frozen_norms":
        for p in model[1].parameters():
            p.requires_grad_(False)
    logs: list[str] = []
    out = root / name
    r = fit(model, make_data(), build_config(overrides=settings), out_dir=out,
            eval_data=TinyTask(12, seed=5) if with_eval else None, no_decay=_no_decay, head=_is_head, log=logs.append)
    res = _summary(model, r, logs, out)
    res["metrics_csv_header"] = (out / "metrics.csv").read_text().splitlines()[0]
    return res


def run_resumed(root: Path) -> dict[str, Any]:
    """The "vit" case killed at step 3 of epoch 2 (after a mid-epoch checkpoint), then resumed."""
    make_model, make_data, settings, _ = CASES["vit"]
    out = root / "vit_resume"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_model(), Crash(40 + 8 * 3 + 2, n=40, augment=True), build_config(overrides=settings), out_dir=out,
            eval_data=TinyTask(12, seed=5), no_decay=_no_decay, head=_is_head, log=lambda s: None)
    model, logs = make_model(), []
    r = fit(model, make_data(), build_config(overrides=settings), out_dir=out, eval_data=TinyTask(12, seed=5),
            resume=True, no_decay=_no_decay, head=_is_head, log=logs.append)
    return _summary(model, r, [s.replace(str(out), "<OUT>") for s in logs], out)


def run_nonfinite(root: Path) -> dict[str, str | None]:
    """The NonFiniteLossError messages of a run at a huge lr, with and without an output folder."""
    msgs: dict[str, str | None] = {}
    for name, out in (("loss", root / "nf1"), ("noout", None)):
        try:
            fit(_cnn(), TinyTask(42), build_config(overrides=dict(epochs=3, batch_size=8, progress=False, lr=1e6,
                                                                  warmup_epochs=0)), out_dir=out, log=lambda s: None)
            msgs[name] = None
        except NonFiniteLossError as exc:
            msgs[name] = str(exc).replace(str(root), "<ROOT>")
    return msgs


def record_all(root: Path) -> dict[str, Any]:
    rec = {name: run_case(name, root) for name in CASES}
    rec["vit_resume"] = run_resumed(root)
    rec["nonfinite"] = run_nonfinite(root)
    return rec


@functools.lru_cache(maxsize=1)
def kernel_probe() -> str:
    """A digest of this machine's float kernels on the reference's models, independent of fit():
    two machines with different probes cannot be expected to train them to the same bits."""
    h = hashlib.sha256()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest.py runs the tests
    try:
        for make in (_vit, _cnn):
            model = make().train()
            h.update("".join(_digest(model).values()).encode())
            x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
            torch.manual_seed(4)  # the ViT's drop-path draws
            nn.functional.cross_entropy(model(x), torch.arange(8) % 3).backward()
            h.update(b"".join(p.grad.numpy().tobytes() for p in model.parameters()))
            torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05).step()
            h.update("".join(_digest(model).values()).encode())
    finally:
        torch.set_num_threads(before)
    return h.hexdigest()[:16]


def _cpu_name() -> str:
    """The CPU's model name (Linux), for the reader of the fixture; the probe decides, not this."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _references() -> list[dict[str, Any]]:
    return json.loads(FIXTURE.read_text())["references"]


def _check(key: str, got: dict[str, Any]) -> None:
    """Assert ``got`` equals this machine's reference for ``key``; where this machine has none,
    pass if it equals another machine's and skip otherwise (nothing to compare bits with)."""
    refs = [r for r in _references() if r["torch"] == torch.__version__]
    own = [r for r in refs if r["probe"] == kernel_probe()]
    if own:
        ref = own[0]["cases"][key]
        if "tensors" in ref:
            assert got["tensors"] == ref["tensors"]
        assert got == ref
        return
    if any(r["cases"][key] == got for r in refs):
        return
    recorded = ", ".join(f"{r['probe'] or 'not probed'} (torch {r['torch']})" for r in _references())
    pytest.skip(f"no reference was recorded on a machine like this one (kernel probe {kernel_probe()}, torch "
                f"{torch.__version__}; recorded: {recorded}) and the result differs from the other machines' "
                "(their kernels round differently); `python tests/engine/test_fit_reference.py --record` adds "
                "this machine's reference")


@pytest.mark.parametrize("name", list(CASES))
def test_fit_is_bit_identical_to_the_reference(name, tmp_path):
    got = json.loads(json.dumps(run_case(name, tmp_path)))  # the fixture's JSON round trip (tuples -> lists)
    _check(name, got)


def test_resumed_fit_is_bit_identical_to_the_reference(tmp_path):
    got = json.loads(json.dumps(run_resumed(tmp_path)))
    assert got["resumed_from"] == {"epoch": 1, "step_in_epoch": 3, "global_step": 8}
    assert got["tensors"] == json.loads(json.dumps(run_case("vit", tmp_path)))["tensors"]  # ends like the plain run
    _check("vit_resume", got)


def test_nonfinite_messages_match_the_reference(tmp_path):
    """The messages name no float beyond what every machine computes alike: every reference has them."""
    got = run_nonfinite(tmp_path)
    assert all(r["cases"]["nonfinite"] == got for r in _references() if r["torch"] == torch.__version__)



def test_the_grad_scaler_branch_steps_exactly_like_the_plain_one():
    """fp16 needs CUDA, so CPU CI never runs the grad-scaler branch of a step; with a CPU
    GradScaler at a power-of-two scale (scaling and unscaling are then exact) it must give the
    plain branch's weights bit for bit, clipping included (clipping the still-scaled gradients
    would not)."""
    from torch.utils.data import DataLoader

    from sensitune.engine.trainer import DistInfo, FitEnv, _setup_state, _update

    cfg = build_config(overrides=dict(epochs=1, batch_size=8, lr=1e-2, grad_clip=0.05, progress=False))
    images, labels = next(iter(DataLoader(TinyTask(16), batch_size=8)))
    weights, norms = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model = _cnn()
        env = FitEnv(cfg=cfg, info=DistInfo(), device=torch.device("cpu"), out=None, log=lambda s: None)
        state = _setup_state(model, TinyTask(16), env, None, None)
        state.scaler = scaler
        for _ in range(3):
            loss = state.criterion(model(images), labels) / len(labels)
            loss.backward(retain_graph=True)
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in state.trainable])).item())
            model.zero_grad()
            _update(state, cfg, loss)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert min(norms) > 0.05  # the clip is active at every step
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], [p.detach() for p in _cnn().parameters()]))

if __name__ == "__main__" and sys.argv[1:2] == ["--record"]:
    # --record [MADE_BY]: replaces the reference of this machine's probe and torch, keeps the others
    import tempfile

    torch.set_num_threads(1)  # as conftest.py runs the tests
    with tempfile.TemporaryDirectory() as tmp:
        cases = json.loads(json.dumps(record_all(Path(tmp))))
    made_by = sys.argv[2] if len(sys.argv) > 2 else "re-recorded: say in the commit why the numerics changed"
    mine = {"made_by": made_by, "machine": _cpu_name(),
            "probe": kernel_probe(), "torch": torch.__version__, "cases": cases}
    refs = [r for r in (_references() if FIXTURE.exists() else [])
            if (r["probe"], r["torch"]) != (mine["probe"], mine["torch"])]
    FIXTURE.write_text(json.dumps({"references": refs + [mine]}, indent=1, sort_keys=True) + "\n")
