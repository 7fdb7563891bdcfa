"""Reader for the VTAB-1k layout that every public PEFT implementation uses.

    <task>/train800.txt  val200.txt  train800val200.txt  test.txt   (one sample per line)
    <task>/images/...                                                 (any sub-layout)
    <task>/classes.txt                                                (optional: one name per line)

A list line is ``<path relative to the task folder> <integer label>``; blank lines and lines
starting with ``#`` are skipped; a path may contain spaces (the label is the last field).
The classes come from ``classes.txt`` when present (labels must then be below its line count;
a class may lack training images). Without it they are read off the training lists
(``train800.txt``, ``train800val200.txt``): their labels must be exactly 0..C-1 and each of
them must hold every class, so a stray label (99 in a 3-class task) is refused, listing the
labels found, instead of silently making a 100-way head; every split then has the same C
(a task with no training list takes ``max label + 1`` over its lists).
Every bad line of a split (unparsable, bad label, bad path, unreadable image) is reported in
one error. An empty list file is refused.
Split aliases: ``train`` → train800, ``val`` → val200, ``trainval`` → train800val200.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sensitune.data.errors import TaskDataError
from sensitune.data.validate import Entry, contiguous_label_problems, validate_samples

if TYPE_CHECKING:
    from sensitune.data.dataset import TaskDataset

SPLITS = ("train800", "val200", "train800val200", "test")
ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}
#: the lists a run trains on (protocol val / final): they define the classes without classes.txt
TRAIN_SPLITS = ("train800", "train800val200")
#: class counts of the VTAB-1k tasks, only to word the hint of a refusal (never applied silently:
#: a folder called ``cifar`` may well hold CIFAR-10)
VTAB_CLASSES = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}


def is_vtab1k(folder: Path) -> bool:
    return any((folder / f"{s}.txt").is_file() for s in SPLITS)


def canonical_split(split: str) -> str:
    split = ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for a VTAB-1k task: choose one of "
                         f"{', '.join(SPLITS)} (aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return split


def parse_list(path: Path, problems: list[TaskDataError] | None = None) -> list[Entry]:
    """Parse one list file; every malformed line is reported with its file and line number.

    With ``problems`` the malformed lines are appended there (and skipped); without, they are
    raised together.
    """
    if not path.is_file():
        raise TaskDataError(f"list file is missing (expected {path.name} in {path.parent})", file=path)
    entries: list[Entry] = []
    bad: list[TaskDataError] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                bad.append(TaskDataError(f"cannot parse {line!r}: expected '<relative image path> <integer label>'",
                                         file=path, line=lineno))
                continue
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                bad.append(TaskDataError(f"cannot parse {line!r}: label {label_text!r} is not an integer",
                                         file=path, line=lineno))
                continue
            entries.append(Entry(rel=rel, label=label, file=path, line=lineno))
    if problems is not None:
        problems += bad
    elif bad:
        raise TaskDataError.combine(bad, path.name)
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
    """The task's class names, identical whichever split is opened (see the module docstring)."""
    names = read_classes(folder)
    if names is not None:
        return names
    present = [s for s in SPLITS if (folder / f"{s}.txt").is_file()]
    lists = {folder / f"{s}.txt": parse_list(folder / f"{s}.txt", problems=[]) for s in present}
    training = {p: e for p, e in lists.items() if p.stem in TRAIN_SPLITS}
    if not training:  # an evaluation-only folder: nothing to check the labels against
        top = max((e.label for entries in lists.values() for e in entries), default=-1)
        if top < 0:
            raise TaskDataError("no labelled samples in any list file", file=folder)
        return [str(i) for i in range(top + 1)]
    known = VTAB_CLASSES.get(folder.name)
    hint = (f"VTAB-1k's {folder.name} has {known} classes (a classes.txt of {known} lines declares them)"
            if known else "")
    count, problems = contiguous_label_problems(training, hint=hint)
    if problems:
        raise TaskDataError.combine(problems, f"the labels of task {folder.name}")
    if count == 0:
        raise TaskDataError("no labelled samples in the training lists "
                            f"({', '.join(p.name for p in training)})", file=folder)
    return [str(i) for i in range(count)]


def open_vtab1k(folder: Path, split: str, *, transform=None, name: str | None = None,
                group: str | None = None, verify: bool = True) -> TaskDataset:
    from sensitune.data.dataset import TaskDataset  # torch is imported only when data is opened

    folder = Path(folder)
    split = canonical_split(split)
    problems: list[TaskDataError] = []
    entries = parse_list(folder / f"{split}.txt", problems)
    if not entries and not problems:
        raise TaskDataError(f"{split}.txt lists no samples: the split is empty", file=folder / f"{split}.txt")
    classes: list[str] | None = None
    try:
        classes = task_classes(folder)
    except TaskDataError as exc:  # reported together with this split's own bad lines
        problems += exc.problems
    declared = "classes.txt declares" if (folder / "classes.txt").is_file() else "the training split has"
    samples = validate_samples(folder, entries, len(classes) if classes else None, verify=verify,
                               what=f"split {split} of task {name or folder.name}", problems=problems,
                               classes_why=declared)
    if classes is None:  # validate_samples raises first; kept for type checkers
        raise TaskDataError.combine(problems, f"task {folder.name}")
    return TaskDataset(samples, num_classes=len(classes), class_names=classes, name=name or folder.name,
                       root=folder, split=split, group=group, transform=transform, layout="vtab1k")


def split_sizes(folder: Path) -> dict[str, int]:
    """Number of samples per present list file (parsed, not validated: for listings)."""
    return {s: len(parse_list(folder / f"{s}.txt")) for s in SPLITS if (folder / f"{s}.txt").is_file()}
