"""The benchmark grid: every (task, method, seed) cell is one ``sensitune.engine.train`` run.

Protocol (../shared/specs/benchmarks.md): with an lr grid, each (task, method) first trains
on train800 and evaluates val200 once per learning rate (seed = the first seed); the chosen
lr is the *smallest* one whose val accuracy is within ``tie_tolerance`` points of the best
(200 validation images decide near-ties by noise, and the larger of near-tied rates is the
one that diverges on retraining — the "recipe lesson"). Then every seed trains on
train800val200 with that lr and reports test. Test is never looked at before that.

Layout of ``out``::

    bench.json                          the grid, its settings, failures and lr choices
    <task>/<method>/seed<k>/            final cells (a train() run folder each)
    <task>/<method>/select/lr<lr>/      lr-selection cells
    logs/<task>__<method>__<cell>.log   each cell's log
    locks/<task>__<method>__<cell>.lock held by the process running the cell
    locks/bench.lock                    held by the bench running the grid

Restart-safe: a cell whose ``results.json`` is complete is skipped; a cell that was killed
midway resumes from its checkpoint; a failed cell is recorded and skipped on restart unless
``retry_failed`` (then it starts again from scratch).

By default each cell runs in its own process forked from a preloaded server, because the
engine reports peak memory as the process's peak resident set: in one long process every
cell would report the largest peak so far. The server imports torch once, so a cell costs
a fork, not an interpreter start.

No process outlives the bench: a bench that stops (error, Ctrl-C) kills its running cells, and
each cell watches a pipe from the bench and kills itself at its EOF, which also covers SIGTERM
and SIGKILL; the server exits once no bench and no cell holds its keep-alive pipe. The bench
holds an exclusive flock on ``locks/bench.lock`` and each cell one on ``locks/<cell>.lock`` while
it runs (the kernel drops them with the process), so a second bench on the same folder, or a
cell that outlived its bench, makes a bench stop with :class:`CellBusy` instead of writing the
same files at the same time.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from sensitune.bench.suites import SuiteTask, suite_tasks
from sensitune.engine.checkpoint import atomic_write_text

FORMAT = "sensitune-bench/1"
DEFAULT_TRAIN = "sensitune.engine.pipeline:train"
#: settings that must match when a bench folder is resumed
IDENTITY = ("suite", "model", "data_root", "budget", "config", "overrides", "lr_grid", "tie_tolerance",
            "engine_defaults")


def engine_defaults() -> dict[str, Any]:
    """The engine's default settings that change what a run computes (the resume fingerprint's keys):
    cells trained under other defaults (an older sensitune) are not the same experiment, so a bench
    folder made with them is not continued; defaults such as ``progress`` or ``device`` do not count."""
    from sensitune.engine.config import TrainConfig
    from sensitune.engine.trainer import config_fingerprint

    return config_fingerprint(TrainConfig())


@dataclass(frozen=True)
class MethodSpec:
    """A method column: a preset name plus options, e.g. ``bi-lora:bits=32`` or ``gps:score_batches=8``.

    Options that are training settings (TrainConfig keys such as ``epochs``, ``score_batches``,
    and ``lr`` when there is no lr grid) override the grid's settings for this column, as does
    ``budget`` (e.g. ``spt-lora:budget=5%`` beside ``lora`` for an equal-budget comparison); any other key goes to the planner
    (``method_options``).
    """

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "+", self.label)


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """``"linear,lora,bi-lora:bits=32:rank=8"`` -> method specs; names are checked against the presets."""
    import yaml

    from sensitune.methods import get_method

    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        raise ValueError("--methods: give at least one method")
    specs = []
    for item in items:
        name, *opts = item.split(":")
        get_method(name)  # raises with the list of presets
        options: dict[str, Any] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or not key:
                raise ValueError(f"--methods: {item!r}: options are written name:key=value (got {opt!r})")
            options[key] = yaml.safe_load(value)
        specs.append(MethodSpec(item, name, options))
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"--methods: {', '.join(dupes)} given twice")
    return specs


def _train_keys() -> set[str]:
    """Method options that are training settings (TrainConfig keys) rather than planner options."""
    from dataclasses import fields

    from sensitune.engine.config import TrainConfig

    return {f.name for f in fields(TrainConfig)} - {"method_options", "seed", "protocol", "lr"}


def _describe_change(key: str, was: Any, now: Any) -> str:
    """``key: was X, now Y``; for two mappings only the entries that differ."""
    if isinstance(was, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        return f"{key}: " + ", ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in keys)
    if key == "engine_defaults" and was is None:
        return "engine_defaults: not recorded (made by an older sensitune)"
    return f"{key}: was {was!r}, now {now!r}"


def choose_lr(val_accuracy: dict[float, float | None], tie_tolerance: float = 1.0) -> float:
    """The smallest lr whose val accuracy is within ``tie_tolerance`` points of the best.

    Failed (diverged) rates carry ``None`` and are never chosen.
    """
    ok = {lr: acc for lr, acc in val_accuracy.items() if acc is not None and math.isfinite(acc)}
    if not ok:
        raise ValueError("every learning rate of the grid failed on validation")
    best = max(ok.values())
    return min(lr for lr, acc in ok.items() if acc >= best - tie_tolerance)


def results_complete(run: Path) -> dict[str, Any] | None:
    """The results of a finished run folder, or None (missing, torn or incomplete)."""
    path = Path(run) / "results.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(res, dict) or res.get("status", "complete") != "complete" or res.get("accuracy") is None:
        return None
    return res


# -- running one cell -----------------------------------------------------------------------------------

def _resolve(ref: str) -> Callable[..., dict[str, Any]]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


#: how long a cell waits for another process to release its folder (an orphan of a killed bench
#: is gone within a second now) before the bench refuses to go on
LOCK_GRACE = 5.0


class CellBusy(ValueError):
    """Another process holds the lock of a cell or of the whole bench folder: two writers would
    corrupt the cell's folder or lose each other's updates of ``bench.json``. A ValueError: the
    --out folder cannot be used now, which the CLI reports as an error, not a crash."""


def _lock(path: str | Path, grace: float, holder_is: str) -> int:
    """Open ``path`` and hold an exclusive flock on it; returns the fd (closing it, or the process
    dying, releases the lock). Raises CellBusy when another process still holds it after ``grace``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + grace
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CellBusy(f"{path} is held by process {holder} ({holder_is}); "
                               "stop it or let it finish, then run again") from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def _locked(path: str | Path, grace: float, holder_is: str) -> Iterator[None]:
    fd = _lock(path, grace, holder_is)
    try:
        yield
    finally:
        os.close(fd)


