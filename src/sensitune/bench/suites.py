"""Benchmark suites: which tasks, in which groups, read from where.

``mini`` is the built-in suite (no data to download; :data:`sensitune.data.MINI_SUITE`).
``vtab1k`` and ``fgvc`` are the field's suites, read from ``--data-root`` in the layouts of
../shared/specs/benchmarks.md (one folder per task). Every suite uses the same protocol names:
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
    else:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
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
