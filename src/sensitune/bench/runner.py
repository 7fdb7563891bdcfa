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

from sensitune.bench.selection import SCOPES, bootstrap_stability, choose_lr, rank_lrs, suite_accuracy, usable
from sensitune.bench.suites import SuiteTask, suite_tasks
from sensitune.io import atomic_write_text
from sensitune.methods import StagedOptions

FORMAT = "sensitune-bench/1"
DEFAULT_TRAIN = "sensitune.engine.pipeline:train"
#: settings that must match when a bench folder is resumed
IDENTITY = ("suite", "model", "data_root", "budget", "config", "overrides", "lr_grid", "tie_tolerance",
            "select_scope", "engine_defaults")
#: what a bench folder made before a key existed meant by it
IDENTITY_BEFORE = {"select_scope": "task"}


def engine_defaults() -> dict[str, Any]:
    """The engine's default settings that change what a run computes (the resume fingerprint's keys):
    cells trained under other defaults (an older sensitune) are not the same experiment, so a bench
    folder made with them is not continued; defaults such as ``progress`` or ``device`` do not count."""
    from sensitune.engine.config import TrainConfig
    from sensitune.engine.trainer import config_fingerprint

    return config_fingerprint(TrainConfig())


@dataclass(frozen=True)
class MethodSpec:
    """A method column: a preset name plus options, e.g. ``bi-lora:bits=32``, ``lora:plan.rank=4``,
    ``lora:train.drop_path=0.1`` or ``gps:score.batches=8``.

    Each option goes to one stage (:meth:`sensitune.methods.Method.stage_options`): ``plan.NAME``
    to the planner (``method_options``), ``score.NAME`` to the scorer (``score_options``),
    ``train.NAME`` to the training settings, overriding the grid's for this column only (``lr``
    too when there is no lr grid, or as the base of a grid of factors). A bare name goes to the
    one stage that has it; one that is both a planner option and a training setting (``drop_path``
    for lora) is refused naming both spellings. ``budget`` (or ``plan.budget``) is the column's own
    budget (e.g. ``spt-lora:budget=5%`` beside ``lora`` for an equal-budget comparison).
    ``label`` and ``options`` are the column as written: bench.json records them.
    """

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=-]+", "+", self.label)

    def own_budget(self) -> tuple[bool, Any]:
        """(whether the column sets its own budget, that budget)."""
        given = [k for k in ("budget", "plan.budget") if k in self.options]
        if len(given) > 1:
            raise ValueError(f"--methods {self.label!r}: budget and plan.budget are the same option; give one")
        return (True, self.options[given[0]]) if given else (False, None)

    def stages(self) -> StagedOptions:
        """The column's options (but its budget) by stage; refused with the valid names when a
        name is unknown, of the wrong type, ambiguous or set by the bench protocol."""
        from sensitune.methods import get_method

        where = f"--methods {self.label!r}"
        self.own_budget()  # refuses budget and plan.budget given together
        options = {k: v for k, v in self.options.items() if k not in ("budget", "plan.budget")}
        staged = get_method(self.name).stage_options(options, where)
        for key in sorted(set(staged.train) & COLUMN_RESERVED):
            instead = {"method_options": "write plan.NAME=... instead", "score_options": "write score.NAME=... instead"}
            raise ValueError(f"{where}: {key!r} is not a column's to set "
                             f"({instead.get(key, 'the bench protocol sets it per cell')})")
        return staged


#: training settings a column may not set: the protocol's per cell, and the stage mappings themselves
COLUMN_RESERVED = frozenset({"seed", "protocol", "method_options", "score_options"})


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """``"linear,lora,bi-lora:bits=32:rank=8,lora:plan.rank=4"`` -> method specs; names are checked
    against the presets and every option against its stage (:meth:`MethodSpec.stages`)."""
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
        spec = MethodSpec(item, name, options)
        spec.stages()  # refuse a bad option now, not when the column's first cell runs
        specs.append(spec)
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"--methods: {', '.join(dupes)} given twice")
    return specs