def _run_cell(train_ref: str, kwargs: dict[str, Any], log_path: str, extra_sys_path: list[str],
              threads: int | None, lock_path: str, retrying: bool) -> dict[str, Any]:
    """Run one cell (in this process) holding its lock; returns {'ok': True}, {'ok': False, 'error': ...}
    or {'ok': False, 'busy': ...} when another process holds the cell.

    Whether to resume is decided under the lock: a writer that held it before may have
    finished the cell or created its run folder meanwhile."""
    try:
        lock_fd = _lock(lock_path, LOCK_GRACE, "a bench running this cell")
    except CellBusy as exc:
        return {"ok": False, "busy": str(exc)}
    try:
        run_dir = Path(kwargs["out"])
        if results_complete(run_dir) is not None:
            return {"ok": True}
        started = (run_dir / "run.json").is_file()
        kwargs = {**kwargs, "resume": started and not retrying, "overwrite": started and retrying}
        if threads:
            import torch

            torch.set_num_threads(threads)
        for p in reversed(extra_sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            def log(msg: str) -> None:
                fh.write(str(msg) + "\n")
                fh.flush()

            cpu0 = time.process_time()  # all threads of this process: the cell's cost on an idle machine
            try:
                _resolve(train_ref)(**kwargs, log=log)
                return {"ok": True, "cpu_seconds": time.process_time() - cpu0}
            except Exception as exc:  # a failed cell must not stop the grid
                fh.write(traceback.format_exc())
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    finally:
        os.close(lock_fd)


def _die_with_bench(bench_alive) -> None:
    """Kill this cell as soon as the bench's end of ``bench_alive`` closes, i.e. when the bench
    exits or is killed (even by SIGKILL, which runs no cleanup).

    The cell is a child of the fork server, not of the bench, so a death signal (PR_SET_PDEATHSIG)
    cannot name the bench; and the server outlives the bench while any cell lives, because every
    cell holds the server's keep-alive pipe. The pipe's EOF needs no cooperation from the bench."""
    def watch() -> None:
        try:
            bench_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="bench-watchdog", daemon=True).start()


