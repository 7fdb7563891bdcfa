"""Reader for VPT's FGVC JSON layout (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs/Cars).

    <task>/train.json  val.json  test.json     {"relative/path.jpg": class_id, ...}
    <task>/images/ | Images/ | .               image root (the first that holds the first key)

Class ids may be any integers (CUB's are 1-based): they are mapped to 0..C-1 in sorted order
over the union of all JSON files of the task, so every split agrees; every id must then occur
in ``train.json`` (when there is one), so a stray id is refused instead of adding a class no
image trains. With a ``classes.txt`` beside the JSON files, ids are taken as-is and must lie
in 0..C-1. Every bad entry of a split is reported in one error; an empty split is refused.
Splits: ``train``, ``val``, ``test`` and ``trainval`` = train + val (the FGVC protocol trains on
trainval and reports test). VTAB names map onto them: train800 → train, val200 → val,
train800val200 → trainval.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sensitune.data.errors import TaskDataError
from sensitune.data.validate import Entry, format_labels, validate_samples
from sensitune.data.vtab1k import read_classes

FILES = ("train", "val", "test")
if TYPE_CHECKING:
    from sensitune.data.dataset import TaskDataset

SPLITS = ("train", "val", "trainval", "test")
ALIASES = {"train800": "train", "val200": "val", "train800val200": "trainval"}
IMAGE_DIRS = ("images", "Images")


def is_fgvc(folder: Path) -> bool:
    return any((folder / f"{s}.json").is_file() for s in FILES)


def canonical_split(split: str) -> str:
    split = ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for an FGVC task: choose one of {', '.join(SPLITS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return split


def read_json(path: Path, problems: list[TaskDataError] | None = None) -> list[tuple[str, int]]:
    """``(relative path, raw class id)`` pairs from one split file, checked for shape.

    A non-integer id is appended to ``problems`` (and skipped) when given, else every one is
    raised together.
    """
    if not path.is_file():
        raise TaskDataError(f"split file is missing (expected {path.name} in {path.parent})", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise TaskDataError("expected a JSON object mapping image path -> class id", file=path)
    pairs, bad = [], []
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int):
            bad.append(TaskDataError(f"class id {value!r} is not an integer", file=path, line=key))
            continue
        pairs.append((key, value))
    if problems is not None:
        problems += bad
    elif bad:
        raise TaskDataError.combine(bad, path.name)
    return pairs


def image_root(folder: Path, first_key: str | None) -> Path:
    for name in IMAGE_DIRS:
        cand = folder / name
        if cand.is_dir() and (first_key is None or (cand / first_key).exists()):
            return cand
    return folder


def task_classes(folder: Path) -> tuple[list[str], dict[int, int] | None]:
    """Class names and the raw-id → label map (None when classes.txt fixes ids as labels)."""
    names = read_classes(folder)
    if names is not None:
        return names, None
    per_file = {f: read_json(folder / f"{f}.json", problems=[]) for f in FILES if (folder / f"{f}.json").is_file()}
    ids = sorted({cid for pairs in per_file.values() for _, cid in pairs})
    if not ids:
        raise TaskDataError("no labelled images in any split JSON", file=folder)
    if "train" in per_file:
        trained = {cid for _, cid in per_file["train"]}
        untrained = sorted(set(ids) - trained)
        if untrained:
            path = folder / "train.json"
            lines = [TaskDataError(f"class id {cid} does not occur in train.json", file=folder / f"{f}.json", line=rel)
                     for f, pairs in per_file.items() if f != "train" for rel, cid in pairs if cid in untrained]
            head = TaskDataError(
                f"without classes.txt every class id must occur in train.json; it has ids {format_labels(trained)} "
                f"({len(trained)} distinct), the other splits also use {format_labels(untrained)}. If those classes "
                f"are real, declare the classes in classes.txt (one name per line; line i names label i, and ids "
                f"are then taken as labels)", file=path)
            raise TaskDataError.combine([head, *lines[:20]], f"the class ids of task {folder.name}")
    return [str(i) for i in ids], {cid: k for k, cid in enumerate(ids)}


def open_fgvc(folder: Path, split: str, *, transform=None, name: str | None = None,
              group: str | None = None, verify: bool = True) -> TaskDataset:
    from sensitune.data.dataset import TaskDataset  # torch is imported only when data is opened

    folder = Path(folder)
    split = canonical_split(split)
    files = ("train", "val") if split == "trainval" else (split,)
    problems: list[TaskDataError] = []
    per_file = {f: read_json(folder / f"{f}.json", problems) for f in files}
    if not any(per_file.values()) and not problems:
        raise TaskDataError(f"split {split!r} holds no images: the split is empty",
                            file=folder / f"{files[0]}.json")
    classes: list[str] | None = None
    remap: dict[int, int] | None = None
    try:
        classes, remap = task_classes(folder)
    except TaskDataError as exc:  # reported together with this split's own bad entries
        problems += exc.problems
    first = next((pairs[0][0] for pairs in per_file.values() if pairs), None)
    root = image_root(folder, first)
    entries: list[Entry] = []
    for f, pairs in per_file.items():
        path = folder / f"{f}.json"
        for rel, cid in pairs:
            if cid < 0:
                problems.append(TaskDataError(f"class id {cid} is negative", file=path, line=rel))
            else:  # without classes (refused above) the paths and images are still checked
                label = cid if classes is None or remap is None else remap[cid]
                entries.append(Entry(rel=rel, label=label, file=path, line=rel))
    samples = validate_samples(root, entries, len(classes) if classes else None, verify=verify,
                               what=f"split {split} of task {name or folder.name}", problems=problems,
                               classes_why="classes.txt declares")
    if classes is None:  # validate_samples raises first; kept for type checkers
        raise TaskDataError.combine(problems, f"task {folder.name}")
    return TaskDataset(samples, num_classes=len(classes), class_names=classes, name=name or folder.name,
                       root=folder, split=split, group=group, transform=transform, layout="fgvc")


def split_sizes(folder: Path) -> dict[str, int]:
    sizes = {f: len(read_json(folder / f"{f}.json")) for f in FILES if (folder / f"{f}.json").is_file()}
    if "train" in sizes and "val" in sizes:
        sizes["trainval"] = sizes["train"] + sizes["val"]
    return sizes
