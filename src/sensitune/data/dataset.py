"""``TaskDataset``: a validated list of (image path, label) shared by every layout reader.

Every reader (VTAB-1k lists, FGVC JSON, class folders, the built-in mini suite) produces
entries and hands them to :func:`validate_samples`, so the checks — the path stays inside the
task folder, the file exists, its header decodes, the label is in range — run once, when the
task is opened, and never surprise a training loop mid-epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

from sensitune.data.errors import TaskDataError


@dataclass(frozen=True)
class Entry:
    """One raw sample as written in a task's list/JSON file, with where it was written."""

    rel: str
    label: int
    file: Path
    line: int | str


def resolve_inside(root: Path, rel: str, *, file: Path, line: int | str) -> Path:
    """Resolve ``rel`` against ``root`` and refuse anything that leaves it.

    Why: list files are user data; ``../x.jpg``, absolute paths and symlinks pointing out
    would let a task read (and later report on) files outside its folder.
    """
    if not rel:
        raise TaskDataError("empty image path", file=file, line=line)
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise TaskDataError(f"image path {rel!r} is absolute; paths must be relative to the task folder {root}",
                            file=file, line=line)
    root_real = Path(os.path.realpath(root))
    candidate = root / rel
    real = Path(os.path.realpath(candidate))
    if real != root_real and root_real not in real.parents:
        what = "is a symlink pointing" if candidate.is_symlink() or _has_symlink(root, rel) else "leads"
        raise TaskDataError(f"image path {rel!r} {what} outside the task folder {root} (to {real})",
                            file=file, line=line)
    return candidate


def _has_symlink(root: Path, rel: str) -> bool:
    p = root
    for part in Path(rel).parts:
        p = p / part
        if p.is_symlink():
            return True
    return False


def verify_image(path: Path, *, file: Path, line: int | str) -> None:
    """Check the file exists and its image header decodes (cheap: no pixel decoding)."""
    if not path.is_file():
        raise TaskDataError(f"image {path} does not exist", file=file, line=line)
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TaskDataError(f"image {path} is not a readable image ({exc})", file=file, line=line) from exc


def validate_samples(root: Path, entries: list[Entry], num_classes: int | None, *,
                     verify: bool = True) -> list[tuple[Path, int]]:
    """Turn raw entries into ``(path, label)`` samples, raising on the first bad one."""
    samples: list[tuple[Path, int]] = []
    for e in entries:
        if e.label < 0:
            raise TaskDataError(f"label {e.label} is negative", file=e.file, line=e.line)
        if num_classes is not None and e.label >= num_classes:
            raise TaskDataError(f"label {e.label} is out of range: the task declares {num_classes} classes "
                                f"(labels 0..{num_classes - 1})", file=e.file, line=e.line)
        path = resolve_inside(root, e.rel, file=e.file, line=e.line)
        if verify:
            verify_image(path, file=e.file, line=e.line)
        samples.append((path, e.label))
    return samples


class TaskDataset(torch.utils.data.Dataset):
    """A validated split of an image classification task.

    ``__getitem__(i)`` returns ``(transform(PIL RGB image), int label)`` — the PIL image itself
    when ``transform`` is None. ``num_classes`` is the task's class count (identical for every
    split of a task), not the number of labels that happen to occur in this split.
    """

    def __init__(self, samples: list[tuple[Path, int]], *, num_classes: int, class_names: list[str],
                 name: str, root: Path, split: str, group: str | None = None,
                 transform: Callable[[Image.Image], Any] | None = None, layout: str = "vtab1k"):
        if len(class_names) != num_classes:
            raise ValueError(f"task {name}: {len(class_names)} class names for {num_classes} classes")
        self.samples = samples
        self.num_classes = num_classes
        self.class_names = class_names
        self.name = name
        self.group = group
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.layout = layout

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image:
        path, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise TaskDataError(f"cannot decode image {path} (sample {i} of {self.name}/{self.split}): {exc}",
                                file=path) from exc

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.load_image(i)
        label = self.samples[i][1]
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (f"TaskDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, group={self.group!r}, root='{self.root}')")
