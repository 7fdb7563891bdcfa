"""Reader for VPT's FGVC JSON layout (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs/Cars).

    <task>/train.json  val.json  test.json     {"relative/path.jpg": class_id, ...}
    <task>/images/ | Images/ | .               image root (the first that holds the first key)

Class ids may be any integers (CUB's are 1-based): they are mapped to 0..C-1 in sorted order
over the union of all JSON files of the task, so every split agrees. With a ``classes.txt``
beside the JSON files, ids are taken as-is and must lie in 0..C-1.
Splits: ``train``, ``val``, ``test`` and ``trainval`` = train + val (the FGVC protocol trains on
trainval and reports test). VTAB names map onto them: train800 → train, val200 → val,
train800val200 → trainval.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sensitune.data.validate import Entry, validate_samples
from sensitune.data.errors import TaskDataError
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


def read_json(path: Path) -> list[tuple[str, int]]:
    """``(relative path, raw class id)`` pairs from one split file, checked for shape."""
    if not path.is_file():
        raise TaskDataError(f"split file is missing (expected {path.name} in {path.parent})", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"not valid JSON: {exc.msg}", file=path, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise TaskDataError("expected a JSON object mapping image path -> class id", file=path)
    pairs = []
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TaskDataError(f"class id {value!r} is not an integer", file=path, line=key)
        pairs.append((key, value))
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
    ids = sorted({cid for f in FILES if (folder / f"{f}.json").is_file() for _, cid in read_json(folder / f"{f}.json")})
    if not ids:
        raise TaskDataError("no labelled images in any split JSON", file=folder)
    return [str(i) for i in ids], {cid: k for k, cid in enumerate(ids)}


def open_fgvc(folder: Path, split: str, *, transform=None, name: str | None = None,
              group: str | None = None, verify: bool = True) -> TaskDataset:
    from sensitune.data.dataset import TaskDataset  # torch is imported only when data is opened

    folder = Path(folder)
    split = canonical_split(split)
    files = ("train", "val") if split == "trainval" else (split,)
    per_file = {f: read_json(folder / f"{f}.json") for f in files}
    classes, remap = task_classes(folder)
    first = next((pairs[0][0] for pairs in per_file.values() if pairs), None)
    root = image_root(folder, first)
    entries: list[Entry] = []
    for f, pairs in per_file.items():
        path = folder / f"{f}.json"
        for rel, cid in pairs:
            if cid < 0:
                raise TaskDataError(f"class id {cid} is negative", file=path, line=rel)
            entries.append(Entry(rel=rel, label=remap[cid] if remap is not None else cid, file=path, line=rel))
    samples = validate_samples(root, entries, len(classes), verify=verify)
    return TaskDataset(samples, num_classes=len(classes), class_names=classes, name=name or folder.name,
                       root=folder, split=split, group=group, transform=transform, layout="fgvc")


def split_sizes(folder: Path) -> dict[str, int]:
    sizes = {f: len(read_json(folder / f"{f}.json")) for f in FILES if (folder / f"{f}.json").is_file()}
    if "train" in sizes and "val" in sizes:
        sizes["trainval"] = sizes["train"] + sizes["val"]
    return sizes
