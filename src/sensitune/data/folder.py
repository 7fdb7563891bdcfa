"""Reader for plain class folders (torchvision ``ImageFolder`` style).

Either one folder per split, each holding one folder per class:

    <task>/train/<class>/*.jpg   <task>/val/<class>/*.jpg   <task>/test/<class>/*.jpg

or class folders directly under the task (then the only split is ``all``). Class names are the
sorted union of class folder names over all splits, so every split has the same labels.
Splits: ``train``, ``val``, ``test``, ``trainval`` = train + val; aliases train800 → train,
val200 → val, train800val200 → trainval.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sensitune.data.validate import Entry, validate_samples
from sensitune.data.errors import TaskDataError

if TYPE_CHECKING:
    from sensitune.data.dataset import TaskDataset

SPLIT_DIRS = ("train", "val", "test")
ALIASES = {"train800": "train", "val200": "val", "train800val200": "trainval"}
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def has_split_dirs(folder: Path) -> bool:
    return any((folder / s).is_dir() for s in SPLIT_DIRS)


def is_class_folders(folder: Path) -> bool:
    return folder.is_dir() and (has_split_dirs(folder) or bool(_subdirs(folder)))


def available_splits(folder: Path) -> list[str]:
    if not has_split_dirs(folder):
        return ["all"]
    present = [s for s in SPLIT_DIRS if (folder / s).is_dir()]
    return present + (["trainval"] if "train" in present and "val" in present else [])


def task_classes(folder: Path) -> list[str]:
    split_roots = [folder / s for s in SPLIT_DIRS if (folder / s).is_dir()] if has_split_dirs(folder) else [folder]
    names = sorted({p.name for r in split_roots for p in _subdirs(r)})
    if not names:
        raise TaskDataError("no class folders found", file=folder)
    return names


def _entries(split_root: Path, task_root: Path, classes: list[str]) -> list[Entry]:
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for cdir in _subdirs(split_root):
        for f in sorted(cdir.rglob("*")):
            if f.suffix.lower() in EXTENSIONS and (f.is_file() or f.is_symlink()):
                entries.append(Entry(rel=f.relative_to(task_root).as_posix(), label=index[cdir.name],
                                     file=cdir, line=f.name))
    return entries


def open_folder(folder: Path, split: str, *, transform=None, name: str | None = None,
                group: str | None = None, verify: bool = True) -> TaskDataset:
    from sensitune.data.dataset import TaskDataset  # torch is imported only when data is opened

    folder = Path(folder)
    split = ALIASES.get(split, split)
    splits = available_splits(folder)
    if split not in splits:
        raise ValueError(f"split {split!r} not found in class-folder task {folder}: available {', '.join(splits)}")
    classes = task_classes(folder)
    roots = [folder] if split == "all" else [folder / s for s in (("train", "val") if split == "trainval" else (split,))]
    entries = [e for r in roots for e in _entries(r, folder, classes)]
    if not entries:
        raise TaskDataError(f"split {split!r} holds no images with extensions {sorted(EXTENSIONS)}", file=roots[0])
    samples = validate_samples(folder, entries, len(classes), verify=verify,
                               what=f"split {split} of task {name or folder.name}")
    return TaskDataset(samples, num_classes=len(classes), class_names=classes, name=name or folder.name,
                       root=folder, split=split, group=group, transform=transform, layout="folder")


def split_sizes(folder: Path) -> dict[str, int]:
    classes = task_classes(folder)
    sizes = {}
    for s in available_splits(folder):
        if s == "trainval":
            sizes[s] = sizes["train"] + sizes["val"]
        else:
            sizes[s] = len(_entries(folder if s == "all" else folder / s, folder, classes))
    return sizes
