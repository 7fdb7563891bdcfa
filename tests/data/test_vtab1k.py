"""The VTAB-1k reader on a layout the test writes, and every kind of bad input it must reject early."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sensitune.data import TaskDataError, open_task


def test_reads_samples_labels_and_pixels(vtab_task: Path):
    ds = open_task(vtab_task, "train800")
    assert len(ds) == 3 and ds.split == "train800" and ds.name == "toy" and ds.root == vtab_task
    assert [label for _, label in ds.samples] == [0, 1, 2]
    image, label = ds[1]
    assert image.mode == "RGB" and image.size == (8, 8) and label == 1
    assert np.asarray(image)[0, 0, 0] == 20  # the pixel value written for that line
    assert ds.group is None  # an unknown folder name has no VTAB group


def test_num_classes_is_max_label_over_all_lists_and_same_for_every_split(vtab_task: Path):
    # label 4 only occurs in test.txt, yet train800 must agree on 5 classes
    counts = {s: open_task(vtab_task, s).num_classes for s in ("train800", "val200", "train800val200", "test")}
    assert set(counts.values()) == {5}
    assert open_task(vtab_task, "val200").class_names == ["0", "1", "2", "3", "4"]


def test_classes_txt_declares_count_and_names(tmp_path: Path, make_vtab):
    root = make_vtab(tmp_path / "eurosat", {"train800": [(1, 0), (2, 2)], "test": [(3, 1)]}, ["a", "b", "c", "d"])
    ds = open_task(root, "train800")
    assert ds.num_classes == 4 and ds.class_names == ["a", "b", "c", "d"]
    assert ds.group == "specialized"  # known VTAB folder name


def test_split_aliases_and_unknown_split(vtab_task: Path):
    assert open_task(vtab_task, "trainval").split == "train800val200"
    assert len(open_task(vtab_task, "val")) == 1
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        open_task(vtab_task, "dev")


def test_data_root_lookup_by_name(vtab_task: Path):
    ds = open_task("toy", "test", data_root=vtab_task.parent)
    assert len(ds) == 2 and ds.root == vtab_task


def test_unknown_task_names_builtin_tasks(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a built-in task.*digits"):
        open_task("no_such_task", "test", data_root=tmp_path)


def test_missing_list_file(vtab_task: Path):
    (vtab_task / "val200.txt").unlink()
    with pytest.raises(TaskDataError, match=r"val200\.txt.*list file is missing"):
        open_task(vtab_task, "val200")


def test_all_list_files_missing_is_not_mistaken_for_class_folders(vtab_task: Path):
    for s in ("train800", "val200", "train800val200", "test"):
        (vtab_task / f"{s}.txt").unlink()
    with pytest.raises(TaskDataError, match="looks like a VTAB-1k task .* no list file"):
        open_task(vtab_task, "test")


def test_unparsable_line_names_file_and_line(vtab_task: Path):
    with open(vtab_task / "train800.txt", "a") as fh:
        fh.write("\n# a comment\nimages/train800/000000.png\n")
    with pytest.raises(TaskDataError, match=r"train800\.txt:6: cannot parse") as err:
        open_task(vtab_task, "train800")
    assert err.value.line == 6 and err.value.file == vtab_task / "train800.txt"


def test_non_integer_label(vtab_task: Path):
    (vtab_task / "test.txt").write_text("images/test/000000.png 4\nimages/test/000001.png cat\n")
    with pytest.raises(TaskDataError, match=r"test\.txt:2: .*label 'cat' is not an integer"):
        open_task(vtab_task, "test")


def test_negative_label(vtab_task: Path):
    (vtab_task / "val200.txt").write_text("images/val200/000000.png -1\n")
    with pytest.raises(TaskDataError, match=r"val200\.txt:1: label -1 is negative"):
        open_task(vtab_task, "val200")


def test_label_at_or_above_declared_class_count(vtab_task: Path):
    (vtab_task / "classes.txt").write_text("a\nb\nc\nd\n")  # test.txt uses label 4
    with pytest.raises(TaskDataError, match=r"test\.txt:1: label 4 is out of range.*4 classes"):
        open_task(vtab_task, "test")
    assert len(open_task(vtab_task, "train800")) == 3  # the other splits are fine


def test_parent_escape_path(vtab_task: Path, make_image):
    make_image(vtab_task.parent / "outside.png")
    (vtab_task / "val200.txt").write_text("../outside.png 0\n")
    with pytest.raises(TaskDataError, match=r"val200\.txt:1: image path '\.\./outside\.png' leads outside"):
        open_task(vtab_task, "val200")


def test_absolute_path(vtab_task: Path, make_image):
    target = make_image(vtab_task.parent / "abs.png")
    (vtab_task / "val200.txt").write_text(f"{target} 0\n")
    with pytest.raises(TaskDataError, match=r"val200\.txt:1: .* is absolute"):
        open_task(vtab_task, "val200")


def test_symlink_pointing_out(vtab_task: Path, make_image):
    target = make_image(vtab_task.parent / "secret.png")
    os.symlink(target, vtab_task / "images" / "link.png")
    (vtab_task / "val200.txt").write_text("images/link.png 0\n")
    with pytest.raises(TaskDataError, match=r"val200\.txt:1: .*symlink pointing outside"):
        open_task(vtab_task, "val200")


def test_symlink_inside_the_task_is_fine(vtab_task: Path):
    os.symlink(vtab_task / "images" / "val200" / "000000.png", vtab_task / "images" / "alias.png")
    (vtab_task / "val200.txt").write_text("images/alias.png 0\n")
    assert len(open_task(vtab_task, "val200")) == 1


def test_missing_image(vtab_task: Path):
    (vtab_task / "images" / "test" / "000001.png").unlink()
    with pytest.raises(TaskDataError, match=r"test\.txt:2: image .*000001\.png does not exist"):
        open_task(vtab_task, "test")


def test_corrupt_image_is_caught_when_opened(vtab_task: Path):
    (vtab_task / "images" / "train800" / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not chunks")
    with pytest.raises(TaskDataError, match=r"train800\.txt:3: image .*000002\.png is not a readable image"):
        open_task(vtab_task, "train800")


def test_truncated_png_is_caught_when_opened(vtab_task: Path):
    path = vtab_task / "images" / "test" / "000000.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskDataError, match=r"test\.txt:1: image .*000000\.png is not a readable image"):
        open_task(vtab_task, "test")


def test_truncated_jpeg_passes_header_check_but_fails_clearly_when_loaded(vtab_task: Path):
    # JPEG headers verify without decoding, so a cut-off JPEG is only caught when decoded.
    path = vtab_task / "images" / "test" / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (vtab_task / "test.txt").write_text("images/test/cut.jpg 0\n")
    ds = open_task(vtab_task, "test")
    with pytest.raises(TaskDataError, match=r"cannot decode image .*cut\.jpg \(sample 0 of toy/test\).*truncated"):
        ds[0]


def test_image_that_breaks_after_opening_fails_clearly_in_getitem(vtab_task: Path):
    ds = open_task(vtab_task, "train800")
    ds.samples[0][0].write_bytes(b"not an image any more")
    with pytest.raises(TaskDataError, match=r"cannot decode image .*000000\.png \(sample 0 of toy/train800\)"):
        ds[0]


def test_transform_is_applied(vtab_task: Path):
    ds = open_task(vtab_task, "test", transform=lambda im: np.asarray(im).mean())
    value, label = ds[0]
    assert value == pytest.approx(50.0) and label == 4


def test_with_transform_shares_samples_not_transform(vtab_task: Path):
    ds = open_task(vtab_task, "test")
    mean = ds.with_transform(lambda im: float(np.asarray(im).mean()))
    assert mean.samples is ds.samples and mean.num_classes == ds.num_classes
    assert mean[1] == (pytest.approx(60.0), 0)
    assert ds.transform is None and ds[1][0].size == (8, 8)