def _child(conn, bench_alive, train_ref: str, kwargs: dict[str, Any], log_path: str, extra_sys_path: list[str],
           threads: int | None, lock_path: str, retrying: bool) -> None:
    # Ctrl-C reaches the whole terminal group: the bench stops its cells itself (_CellProcesses.stop),
    # and a cell dying on its own first would be recorded as failed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_bench(bench_alive)
    conn.send(_run_cell(train_ref, kwargs, log_path, extra_sys_path, threads, lock_path, retrying))
    conn.close()


#: everything a cell imports, paid once by the fork server instead of once per cell; this module
#: too, so cells run the code the server started with even if runner.py is edited meanwhile
SERVER_PRELOAD = ("sensitune.bench.runner", "sensitune.engine.pipeline", "sensitune.scoring", "sensitune.planning",
                  "sensitune.tuners", "sensitune.artifacts", "sensitune.data.transforms", "matplotlib.pyplot")


def _context() -> mp.context.BaseContext:
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(SERVER_PRELOAD))
    return ctx


class _Stopped(Exception):
    """The bench is stopping: a cell killed by it is neither a result nor a failure."""


class _CellProcesses:
    """The cells running in their own processes, so that a bench that stops on an exception or
    Ctrl-C kills them (and does not record them as failed); a bench killed outright (SIGTERM,
    SIGKILL) runs no code, which each cell's watchdog covers (:func:`_die_with_bench`)."""

    def __init__(self, ctx: mp.context.BaseContext) -> None:
        self.ctx = ctx
        self.running: set[Any] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def run(self, train_ref: str, kwargs: dict[str, Any], log_path: str, threads: int | None,
            lock_path: str, retrying: bool) -> dict[str, Any]:
        recv, send = self.ctx.Pipe(duplex=False)
        alive_r, alive_w = self.ctx.Pipe(duplex=False)  # the bench holds alive_w until the cell ends
        proc = self.ctx.Process(target=_child, daemon=True,
                                args=(send, alive_r, train_ref, kwargs, log_path, list(sys.path), threads,
                                      lock_path, retrying))
        try:
            with self.lock:
                if self.stopped:
                    raise _Stopped
                proc.start()
                self.running.add(proc)
            send.close()
            alive_r.close()
            try:
                result = recv.recv()
            except EOFError:
                result = None
            proc.join()
        finally:
            with self.lock:
                self.running.discard(proc)
            for c in (recv, send, alive_r, alive_w):
                c.close()
        if result is None and self.stopped:
            raise _Stopped
        if result is None:
            return {"ok": False, "error": f"the cell's process died (exit code {proc.exitcode}); see {log_path}"}
        return result

    def stop(self) -> None:
        """Kill every running cell and start no more."""
        with self.lock:
            self.stopped = True
            for proc in self.running:
                proc.kill()


# -- the grid ------------------------------------------------------------------------------------------

@dataclass
class _Cell:
    task: SuiteTask
    method: MethodSpec
    seed: int
    path: str  # relative to out
    phase: str  # "select" or "final"
    lr: float | None = None


