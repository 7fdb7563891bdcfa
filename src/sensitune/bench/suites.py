"""Benchmark suites: which tasks, in which groups, read from where.

``mini`` is the built-in suite (no data to download; :data:`sensitune.data.MINI_SUITE`).
``vtab1k`` and ``fgvc`` are the field's suites, read from ``--data-root`` in the layouts of
../shared/specs/benchmarks.md (one folder per task). Any other folder is a suite of its own:
every task folder directly under it (VTAB-1k, FGVC or class-folder layout), grouped by an
optional ``groups.txt`` (``task group`` per line; ``#`` starts a comment) — without one, a VTAB
task name keeps its VTAB group, an FGVC name ``fgvc``, any other ``tasks``. Every suite uses the same protocol names:
select on train800 -> val200, report train800val200 -> test (the FGVC reader maps these onto
its train / val / trainval / test JSON files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: ``name`` labels the table, ``task`` is what ``train(task=...)`` gets."""

    name: str
    group: str
    task: str


VTAB1K: list[tuple[str, str]] = [
    *[(n, "natural") for n in ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")],
    *[(n, "specialized") for n in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")],
    *[(n, "structured") for n in ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                                  "smallnorb_azi", "smallnorb_ele")],
]

FGVC: list[tuple[str, str]] = [(n, "fgvc") for n in
                               ("CUB_200_2011", "nabirds", "oxfordflower", "stanforddogs", "stanfordcars")]

SUITES = ("mini", "vtab1k", "fgvc")
GROUPS_FILE = "groups.txt"


def folder_suite(root: str | Path) -> list[SuiteTask]:
    """The task folders under ``root`` with their groups (see the module docstring)."""
    from sensitune.data import detect_layout
    from sensitune.data.errors import TaskDataError

    root = Path(root)
    tasks = []
    for p in sorted(q for q in root.iterdir() if q.is_dir() and not q.name.startswith(".")):
        try:
            detect_layout(p)
        except (TaskDataError, OSError):
            continue
        tasks.append(p.name)
    if not tasks:
        raise ValueError(f"--suite {root}: no task folder under it (VTAB-1k list files, FGVC JSON files or "
                         "class folders, one folder per task)")
    known = dict(VTAB1K) | dict(FGVC)
    groups = {t: known.get(t, "tasks") for t in tasks}
    groups_file = root / GROUPS_FILE
    if groups_file.is_file():
        given, bad = {}, []
        for n, line in enumerate(groups_file.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2 or words[0] not in groups:
                bad.append(f"line {n}: {line.strip()!r}" + ("" if len(words) != 2 else f" ({words[0]} is no task here)"))
            else:
                given[words[0]] = words[1]
        ungrouped = [t for t in tasks if t not in given]
        if bad or ungrouped:
            raise ValueError(f"{groups_file}: " + "; ".join(bad + ([f"no group for {', '.join(ungrouped)}"]
                                                                  if ungrouped else []))
                             + " (each line: task group)")
        groups = given
    return [SuiteTask(t, groups[t], str(root / t)) for t in tasks]


def suite_tasks(suite: str, data_root: str | Path | None = None,
                only: Sequence[str] | None = None) -> list[SuiteTask]:
    """The tasks of ``suite`` (optionally only those named in ``only``), checked to exist.

    ``vtab1k`` and ``fgvc`` need ``data_root`` holding one folder per task; a missing folder is
    an error that lists every missing one, so a long grid never starts on half a suite.
    """
    if suite == "mini":
        from sensitune.data import MINI_SUITE

        tasks = [SuiteTask(n, g, n) for n, g in MINI_SUITE]
    elif suite in ("vtab1k", "fgvc"):
        if data_root is None:
            raise ValueError(f"--suite {suite} reads real data: pass --data-root DIR holding one folder per task "
                             f"({', '.join(n for n, _ in (VTAB1K if suite == 'vtab1k' else FGVC))})")
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {root} is not a folder")
        table = VTAB1K if suite == "vtab1k" else FGVC
        tasks = [SuiteTask(n, g, str(root / n)) for n, g in table]
    elif Path(suite).is_dir():
        tasks = folder_suite(suite)
    else:
        raise ValueError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}, or give a folder of task folders")
    if only:
        known = {t.name for t in tasks}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"--tasks: {', '.join(unknown)} not in suite {suite!r} ({', '.join(sorted(known))})")
        tasks = [t for t in tasks if t.name in set(only)]
    if suite != "mini":
        missing = [t.task for t in tasks if not Path(t.task).is_dir()]
        if missing:
            raise FileNotFoundError(f"suite {suite}: {len(missing)} task folder(s) missing under {data_root}: "
                                    + ", ".join(Path(m).name for m in missing)
                                    + " (use --tasks to run a subset)")
    return tasks