def _describe_change(key: str, was: Any, now: Any) -> str:
    """``key: was X, now Y``; for two mappings only the entries that differ."""
    if isinstance(was, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        return f"{key}: " + ", ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in keys)
    if key == "engine_defaults" and was is None:
        return "engine_defaults: not recorded (made by an older sensitune)"
    return f"{key}: was {was!r}, now {now!r}"


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


_DIVERGENCE_ERROR = re.compile(r"non-?finite|\bnan\b|\binf\b", re.IGNORECASE)


def divergence_of(results: dict[str, Any] | None, error: str | None) -> str | None:
    """Why a cell counts as diverged: its results say so, or it stopped on a non-finite loss."""
    if results is not None and results.get("diverged"):
        return str(results.get("divergence") or "diverged")
    if results is None and error and _DIVERGENCE_ERROR.search(error):
        return error
    return None


def parse_lr_grid(grid: Sequence[float | str] | None) -> tuple[list[float] | None, bool]:
    """(sorted values, relative?): learning rates (``1e-3``) or factors of each column's own lr
    (``"x0.5"``); the two kinds do not mix."""
    if not grid:
        return None, False
    items = [str(g).strip() for g in grid]
    relative = [i.lower().startswith(("x", "×")) for i in items]
    if any(relative) and not all(relative):
        raise ValueError(f"--lr-grid {','.join(items)}: give learning rates or factors (x0.5,x2), not both")
    try:
        values = sorted({float(i[1:] if r else i) for i, r in zip(items, relative)})
    except ValueError:
        raise ValueError(f"--lr-grid {','.join(items)}: expected numbers like 1e-3 or factors like x0.5") from None
    if any(v <= 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"--lr-grid: learning rates and factors must be positive, got {','.join(items)}")
    return values, all(relative)


def _key(task: SuiteTask, spec: MethodSpec) -> str:
    return f"{task.name}/{spec.label}"


class Bench:
    """One grid in one folder, run in named stages: lr selection on val200 (every cell, before any
    final cell), the choice (per task or per suite, with its bootstrap stability), then the final
    cells of each (task, method), falling back to the next-ranked lr when the chosen one diverges.

    See :func:`run_bench` for the arguments; ``Bench(...).run()`` returns the manifest."""

    def __init__(self, *, suite: str, model: str, methods: str | Sequence[str] | Sequence[MethodSpec],
                 out: str | Path, data_root: str | Path | None = None, tasks: Sequence[str] | None = None,
                 budget: Any = None, seeds: Sequence[int] = (0,), lr_grid: Sequence[float] | None = None,
                 tie_tolerance: float = 1.0, select_scope: str = "task", config: Any = None,
                 overrides: dict[str, Any] | None = None, isolate: bool = True, retry_failed: bool = False,
                 progress: bool = True, train: str = DEFAULT_TRAIN, command: str | None = None,
                 echo: Callable[[str], None] | None = None, jobs: int = 1, threads: int | None = None) -> None:
        self.out = Path(out)
        self.specs = (list(methods) if not isinstance(methods, str) and all(isinstance(m, MethodSpec) for m in methods)
                      else parse_methods(methods))  # type: ignore[arg-type]
        self.tasks = suite_tasks(suite, data_root, tasks)
        self.seeds = [int(s) for s in seeds]
        self.grid, self.relative = parse_lr_grid(lr_grid)
        self.overrides = dict(overrides or {})
        self.tie_tolerance, self.select_scope = float(tie_tolerance), select_scope
        self.retry_failed, self.progress, self.train, self.command = retry_failed, progress, train, command
        self.jobs, self.threads, self.isolate, self.config = jobs, threads, isolate, config
        self.echo = echo or (lambda s: tqdm.write(s))
        self._check()
        self.identity = {
            "suite": suite, "model": model, "data_root": None if data_root is None else str(data_root),
            "budget": budget, "overrides": self.overrides, "tie_tolerance": self.tie_tolerance,
            "lr_grid": ([f"x{f:g}" for f in self.grid] if self.relative else self.grid) if self.grid else None,
            "config": None if config is None else str(config) if not isinstance(config, dict) else config,
            "select_scope": select_scope, "engine_defaults": engine_defaults()}
        self.model, self.budget = model, budget
        self.lock = threading.RLock()
        self.manifest: dict[str, Any] = {}
        self.val: dict[str, dict[float, float | None]] = {}  # "task/method" -> lr -> val accuracy
        self.val_diverged: dict[str, dict[float, str]] = {}
        self.ranking: dict[str, list[float]] = {}

    # -- settings ---------------------------------------------------------------------------------
    def lrs_of(self, spec: MethodSpec) -> list[float]:
        """The learning rates a column is selected from: the grid, or its factors times the column's own lr
        (``method:lr=...``, else the method's default)."""
        if not self.grid:
            return []
        if not self.relative:
            return list(self.grid)
        from sensitune.engine.config import TrainConfig
        from sensitune.methods import get_method

        base = float(spec.stages().train.get("lr", get_method(spec.name).train.get("lr", TrainConfig().lr)))
        return sorted({float(f"{base * f:.6g}") for f in self.grid})

    def _check(self) -> None:
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.grid and not self.relative and any("lr" in m.stages().train for m in self.specs):
            raise ValueError("a method's own lr (method:lr=...) and an absolute --lr-grid exclude each other "
                             "(a grid of factors, e.g. x0.5,x1,x2, scales each column's own lr)")
        for key in ("lr", "seed", "protocol", "method_options", "score_options"):
            if key in self.overrides and (key != "lr" or self.grid):
                raise ValueError(f"override {key!r} is set by the bench protocol per cell; drop it")
        if self.select_scope not in SCOPES:
            raise ValueError(f"--select {self.select_scope!r}: choose one of {', '.join(SCOPES)}")
        if self.jobs < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"--jobs and --threads must be >= 1 (got {self.jobs}, {self.threads})")
        if self.jobs > 1 and not self.isolate:
            raise ValueError("--jobs > 1 runs cells side by side in their own processes; drop --in-process")

    def _previous(self) -> dict[str, Any]:
        """The folder's earlier manifest, refused when it describes another experiment."""
        path = self.out / "bench.json"
        if not path.is_file():
            return {}
        previous = json.loads(path.read_text())
        was = {k: previous.get(k, IDENTITY_BEFORE.get(k)) for k in IDENTITY}
        diff = [_describe_change(k, was[k], self.identity[k]) for k in IDENTITY if was[k] != self.identity[k]]
        if diff:
            raise ValueError(f"{self.out} holds a bench with other settings (" + "; ".join(diff)
                             + "); choose another --out folder")
        return previous

    def _new_manifest(self, previous: dict[str, Any]) -> dict[str, Any]:
        old_cells = {(c["task"], c["method"], c["seed"]): c for c in previous.get("cells", [])}
        cells = []
        for c in self.final_cells:
            entry = {"task": c.task.name, "group": c.task.group, "method": c.method.label, "seed": c.seed,
                     "path": c.path}
            entry.update({k: v for k, v in old_cells.get((entry["task"], entry["method"], c.seed), {}).items()
                          if k in ("path", "lr", "fallback_from")})
            cells.append(entry)
        keep = ("failed", "selection", "cpu_seconds", "diverged", "fallback", "selection_stability")
        return {
            "format": FORMAT, **self.identity, "command": self.command,
            "tasks": [{"task": t.name, "group": t.group, "source": t.task} for t in self.tasks],
            "methods": [m.label for m in self.specs],
            "method_specs": {m.label: {"name": m.name, "options": m.options} for m in self.specs},
            "seeds": self.seeds, "select_eval": "val200" if self.grid else None, "final_eval": "test",
            "isolated": self.isolate, "jobs": self.jobs, "threads": self.threads, "machine": _machine(),
            "started": previous.get("started") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cells": cells,
            "select_cells": [{"task": c.task.name, "method": c.method.label, "lr": c.lr, "path": c.path}
                             for c in self.select_cells],
            **{k: dict(previous.get(k) or {}) for k in keep},
        }

    def save(self) -> None:
        with self.lock:
            self.manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(self.out / "bench.json", json.dumps(self.manifest, indent=2) + "\n")

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if (not (self.out / "bench.json").is_file() and self.out.exists()
                and any(p.name != "locks" for p in self.out.iterdir())):
            raise ValueError(f"--out {self.out} is not empty and holds no bench (bench.json); choose a new folder")
        self.final_cells = [_Cell(t, m, s, f"{t.name}/{m.folder}/seed{s}", "final")
                            for t in self.tasks for m in self.specs for s in self.seeds]
        self.select_cells = ([_Cell(t, m, self.seeds[0], f"{t.name}/{m.folder}/select/{_lr_folder(lr)}", "select", lr)
                              for t in self.tasks for m in self.specs for lr in self.lrs_of(m)] if self.grid else [])
        # one bench per folder, taken before bench.json is read: a second bench would overwrite the
        # first's bench.json with its own view of the grid
        with _locked(self.out / "locks" / "bench.lock", LOCK_GRACE, "another bench on this folder"):
            self.manifest = self._new_manifest(self._previous())
            self.out.mkdir(parents=True, exist_ok=True)
            self.save()
            self.cells = _CellProcesses(_context()) if self.isolate else None
            self.bar = tqdm(total=len(self.select_cells) + len(self.final_cells), desc="bench", unit="run",
                            disable=not self.progress, dynamic_ncols=True)
            units = [(t, m) for t in self.tasks for m in self.specs]
            try:
                if self.grid:
                    self._each(self._select_unit, units)
                    self._choose()
                self._each(self._final_unit, units)
            finally:
                self.bar.close()
                self.save()
        return self.manifest

    def _each(self, fn: Callable[[SuiteTask, MethodSpec], None], units: list[tuple[SuiteTask, MethodSpec]]) -> None:
        """``fn`` over every unit, ``jobs`` at a time; a failure or Ctrl-C stops every running cell."""
        try:
            if self.jobs == 1:
                for t, m in units:
                    fn(t, m)
                return
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                futures = [pool.submit(fn, t, m) for t, m in units]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    if self.cells:
                        self.cells.stop()  # before the pool waits for its threads, which wait for their cells
                    raise
        except BaseException:
            if self.cells:
                self.cells.stop()
            raise

    # -- one cell -----------------------------------------------------------------------------------
    def _kwargs(self, cell: _Cell, lr: float | None, path: str) -> dict[str, Any]:
        """The train() call of a cell: the grid's settings, the column's own, the protocol's."""
        from sensitune.methods import get_method

        over = {**self.overrides, "seed": cell.seed, "protocol": "val" if cell.phase == "select" else "final",
                "progress": False}
        if lr is not None:
            over["lr"] = lr
        staged = cell.method.stages()
        # with a grid, the column's lr is the base of its factors (lrs_of), never the cell's lr
        over.update({k: v for k, v in staged.train.items() if k != "lr" or not self.grid})
        if staged.plan:
            over["method_options"] = staged.plan
        if staged.score:
            over["score_options"] = staged.score
        own, budget = cell.method.own_budget()
        if not own:
            budget = self.budget if get_method(cell.method.name).budget != "none" else None
        return dict(model=self.model, task=cell.task.task, method=cell.method.name, out=str(self.out / path),
                    budget=None if budget is None else str(budget), config=self.config, **over)

    def _run(self, cell: _Cell, lr: float | None, path: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """Run one cell unless finished/failed; returns (results or None, divergence or None)."""
        path = path or cell.path
        run_dir = self.out / path
        done = results_complete(run_dir)
        with self.lock:
            if done is not None or (path in self.manifest["failed"] and not self.retry_failed):
                self.bar.update(1)
                return done, divergence_of(done, self.manifest["failed"].get(path))
            failure = self.manifest["failed"].pop(path, None)
            self.bar.set_postfix_str(f"{cell.task.name} {cell.method.label} {cell.phase} seed {cell.seed}"
                                     + (f" lr {lr:g}" if lr is not None else ""))
        name = path.replace("/", "__")
        log_path, lock_path = str(self.out / "logs" / f"{name}.log"), str(self.out / "locks" / f"{name}.lock")
        t0 = time.perf_counter()
        kwargs = self._kwargs(cell, lr, path)
        outcome = (self.cells.run(self.train, kwargs, log_path, self.threads, lock_path, failure is not None)
                   if self.cells else _run_cell(self.train, kwargs, log_path, [], self.threads, lock_path,
                                                failure is not None))
        if outcome.get("busy"):
            if failure is not None:
                with self.lock:
                    self.manifest["failed"][path] = failure
            raise CellBusy(outcome["busy"])
        res = results_complete(run_dir) if outcome["ok"] else None
        with self.lock:
            self.bar.update(1)
            if res is None:
                self.manifest["failed"][path] = outcome.get("error") or "finished without a complete results.json"
                self.echo(f"FAILED {path}: {self.manifest['failed'][path]} (log: {log_path})")
            else:
                if outcome.get("cpu_seconds") is not None:
                    self.manifest["cpu_seconds"][path] = round(outcome["cpu_seconds"], 1)
                self.echo(f"{cell.task.name:>14} {cell.method.label:<16} {cell.phase:<6} seed {cell.seed}"
                          + (f" lr {res.get('lr', lr):<8g}" if lr is not None or self.grid else "")
                          + f" {res.get('eval_split', ''):>14} acc {float(res['accuracy']):6.2f}%"
                          + (" DIVERGED" if res.get("diverged") else "")
                          + f"  ({time.perf_counter() - t0:.0f}s)")
            diverged = divergence_of(res, self.manifest["failed"].get(path))
            if diverged:
                self.manifest["diverged"][path] = diverged
            self.save()
        return res, diverged

    # -- stages -------------------------------------------------------------------------------------
    def _select_unit(self, task: SuiteTask, spec: MethodSpec) -> None:
        key = _key(task, spec)
        val: dict[float, float | None] = {}
        diverged: dict[float, str] = {}
        for cell in (c for c in self.select_cells if c.task is task and c.method is spec):
            res, why = self._run(cell, cell.lr)
            val[cell.lr] = None if res is None else float(res["accuracy"])  # type: ignore[index]
            if why:
                diverged[cell.lr] = why  # type: ignore[index]
        with self.lock:
            self.val[key], self.val_diverged[key] = val, diverged

    def _choose(self) -> None:
        """The ranking of every (task, method) under the scope, recorded with its stability."""
        selection: dict[str, Any] = {}
        for spec in self.specs:
            keys = [_key(t, spec) for t in self.tasks]
            if self.select_scope == "suite":
                means = suite_accuracy({k: self.val[k] for k in keys}, {k: self.val_diverged[k] for k in keys})
                ranking = rank_lrs(means, self.tie_tolerance) if means else []
                selection[f"*/{spec.label}"] = {"lr": ranking[0] if ranking else None, "ranking": ranking,
                                                "val_accuracy": {f"{k:g}": v for k, v in means.items()},
                                                "scope": "suite (mean over tasks)"}
            for t, k in zip(self.tasks, keys):
                if self.select_scope == "task":
                    ok = usable(self.val[k], self.val_diverged[k])
                    ranking = rank_lrs(ok, self.tie_tolerance) if ok else []
                self.ranking[k] = ranking
                selection[k] = {"lr": ranking[0] if ranking else None, "ranking": ranking,
                                "val_accuracy": {f"{lr:g}": v for lr, v in self.val[k].items()},
                                "diverged": {f"{lr:g}": why for lr, why in self.val_diverged[k].items()}}
        stability = self._stability()
        with self.lock:
            self.manifest["selection"] = selection
            self.manifest["selection_stability"] = stability
            self.save()

    def _val_correct(self, spec: MethodSpec) -> dict[str, dict[float, list[int]]] | None:
        """task -> usable lr -> 0/1 per validation image, read from the selection cells' predictions;
        None when some usable cell has no predictions file (older runs, a fake engine)."""
        from sensitune.engine.evaluation import read_predictions

        correct: dict[str, dict[float, list[int]]] = {}
        for c in self.select_cells:
            if c.method is not spec or c.lr not in usable(self.val[_key(c.task, spec)],
                                                         self.val_diverged[_key(c.task, spec)]):
                continue
            files = sorted((self.out / c.path).glob("eval_*_predictions.csv"))
            if not files:
                return None
            labels, preds = read_predictions(files[0])
            correct.setdefault(c.task.name, {})[c.lr] = [int(a == b) for a, b in zip(labels, preds)]  # type: ignore[index]
        return correct if len(correct) == len(self.tasks) else None

    def _stability(self, rounds: int = 1000) -> dict[str, Any]:
        """Both scopes' bootstrap stability (the share of redraws of val200 keeping each choice), per
        method: what a second draw of validation data would do to the rule in use and to the other."""
        out: dict[str, Any] = {"rounds": rounds}
        for spec in self.specs:
            correct = self._val_correct(spec)
            if correct is None:
                continue
            val = {t.name: self.val[_key(t, spec)] for t in self.tasks}
            diverged = {t.name: self.val_diverged[_key(t, spec)] for t in self.tasks}
            per_task = {t: rank_lrs(usable(val[t], diverged[t]), self.tie_tolerance)[0] for t in val}
            task_share = bootstrap_stability(correct, per_task, "task", self.tie_tolerance, rounds)
            means = suite_accuracy(val, diverged)
            suite_share = (bootstrap_stability(correct, rank_lrs(means, self.tie_tolerance)[0], "suite",
                                               self.tie_tolerance, rounds)["suite"] if means else None)
            out[spec.label] = {"task": round(float(sum(task_share.values()) / len(task_share)), 3),
                               "task_each": {k: round(v, 3) for k, v in task_share.items()},
                               "suite": None if suite_share is None else round(suite_share, 3)}
        return out

    def _final_unit(self, task: SuiteTask, spec: MethodSpec) -> None:
        """Every seed at the chosen lr; when one diverges, every seed again at the next-ranked lr."""
        key = _key(task, spec)
        cells = [c for c in self.final_cells if c.task is task and c.method is spec]
        if self.grid and not self.ranking.get(key):
            with self.lock:
                for c in cells:
                    self.manifest["failed"][c.path] = "no lr selected: every lr failed or diverged on validation"
                    self.bar.update(1)
                self.save()
            return
        ranking: list[float | None] = list(self.ranking[key]) if self.grid else [None]
        for i, lr in enumerate(ranking):
            folder = None if i == 0 else f"{task.name}/{spec.folder}/fallback-{_lr_folder(lr)}"  # type: ignore[arg-type]
            if i:
                with self.lock:
                    self.bar.total += len(cells)
            why = [w for c in cells if (w := self._run(c, lr, folder and f"{folder}/seed{c.seed}")[1])]
            self._record_final(cells, lr, folder, ranking[0], i)
            if not why or i + 1 == len(ranking):
                if why:
                    self.echo(f"{key}: diverged at every usable lr; no result")
                return
            with self.lock:
                self.manifest["fallback"][key] = {"from": ranking[0], "to": ranking[i + 1], "why": why[0][:300]}
                self.echo(f"{key}: lr {lr:g} diverged on the final training ({why[0][:80]}); "
                          f"falling back to {ranking[i + 1]:g}")
                self.save()

    def _record_final(self, cells: list[_Cell], lr: float | None, folder: str | None, chosen: float | None,
                      i: int) -> None:
        """Point the manifest's cells of this unit at the runs that now stand for them."""
        with self.lock:
            for entry in self.manifest["cells"]:
                for c in cells:
                    if (entry["task"], entry["method"], entry["seed"]) == (c.task.name, c.method.label, c.seed):
                        entry["path"] = f"{folder}/seed{c.seed}" if folder else c.path
                        entry["lr"] = lr
                        if i:
                            entry["fallback_from"] = chosen
                        else:
                            entry.pop("fallback_from", None)
            self.save()


def run_bench(**kwargs: Any) -> dict[str, Any]:
    """Run (or continue) the grid into ``out``; returns the manifest (also ``out/bench.json``).

    ``methods``: ``"a,b:key=value"`` or MethodSpecs; ``budget``: passed to budgeted methods only;
    ``overrides``: TrainConfig keys for every cell (e.g. epochs, img_size, batch_size);
    ``lr_grid`` + ``tie_tolerance`` + ``select_scope`` (``task`` | ``suite``): the lr selection on
    val200 (:mod:`sensitune.bench.selection`); ``train``: ``"module:function"`` with the signature
    of :func:`sensitune.engine.train` (tests substitute a fake; the real engine is the default).
    ``jobs``: (task, method) pairs run concurrently, each cell in its own process with
    ``threads`` torch threads (on a small CPU two 1-thread cells beat one 2-thread cell).
    """
    return Bench(**kwargs).run()
