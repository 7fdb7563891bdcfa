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


def test_classes_are_the_training_labels_and_every_split_agrees(vtab_task: Path):
    counts = {s: open_task(vtab_task, s).num_classes for s in ("train800", "val200", "train800val200", "test")}
    assert set(counts.values()) == {3}
    assert open_task(vtab_task, "val200").class_names == ["0", "1", "2"]
    # a label no training image has is out of range in any other split
    (vtab_task / "test.txt").write_text("images/test/000000.png 3\n")
    with pytest.raises(TaskDataError, match=r"test\.txt:1: label 3 is out of range: the training split has 3 classes"):
        open_task(vtab_task, "test")


def test_a_stray_label_is_refused_listing_the_labels_found(vtab_task: Path):
    """One stray 99 in a 3-class task must not make a 100-way head (no classes.txt)."""
    with open(vtab_task / "train800.txt", "a") as fh:
        fh.write("images/train800/000001.png 99\n")
    for split in ("train800", "test"):  # every split depends on the task's classes
        with pytest.raises(TaskDataError) as err:
            open_task(vtab_task, split)
        msg = str(err.value)
        assert "train800.txt has labels 0-2, 99 (4 distinct), so labels 3-98 have no training image" in msg
        assert "train800.txt:4: label 99 lies above label 3, which no training image has" in msg  # the line to fix
        assert "classes.txt" in msg
    # declaring the classes is the way to keep a sparse label set
    (vtab_task / "classes.txt").write_text("".join(f"c{i}\n" for i in range(100)))
    assert open_task(vtab_task, "train800").num_classes == 100


def test_a_class_missing_from_one_training_list_is_refused(vtab_task: Path):
    # label 2 only in train800val200 (via val200): protocol val would train without it
    (vtab_task / "train800.txt").write_text("images/train800/000000.png 0\nimages/train800/000001.png 1\n")
    (vtab_task / "train800val200.txt").write_text("images/train800/000000.png 0\nimages/val200/000000.png 2\n"
                                                 "images/train800/000001.png 1\n")
    with pytest.raises(TaskDataError, match=r"train800\.txt: .*has labels 0-1 \(2 distinct\), so label 2 has no "
                                            r"training image"):
        open_task(vtab_task, "val200")


def test_a_vtab_task_name_gets_its_class_count_in_the_hint(tmp_path: Path, make_vtab):
    root = make_vtab(tmp_path / "sun397", {"train800": [(1, 0), (2, 5)], "test": [(3, 1)]})
    with pytest.raises(TaskDataError, match=r"VTAB-1k's sun397 has 397 classes \(a classes.txt of 397 lines"):
        open_task(root, "train800")


def test_every_bad_line_of_a_split_is_reported_together(vtab_task: Path, make_image):
    (vtab_task / "images" / "train800" / "000002.png").write_bytes(b"not a png")
    with open(vtab_task / "train800.txt", "a") as fh:
        fh.write("no-label-here\n"  # line 4
                 "images/train800/000000.png x\n"  # line 5
                 "images/train800/missing.png 1\n"  # line 6
                 "../escape.png 0\n"  # line 7
                 "images/train800/000001.png -2\n")  # line 8
    with pytest.raises(TaskDataError) as err:
        open_task(vtab_task, "train800")
    msg = str(err.value)
    assert msg.startswith("6 problems in split train800 of task toy:")
    lines = msg.splitlines()[1:]
    expected = [(3, "000002.png is not a readable image"), (4, "cannot parse 'no-label-here'"),
                (5, "label 'x' is not an integer"), (6, "missing.png does not exist"),
                (7, "leads outside the task folder"), (8, "label -2 is negative")]
    assert len(lines) == len(expected)
    for line, (no, what) in zip(lines, expected):  # in file order, each with file and line
        assert f"train800.txt:{no}: " in line and what in line, line
    assert [p.line for p in err.value.problems] == [3, 4, 5, 6, 7, 8]
    assert err.value.file == vtab_task / "train800.txt" and err.value.line == 3


def test_many_images_are_decoded_in_a_pool_and_all_bad_ones_reported(tmp_path: Path, make_vtab):
    root = make_vtab(tmp_path / "big", {"train800": [(i, i % 2) for i in range(80)]})
    for i in (5, 41, 77):
        path = root / "images" / "train800" / f"{i:06d}.png"
        path.write_bytes(path.read_bytes()[:40])  # cut inside the image data
    with pytest.raises(TaskDataError) as err:
        open_task(root, "train800")
    assert [p.line for p in err.value.problems] == [6, 42, 78]
    assert len(open_task(root, "train800", verify=False)) == 80


def test_an_image_broken_after_a_successful_open_is_caught_on_the_next_open(vtab_task: Path):
    """Images decoded once are remembered by (path, size, mtime): a changed file is decoded again."""
    assert len(open_task(vtab_task, "val200")) == 1
    path = vtab_task / "images" / "val200" / "000000.png"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(TaskDataError, match=r"val200\.txt:1: image .*000000\.png is not a readable image"):
        open_task(vtab_task, "val200")


def test_an_empty_split_is_refused(vtab_task: Path):
    (vtab_task / "val200.txt").write_text("# nothing here\n\n")
    with pytest.raises(TaskDataError, match=r"val200\.txt: val200\.txt lists no samples: the split is empty"):
        open_task(vtab_task, "val200")


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
    (vtab_task / "classes.txt").write_text("a\nb\n")  # test.txt:1 uses label 2
    with pytest.raises(TaskDataError, match=r"test\.txt:1: label 2 is out of range: classes.txt declares 2 classes"):
        open_task(vtab_task, "test")
    (vtab_task / "classes.txt").write_text("a\nb\nc\nd\n")  # a declared class may lack training images
    assert open_task(vtab_task, "train800").num_classes == 4


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


def test_truncated_jpeg_is_caught_when_opened(vtab_task: Path):
    # a cut-off JPEG keeps an intact header: only decoding every pixel finds it
    path = vtab_task / "images" / "test" / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:
        im.verify()  # the header check alone passes
    (vtab_task / "test.txt").write_text("images/test/000000.png 0\nimages/test/cut.jpg 0\n")
    with pytest.raises(TaskDataError, match=r"test\.txt:2: image .*cut\.jpg is not a readable image .*truncated"):
        open_task(vtab_task, "test")
    assert len(open_task(vtab_task, "test", verify=False)) == 2  # paths and labels alone are fine


def test_image_that_breaks_after_opening_fails_clearly_in_getitem(vtab_task: Path):
    ds = open_task(vtab_task, "train800")
    ds.samples[0][0].write_bytes(b"not an image any more")
    with pytest.raises(TaskDataError, match=r"cannot decode image .*000000\.png \(sample 0 of toy/train800\)"):
        ds[0]


def test_transform_is_applied(vtab_task: Path):
    ds = open_task(vtab_task, "test", transform=lambda im: np.asarray(im).mean())
    value, label = ds[0]
    assert value == pytest.approx(50.0) and label == 2


def test_with_transform_shares_samples_not_transform(vtab_task: Path):
    ds = open_task(vtab_task, "test")
    mean = ds.with_transform(lambda im: float(np.asarray(im).mean()))
    assert mean.samples is ds.samples and mean.num_classes == ds.num_classes
    assert mean[1] == (pytest.approx(60.0), 0)
    assert ds.transform is None and ds[1][0].size == (8, 8)
