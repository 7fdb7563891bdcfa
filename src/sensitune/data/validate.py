"""Checks every reader runs on its samples when a task is opened (no torch needed here).

Every reader (VTAB-1k lists, FGVC JSON, class folders, the built-in mini suite) produces
entries and hands them to :func:`validate_samples`, so the checks — the path stays inside the
task folder, the file exists, its header decodes, the label is in range — run once, when the
task is opened, and never surprise a training loop mid-epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


