"""``TaskDataset``: a validated list of (image path, label) shared by every layout reader.

The readers build the samples (checked by :mod:`sensitune.data.validate`); this class only
loads them, so a decoding problem that appears after opening still names the file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from sensitune.data.errors import TaskDataError


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

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> "TaskDataset":
        """The same validated samples under another transform (e.g. eval-time preprocessing of
        the training split) without re-reading or re-validating anything."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

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