def _lr_folder(lr: float) -> str:
    return f"lr{lr:g}"


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def run_bench(*, suite: str, model: str, methods: str | Sequence[str] | Sequence[MethodSpec], out: str | Path,
              data_root: str | Path | None = None, tasks: Sequence[str] | None = None, budget: Any = None,
              seeds: Sequence[int] = (0,), lr_grid: Sequence[float] | None = None, tie_tolerance: float = 1.0,
              config: Any = None, overrides: dict[str, Any] | None = None, isolate: bool = True,
              retry_failed: bool = False, progress: bool = True, train: str = DEFAULT_TRAIN,
              command: str | None = None, echo: Callable[[str], None] | None = None, jobs: int = 1,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or continue) the grid into ``out``; returns the manifest (also ``out/bench.json``).

    ``methods``: ``"a,b:key=value"`` or MethodSpecs; ``budget``: passed to budgeted methods only;
    ``overrides``: TrainConfig keys for every cell (e.g. epochs, img_size, batch_size);
    ``train``: ``"module:function"`` with the signature of :func:`sensitune.engine.train`
    (tests substitute a fake; the real engine is the default).
    ``jobs``: (task, method) pairs run concurrently, each cell in its own process with
    ``threads`` torch threads (on a small CPU two 1-thread cells beat one 2-thread cell).
    """
    from sensitune.methods import get_method

    out = Path(out)
    if isinstance(methods, str) or not all(isinstance(m, MethodSpec) for m in methods):
        specs = parse_methods(methods)  # type: ignore[arg-type]
    else:
        specs = list(methods)  # type: ignore[arg-type]
    task_list = suite_tasks(suite, data_root, tasks)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    grid = sorted({float(x) for x in lr_grid}) if lr_grid else None
    if grid and any("lr" in m.options for m in specs):
        raise ValueError("a method's own lr (method:lr=...) and --lr-grid exclude each other")
    if grid and any(x <= 0 for x in grid):
        raise ValueError(f"--lr-grid: learning rates must be positive, got {grid}")
    overrides = dict(overrides or {})
    for key in ("lr", "seed", "protocol", "method_options"):
        if key in overrides and (key != "lr" or grid):
            raise ValueError(f"override {key!r} is set by the bench protocol per cell; drop it")
    echo = echo or (lambda s: tqdm.write(s))
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"--jobs and --threads must be >= 1 (got {jobs}, {threads})")
    if jobs > 1 and not isolate:
        raise ValueError("--jobs > 1 runs cells side by side in their own processes; drop --in-process")

    identity = {"suite": suite, "model": model, "data_root": None if data_root is None else str(data_root),
                "budget": budget, "config": None if config is None else str(config) if not isinstance(config, dict) else config,
                "overrides": overrides, "lr_grid": grid, "tie_tolerance": tie_tolerance,
                "engine_defaults": engine_defaults()}
    manifest_path = out / "bench.json"
    if not manifest_path.is_file() and out.exists() and any(p.name != "locks" for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no bench (bench.json); choose a new folder")
    # one bench per folder, taken before bench.json is read: a second bench would overwrite the
    # first's bench.json with its own view of the grid
    with _locked(out / "locks" / "bench.lock", LOCK_GRACE, "another bench on this folder"):
        previous: dict[str, Any] = {}
        if manifest_path.is_file():
            previous = json.loads(manifest_path.read_text())
            diff = [_describe_change(k, previous.get(k), identity[k])
                    for k in IDENTITY if previous.get(k) != identity[k]]
            if diff:
                raise ValueError(f"{out} holds a bench with other settings (" + "; ".join(diff)
                                 + "); choose another --out folder")

        final_cells = [_Cell(t, m, s, f"{t.name}/{m.folder}/seed{s}", "final")
                       for t in task_list for m in specs for s in seeds]
        select_cells = ([_Cell(t, m, seeds[0], f"{t.name}/{m.folder}/select/{_lr_folder(lr)}", "select", lr)
                         for t in task_list for m in specs for lr in grid] if grid else [])
        manifest: dict[str, Any] = {
            "format": FORMAT, **identity, "command": command,
            "tasks": [{"task": t.name, "group": t.group, "source": t.task} for t in task_list],
            "methods": [m.label for m in specs],
            "method_specs": {m.label: {"name": m.name, "options": m.options} for m in specs},
            "seeds": seeds, "select_eval": "val200" if grid else None, "final_eval": "test",
            "isolated": isolate, "jobs": jobs, "threads": threads, "machine": _machine(),
            "started": previous.get("started") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cells": [{"task": c.task.name, "group": c.task.group, "method": c.method.label, "seed": c.seed,
                       "path": c.path} for c in final_cells],
            "select_cells": [{"task": c.task.name, "method": c.method.label, "lr": c.lr, "path": c.path}
                             for c in select_cells],
            "failed": dict(previous.get("failed") or {}),
            "selection": dict(previous.get("selection") or {}),
            "cpu_seconds": dict(previous.get("cpu_seconds") or {}),
        }

        def save() -> None:
            manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")

        out.mkdir(parents=True, exist_ok=True)
        save()
        cells = _CellProcesses(_context()) if isolate else None
        lock = threading.RLock()
        bar = tqdm(total=len(select_cells) + len(final_cells), desc="bench", unit="run", disable=not progress,
                   dynamic_ncols=True)

        def run(cell: _Cell, lr: float | None) -> dict[str, Any] | None:
            """Run one cell unless finished/failed; returns its results (None when failed)."""
            run_dir = out / cell.path
            done = results_complete(run_dir)
            with lock:
                if done is not None or (cell.path in manifest["failed"] and not retry_failed):
                    bar.update(1)
                    return done
                failure = manifest["failed"].pop(cell.path, None)
                retrying = failure is not None
            method = get_method(cell.method.name)
            cell_over = {**overrides, "seed": cell.seed, "protocol": "val" if cell.phase == "select" else "final",
                         "progress": False}
            if lr is not None:
                cell_over["lr"] = lr
            train_keys = _train_keys() | ({"lr"} if not grid else set())
            cell_over.update({k: v for k, v in cell.method.options.items() if k in train_keys})
            planner = {k: v for k, v in cell.method.options.items() if k not in train_keys and k != "budget"}
            cell_budget = cell.method.options.get("budget", budget if method.budget != "none" else None)
            if planner:
                cell_over["method_options"] = planner
            kwargs = dict(model=model, task=cell.task.task, method=cell.method.name, out=str(run_dir),
                          budget=None if cell_budget is None else str(cell_budget), config=config,
                          **cell_over)
            with lock:
                bar.set_postfix_str(f"{cell.task.name} {cell.method.label} {cell.phase} seed {cell.seed}"
                                    + (f" lr {lr:g}" if lr is not None else ""))
            log_path = str(out / "logs" / (cell.path.replace("/", "__") + ".log"))
            lock_path = str(out / "locks" / (cell.path.replace("/", "__") + ".lock"))
            t0 = time.perf_counter()
            outcome = (cells.run(train, kwargs, log_path, threads, lock_path, retrying) if cells
                       else _run_cell(train, kwargs, log_path, [], threads, lock_path, retrying))
            if outcome.get("busy"):
                if retrying:
                    with lock:
                        manifest["failed"][cell.path] = failure
                raise CellBusy(outcome["busy"])
            res = results_complete(run_dir) if outcome["ok"] else None
            with lock:
                bar.update(1)
                if res is None:
                    manifest["failed"][cell.path] = outcome.get("error") or "finished without a complete results.json"
                    echo(f"FAILED {cell.path}: {manifest['failed'][cell.path]} (log: {log_path})")
                else:
                    if outcome.get("cpu_seconds") is not None:
                        manifest["cpu_seconds"][cell.path] = round(outcome["cpu_seconds"], 1)
                    echo(f"{cell.task.name:>14} {cell.method.label:<16} {cell.phase:<6} seed {cell.seed}"
                         + (f" lr {res.get('lr', lr):<8g}" if lr is not None or grid else "")
                         + f" {res.get('eval_split', ''):>14} acc {float(res['accuracy']):6.2f}%"
                         + f"  ({time.perf_counter() - t0:.0f}s)")
                save()
            return res

        def unit(task: SuiteTask, spec: MethodSpec) -> None:
            """One (task, method): its lr selection (if any), then its final cells, in that order."""
            lr_choice: float | None = None
            if grid:
                val = {}
                for cell in (c for c in select_cells if c.task is task and c.method is spec):
                    res = run(cell, cell.lr)
                    val[cell.lr] = None if res is None else float(res["accuracy"])
                try:
                    lr_choice = choose_lr(val, tie_tolerance)
                except ValueError as exc:
                    with lock:
                        for cell in (c for c in final_cells if c.task is task and c.method is spec):
                            manifest["failed"][cell.path] = f"no lr selected: {exc}"
                            bar.update(1)
                        save()
                    return
                with lock:
                    manifest["selection"][f"{task.name}/{spec.label}"] = {
                        "lr": lr_choice, "val_accuracy": {f"{k:g}": v for k, v in val.items()}}
                    save()
            for cell in (c for c in final_cells if c.task is task and c.method is spec):
                run(cell, lr_choice)

        units = [(t, m) for t in task_list for m in specs]
        try:
            if jobs == 1:
                for t, m in units:
                    unit(t, m)
            else:
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    futures = [pool.submit(unit, t, m) for t, m in units]
                    try:
                        for f in futures:
                            f.result()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        if cells:
                            cells.stop()  # before the pool waits for its threads, which wait for their cells
                        raise
        except BaseException:
            if cells:
                cells.stop()
            raise
        finally:
            bar.close()
            save()
        return manifest
