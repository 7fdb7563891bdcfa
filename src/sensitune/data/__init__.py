"""Task data: one entry point, :func:`open_task`, over every layout the field uses.

``open_task(task, split)`` accepts a built-in mini-suite name (built on first use into
``cache_dir()/mini``; see :mod:`sensitune.data.embedded` for the table of tasks) or a task
folder whose layout is detected: VTAB-1k list files (:mod:`.vtab1k`), FGVC JSON files
(:mod:`.fgvc`) or class folders (:mod:`.folder`). The whole split is validated when it is
opened — paths, labels, every image decoded in full — so bad data fails fast, every bad line of
the split reported together with its file and line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sensitune.data import embedded, fgvc, folder, vtab1k
from sensitune.data.embedded import DEFAULT_MINI_IMG_SIZE, DEFAULT_SEED, MINI_SUITE, cache_dir, materialize
from sensitune.data.errors import TaskDataError

if TYPE_CHECKING:
    from sensitune.data.dataset import TaskDataset
    from sensitune.data.transforms import AUGMENTATIONS, build_transform

# torch/torchvision load only when these are first used: listing or building tasks stays quick.
_LAZY = {"TaskDataset": "sensitune.data.dataset", "build_transform": "sensitune.data.transforms",
         "AUGMENTATIONS": "sensitune.data.transforms"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sensitune.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "AUGMENTATIONS", "DEFAULT_MINI_IMG_SIZE", "MINI_SUITE", "TaskDataError", "TaskDataset", "VTAB_GROUPS",
    "build_transform", "cache_dir", "detect_layout", "list_tasks", "materialize", "open_task", "resolve_task",
]

# VTAB-1k folder names -> group (../shared/specs/benchmarks.md), so real VTAB tasks get their group.
VTAB_GROUPS: dict[str, str] = {
    **{n: "natural" for n in ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")},
    **{n: "specialized" for n in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")},
    **{n: "structured" for n in ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                                 "smallnorb_azi", "smallnorb_ele")},
}

_READERS = {"vtab1k": vtab1k.open_vtab1k, "fgvc": fgvc.open_fgvc, "folder": folder.open_folder}


def detect_layout(path: Path) -> str:
    """``vtab1k``, ``fgvc`` or ``folder``; raises when ``path`` holds none of them."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"task folder {path} does not exist")
    if vtab1k.is_vtab1k(path):
        return "vtab1k"
    if fgvc.is_fgvc(path):
        return "fgvc"
    subdirs = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subdirs == {"images"}:  # a VTAB-1k task whose list files are gone, not a one-class folder task
        raise TaskDataError(f"looks like a VTAB-1k task (an images/ folder) but no list file "
                            f"({', '.join(s + '.txt' for s in vtab1k.SPLITS)}) is there", file=path)
    if folder.is_class_folders(path):
        return "folder"
    raise TaskDataError(f"no task layout recognised: expected VTAB-1k list files ({', '.join(vtab1k.SPLITS)}.txt), "
                        "FGVC JSON files (train/val/test.json) or class folders", file=path)


def resolve_task(task: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                 seed: int = DEFAULT_SEED) -> tuple[Path, str | None, bool]:
    """Where ``task`` lives: ``(folder, group, is_builtin)``.

    A bare name is looked up under ``data_root`` first, then among the built-in tasks, then
    as a folder relative to the working directory; a path (``os.PathLike`` or containing a
    separator) is always a folder.
    """
    is_path = isinstance(task, os.PathLike) or any(sep in str(task) for sep in ("/", os.sep))
    if not is_path:
        name = str(task)
        if data_root is not None and (Path(data_root) / name).is_dir():
            return Path(data_root) / name, VTAB_GROUPS.get(name), False
        if name in embedded.TASKS:
            return materialize(name, seed=seed), embedded.TASKS[name].group, True
    p = Path(task)
    if not p.is_absolute() and data_root is not None and (Path(data_root) / p).is_dir():
        p = Path(data_root) / p
    if p.is_dir():
        return p, VTAB_GROUPS.get(p.name), False
    where = f" under {data_root}" if data_root is not None else ""
    raise FileNotFoundError(f"task {str(task)!r} not found{where}: not a folder and not a built-in task "
                            f"({', '.join(embedded.TASKS)})")


def open_task(task: str | os.PathLike, split: str, *, transform: Callable | None = None,
              data_root: str | os.PathLike | None = None, seed: int = DEFAULT_SEED,
              verify: bool = True) -> TaskDataset:
    """Open and validate one split of a task (built-in name or folder; layout detected).

    ``verify=False`` skips decoding every image (paths and labels are still checked).
    """
    path, group, builtin = resolve_task(task, data_root=data_root, seed=seed)
    layout = "vtab1k" if builtin else detect_layout(path)
    name = path.name
    return _READERS[layout](path, split, transform=transform, name=name, group=group, verify=verify)


def _sizes(path: Path, layout: str) -> dict[str, int]:
    return {"vtab1k": vtab1k.split_sizes, "fgvc": fgvc.split_sizes, "folder": folder.split_sizes}[layout](path)


def _classes(path: Path, layout: str) -> int:
    if layout == "fgvc":
        return len(fgvc.task_classes(path)[0])
    return len({"vtab1k": vtab1k.task_classes, "folder": folder.task_classes}[layout](path))


def list_tasks(data_root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Built-in tasks (whether built or not) and every task folder found directly under ``data_root``.

    Each entry: ``name, group, classes, sizes`` (split → images), ``where``, ``layout``, ``builtin``,
    plus ``built``/``source`` for built-in tasks and ``error`` for a folder that fails to parse.
    """
    out: list[dict[str, Any]] = []
    root = embedded.mini_root()
    for t in embedded.TASKS.values():
        n_train, n_val, n_test = t.sizes
        out.append({"name": t.name, "group": t.group, "classes": t.classes, "layout": "vtab1k", "builtin": True,
                    "sizes": {"train800": n_train, "val200": n_val, "train800val200": n_train + n_val, "test": n_test},
                    "where": str(root / t.name), "built": embedded._is_current(root / t.name, DEFAULT_SEED),
                    "source": t.source})
    if data_root is not None:
        base = Path(data_root)
        if not base.is_dir():
            raise FileNotFoundError(f"data root {base} is not a folder")
        for p in sorted(q for q in base.iterdir() if q.is_dir() and not q.name.startswith(".")):
            entry: dict[str, Any] = {"name": p.name, "group": VTAB_GROUPS.get(p.name), "where": str(p), "builtin": False}
            try:
                entry["layout"] = layout = detect_layout(p)
                sizes = _sizes(p, layout)  # first: it names a list's unparsable lines
                entry["classes"] = _classes(p, layout)
                entry["sizes"] = sizes
            except (TaskDataError, OSError) as exc:
                if "layout" not in entry:
                    continue  # not a task folder at all
                entry["error"] = str(exc)
            out.append(entry)
    return out
