"""Plain class folders, with and without split folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sensitune.data import TaskDataError, open_task


@pytest.fixture
def folders(tmp_path: Path, make_image) -> Path:
    root = tmp_path / "pets"
    make_image(root / "train" / "cat" / "1.jpg")
    make_image(root / "train" / "dog" / "2.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image extension: ignored")
    make_image(root / "val" / "cat" / "3.jpg")
    make_image(root / "test" / "emu" / "4.jpg")  # a class only test has
    make_image(root / "test" / "dog" / "5.JPG")
    return root


def test_split_folders_share_the_class_union(folders: Path):
    train = open_task(folders, "train")
    assert train.class_names == ["cat", "dog", "emu"] and train.num_classes == 3
    assert [(p.name, y) for p, y in train.samples] == [("1.jpg", 0), ("2.png", 1)]
    test = open_task(folders, "test")
    assert sorted((p.name, y) for p, y in test.samples) == [("4.jpg", 2), ("5.JPG", 1)]
    assert len(open_task(folders, "trainval")) == 3 == len(open_task(folders, "train800val200"))


def test_unknown_split_lists_available(folders: Path):
    with pytest.raises(ValueError, match="split 'all' not found.*train, val, test, trainval"):
        open_task(folders, "all")


def test_class_folders_without_splits(tmp_path: Path, make_image):
    root = tmp_path / "plain"
    make_image(root / "b" / "x.jpg")
    make_image(root / "a" / "sub" / "y.jpg")  # nested files belong to their top class folder
    ds = open_task(root, "all")
    assert ds.class_names == ["a", "b"] and sorted(y for _, y in ds.samples) == [0, 1]


def test_symlinked_file_pointing_out(folders: Path, make_image):
    os.symlink(make_image(folders.parent / "elsewhere.jpg"), folders / "val" / "cat" / "link.jpg")
    with pytest.raises(TaskDataError, match=r"cat \[link\.jpg\]: .*symlink pointing outside"):
        open_task(folders, "val")


def test_corrupt_file(folders: Path):
    (folders / "test" / "dog" / "5.JPG").write_bytes(b"nope")
    with pytest.raises(TaskDataError, match=r"5\.JPG is not a readable image"):
        open_task(folders, "test")


def test_no_layout(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(TaskDataError, match="no task layout recognised"):
        open_task(tmp_path / "empty", "test")
