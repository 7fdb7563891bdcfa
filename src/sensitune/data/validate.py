"""Checks every reader runs on its samples when a task is opened (no torch needed here).

Every reader (VTAB-1k lists, FGVC JSON, class folders, the built-in mini suite) produces
entries and hands them to :func:`validate_samples`, so the checks — the path stays inside the
task folder, the file exists, the whole image decodes, the label is in range — run once, when
the task is opened, and never surprise a training loop mid-epoch. Every bad entry of a split
is reported in one error, each with its file and line.

Decoding every image is the only check that catches a truncated JPEG (its header is intact);
it runs in a thread pool (Pillow releases the GIL while decoding) and an image already decoded
by this process, unchanged since (same size and modification time), is not decoded again, so
opening the same split twice costs one decode per image. ``benchmarks/results/data.md``
records the cost on a VTAB-1k-sized task.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sensitune.data.errors import TaskDataError

#: splits smaller than this are decoded in the calling thread (a pool is not worth starting)
_POOL_MIN = 32
#: (path, size, mtime) of images this process decoded whole; bounded so memory stays small
_decoded: set[tuple[str, int, int]] = set()
_DECODED_MAX = 200_000
_decoded_lock = threading.Lock()


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
    """Check the file exists, its structure verifies and its pixels decode in full.

    ``verify()`` checks chunk checksums without decoding; ``load()`` decodes every pixel, which
    is what catches a JPEG cut off after an intact header.
    """
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise TaskDataError(f"image {path} does not exist", file=file, line=line)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _decoded:
        return
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise TaskDataError(f"image {path} is not a readable image ({exc})", file=file, line=line) from exc
    with _decoded_lock:
        if len(_decoded) >= _DECODED_MAX:
            _decoded.clear()
        _decoded.add(key)


def _verify_or_error(item: tuple[Path, Entry]) -> TaskDataError | None:
    path, e = item
    try:
        verify_image(path, file=e.file, line=e.line)
    except TaskDataError as exc:
        return exc
    return None


def verify_images(items: list[tuple[Path, Entry]]) -> list[TaskDataError]:
    """Decode every image (in a thread pool for larger splits); the problems, in input order."""
    if len(items) < _POOL_MIN:
        found = [_verify_or_error(it) for it in items]
    else:
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sensitune-verify") as pool:
            found = list(pool.map(_verify_or_error, items, chunksize=16))
    return [e for e in found if e is not None]


def label_problem(e: Entry, num_classes: int | None, why: str = "") -> TaskDataError | None:
    """The problem with ``e``'s label, if any: negative, or not below the class count."""
    if e.label < 0:
        return TaskDataError(f"label {e.label} is negative", file=e.file, line=e.line)
    if num_classes is not None and e.label >= num_classes:
        return TaskDataError(f"label {e.label} is out of range: {why or 'the task declares'} {num_classes} classes "
                             f"(labels 0..{num_classes - 1})", file=e.file, line=e.line)
    return None


def validate_samples(root: Path, entries: list[Entry], num_classes: int | None, *, verify: bool = True,
                     what: str = "the split", problems: list[TaskDataError] | None = None,
                     classes_why: str = "") -> list[tuple[Path, int]]:
    """Turn raw entries into ``(path, label)`` samples; every bad one is reported together.

    ``problems`` found earlier by the reader (unparsable lines) are raised with these;
    ``what`` names the split in the message; ``classes_why`` says where the class count came from.
    """
    found: list[TaskDataError] = list(problems or [])
    samples: list[tuple[Path, int]] = []
    to_verify: list[tuple[Path, Entry]] = []
    for e in entries:
        bad = label_problem(e, num_classes, classes_why)
        if bad is not None:
            found.append(bad)
        try:
            path = resolve_inside(root, e.rel, file=e.file, line=e.line)
        except TaskDataError as exc:
            found.append(exc)
            continue
        if verify:
            to_verify.append((path, e))  # a line with a bad label gets its image checked too
        if bad is None:
            samples.append((path, e.label))
    if to_verify:
        found += verify_images(to_verify)
    if found:
        raise TaskDataError.combine(_in_file_order(found), what)
    return samples


def _in_file_order(problems: list[TaskDataError]) -> list[TaskDataError]:
    """Sorted by file, then line (the file's own problem first, numbers before keys), so a long
    report reads top to bottom."""
    def key(p: TaskDataError):
        line = p.line
        rank = 0 if line is None else 1 if isinstance(line, int) else 2
        return (str(p.file or ""), rank, line if isinstance(line, int) else 0, "" if line is None else str(line))
    return sorted(problems, key=key)


def format_labels(labels) -> str:
    """``0-2, 5, 7-9``: a set of integer labels as sorted ranges."""
    values = sorted(set(labels))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts) if parts else "none"


def contiguous_label_problems(per_file: dict[Path, list[Entry]], *, hint: str = "",
                              show_lines: int = 20) -> tuple[int, list[TaskDataError]]:
    """The class count a task without a class list implies, and what is wrong with it.

    Why: without a declared class list the count is read off the labels, so one stray label
    (99 in a 3-class task) would silently make a 100-way head. The rule: the labels of the
    training files (``per_file``) are exactly 0..C-1 and each training file holds every one of
    them. A problem names the file, the labels found and the missing ones, plus the lines whose
    labels lie above the first gap (when there are at most ``show_lines`` of them).
    """
    union = {e.label for entries in per_file.values() for e in entries if e.label >= 0}
    if not union:
        return 0, []
    count = max(union) + 1
    holes = set(range(count)) - union
    gap = min(holes) if holes else None  # labels above a hole of every training file are suspect
    problems: list[TaskDataError] = []
    for file, entries in per_file.items():
        found = {e.label for e in entries if e.label >= 0}
        missing = set(range(count)) - found
        if not missing:
            continue
        above = [e for e in entries if gap is not None and e.label > gap]
        msg = (f"without classes.txt the classes are the labels 0..C-1, each present in the training split; "
               f"{file.name} has labels {format_labels(found)} ({len(found)} distinct), so label"
               f"{'s' if len(missing) > 1 else ''} {format_labels(missing)} "
               f"{'have' if len(missing) > 1 else 'has'} no training image. ")
        if len(above) > show_lines:
            msg += f"{len(above)} of its lines hold labels above {gap}. "
        msg += ("If the labels are right, declare the classes in classes.txt (one name per line; line i names "
                "label i)" + (f"; {hint}" if hint else ""))
        problems.append(TaskDataError(msg, file=file))
        if len(above) <= show_lines:
            problems += [TaskDataError(f"label {e.label} lies above label {gap}, which no training image has",
                                       file=e.file, line=e.line) for e in above]
    return count, problems
