"""A killed bench leaves no process behind, and a cell folder never has two writers."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sensitune.bench import runner
from sensitune.bench.runner import CellBusy, run_bench

HERE = Path(__file__).resolve().parent

# a bench of two cells side by side, each holding (sleeping) far longer than the test; the fake
# engine needs no preloading, which would only slow the test down; Ctrl-C handled as in a terminal
# even when the tests themselves run in the background (which ignores SIGINT in children)
BENCH = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {here!r})
from sensitune.bench import runner
runner.SERVER_PRELOAD = ()
runner.run_bench(suite="mini", tasks=["digits", "textile"], model="tiny", methods="linear", seeds=[0], out={out!r},
          isolate=True, jobs=2, threads=1, progress=False, train="bench_fake_engine:train", echo=print,
          overrides={{"calls_file": {calls!r}, "hold": 600}})
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_for(condition, limit: float) -> bool:
    """Poll ``condition`` until true or ``limit`` seconds passed (a hang guard, not a speed check)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_bench_ends_its_fork_server_and_running_cells(tmp_path):
    """One bench per signal, side by side (each pays the import of torch): SIGKILL and SIGTERM run
    no cleanup in the bench, SIGINT (Ctrl-C) does."""
    sigs = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
    benches = {}
    try:
        for name in sigs:
            code = BENCH.format(here=str(HERE), out=str(tmp_path / name), calls=str(tmp_path / f"{name}.jsonl"))
            benches[name] = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        for name, sig in sigs.items():
            calls = tmp_path / f"{name}.jsonl"
            assert wait_for(lambda: calls.is_file() and len(calls.read_text().splitlines()) == 2, 120), \
                f"{name}: the two cells never started"
            cells = [json.loads(line) for line in calls.read_text().splitlines()]
            pids = {c["pid"] for c in cells}
            (server,) = {c["ppid"] for c in cells}  # both cells are children of the one fork server
            assert server != benches[name].pid and benches[name].pid not in pids
            assert all(map(running, pids | {server}))
            benches[name].send_signal(sig)
            benches[name].wait(timeout=60)
            assert wait_for(lambda: not any(map(running, pids | {server})), 30), \
                f"{name}: left behind {[p for p in pids | {server} if running(p)]}"
            # the cells' locks went with them: a new writer gets each cell at once
            locks = list((tmp_path / name / "locks").iterdir())
            assert len(locks) == 3  # the bench's and its two cells'
            for lock in locks:
                with open(lock, "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert not list((tmp_path / name).glob("*/linear/seed0/results.json"))
    finally:  # only what this test started: each bench's own session
        for bench in benches.values():
            try:
                os.killpg(bench.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            bench.wait()


@contextlib.contextmanager
def held(lock: Path):
    """Another process holding an exclusive flock on ``lock`` (and claiming to be pid 4242)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\n"
        f"fh = open({str(lock)!r}, 'w'); fcntl.flock(fh, fcntl.LOCK_EX); fh.write('4242'); fh.flush()\n"
        "print('locked', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_cell_or_bench_held_by_another_process_is_refused_not_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "LOCK_GRACE", 0.0)
    opts = dict(suite="mini", model="tiny", methods="linear", seeds=[0], out=tmp_path / "res", isolate=False,
                progress=False, train="bench_fake_engine:train", echo=lambda s: None,
                overrides={"calls_file": str(tmp_path / "calls.jsonl")})
    run_bench(**opts, tasks=["textile"])  # a bench folder with one finished cell

    def ran() -> int:
        return len((tmp_path / "calls.jsonl").read_text().splitlines())

    with held(tmp_path / "res" / "locks" / "digits__linear__seed0.lock"):
        with pytest.raises(CellBusy, match="held by process 4242 .a bench running this cell"):
            run_bench(**opts, tasks=["digits"])
        manifest = json.loads((tmp_path / "res" / "bench.json").read_text())
        assert not manifest["failed"] and ran() == 1  # the cell never ran, and is no failure
    with held(tmp_path / "res" / "locks" / "bench.lock"):
        with pytest.raises(CellBusy, match="held by process 4242 .another bench on this folder"):
            run_bench(**opts, tasks=["digits"])
        assert ran() == 1
    manifest = run_bench(**opts, tasks=["digits"])  # the holders died, and their locks with them
    assert not manifest["failed"] and ran() == 2 and (tmp_path / "res/digits/linear/seed0/results.json").is_file()
