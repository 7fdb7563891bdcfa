"""Reader for the VTAB-1k layout that every public PEFT implementation uses.

    <task>/train800.txt  val200.txt  train800val200.txt  test.txt   (one sample per line)
    <task>/images/...                                                 (any sub-layout)
    <task>/classes.txt                                                (optional: one name per line)

A list line is ``<path relative to the task folder> <integer label>``; blank lines and lines
starting with ``#`` are skipped; a path may contain spaces (the label is the last field).
The class count comes from ``classes.txt`` when present (labels must then be below it), else
it is ``max label + 1`` over *all* list files of the task, so every split agrees.
Split aliases: ``train`` → train800, ``val`` → val200, ``trainval`` → train800val200.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sensitune.data.validate import Entry, validate_samples
from sensitune.data.errors import TaskDataError

if TYPE_CHECKING:
    from sensitune.data.dataset import TaskDataset

SPLITS = ("train800", "val200", "train800val200", "test")
ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}


def is_vtab1k(folder: Path) -> bool:
    return any((folder / f"{s}.txt").is_file() for s in SPLITS)


def canonical_split(split: str) -> str:
    split = ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for a VTAB-1k task: choose one of "
                         f"{', '.join(SPLITS)} (aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return split


def parse_list(path: Path) -> list[Entry]:
    """Parse one list file; every malformed line is reported with its file and line number."""
    if not path.is_file():
        raise TaskDataError(f"list file is missing (expected {path.name} in {path.parent})", file=path)
    entries: list[Entry] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise TaskDataError(f"cannot parse {line!r}: expected '<relative image path> <integer label>'",
                                    file=path, line=lineno)
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                raise TaskDataError(f"cannot parse {line!r}: label {label_text!r} is not an integer",
                                    file=path, line=lineno) from None
            entries.append(Entry(rel=rel, label=label, file=path, line=lineno))
    return entries


def read_classes(folder: Path) -> list[str] | None:
    """Class names from ``classes.txt`` (line i names label i), or None when absent."""
    path = folder / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    for i, name in enumerate(names, start=1):
        if not name:
            raise TaskDataError("empty class name", file=path, line=i)
    if not names:
        raise TaskDataError("classes.txt lists no classes", file=path)
    return names


def task_classes(folder: Path) -> list[str]:
    """The task's class names, identical whichever split is opened."""
    names = read_classes(folder)
    if names is not None:
        return names
    top = -1
    for s in SPLITS:
        p = folder / f"{s}.txt"
        if p.is_file():
            for e in parse_list(p):
                top = max(top, e.label)
    if top < 0:
        raise TaskDataError("no labelled samples in any list file", file=folder)
    return [str(i) for i in range(top + 1)]


def open_vtab1k(folder: Path, split: str, *, transform=None, name: str | None = None,
                group: str | None = None, verify: bool = True) -> TaskDataset:
    from sensitune.data.dataset import TaskDataset  # torch is imported only when data is opened

    folder = Path(folder)
    split = canonical_split(split)
    entries = parse_list(folder / f"{split}.txt")
    classes = task_classes(folder)
    samples = validate_samples(folder, entries, len(classes), verify=verify)
    return TaskDataset(samples, num_classes=len(classes), class_names=classes, name=name or folder.name,
                       root=folder, split=split, group=group, transform=transform, layout="vtab1k")


def split_sizes(folder: Path) -> dict[str, int]:
    """Number of samples per present list file (parsed, not validated: for listings)."""
    return {s: len(parse_list(folder / f"{s}.txt")) for s in SPLITS if (folder / f"{s}.txt").is_file()}
