"""VPT's FGVC JSON layout: image root detection, id remapping, trainval, and bad JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sensitune.data import TaskDataError, open_task


@pytest.fixture
def cub(tmp_path: Path, make_image) -> Path:
    root = tmp_path / "CUB_200_2011"
    # CUB-style 1-based class ids, images under images/<class folder>/
    splits = {
        "train": {"001.A/a1.jpg": 1, "002.B/b1.jpg": 2, "003.C/c0.jpg": 3},
        "val": {"001.A/a2.jpg": 1},
        "test": {"003.C/c1.jpg": 3, "002.B/b2.jpg": 2},
    }
    for split, mapping in splits.items():
        for rel in mapping:
            make_image(root / "images" / rel)
        (root / f"{split}.json").write_text(json.dumps(mapping))
    return root


def test_reads_json_remaps_ids_and_finds_image_root(cub: Path):
    ds = open_task(cub, "train")
    assert ds.num_classes == 3 and ds.class_names == ["1", "2", "3"]
    assert [(p.relative_to(cub).as_posix(), y) for p, y in ds.samples] == [("images/001.A/a1.jpg", 0),
                                                                           ("images/002.B/b1.jpg", 1),
                                                                           ("images/003.C/c0.jpg", 2)]
    image, label = ds[0]
    assert image.mode == "RGB" and label == 0


def test_trainval_is_train_plus_val_and_aliases(cub: Path):
    tv = open_task(cub, "trainval")
    assert len(tv) == 4 and tv.split == "trainval"
    assert [y for _, y in tv.samples] == [0, 1, 2, 0]
    assert len(open_task(cub, "train800val200")) == 4
    assert open_task(cub, "test").num_classes == open_task(cub, "val").num_classes == 3


def test_images_beside_json(tmp_path: Path, make_image):
    root = tmp_path / "oxfordflower"
    make_image(root / "jpg" / "x.jpg")
    (root / "test.json").write_text(json.dumps({"jpg/x.jpg": 0}))
    assert open_task(root, "test").samples[0][0] == root / "jpg" / "x.jpg"


def test_non_integer_class_id_names_file_and_key(cub: Path):
    (cub / "val.json").write_text(json.dumps({"001.A/a2.jpg": "one"}))
    with pytest.raises(TaskDataError, match=r"val\.json \[001\.A/a2\.jpg\]: class id 'one' is not an integer"):
        open_task(cub, "val")


def test_invalid_json_names_line(cub: Path):
    (cub / "test.json").write_text('{\n"a.jpg": 1,\n oops\n}')
    with pytest.raises(TaskDataError, match=r"test\.json:3: not valid JSON"):
        open_task(cub, "test")


def test_missing_split_file(cub: Path):
    (cub / "val.json").unlink()
    with pytest.raises(TaskDataError, match=r"val\.json.*split file is missing"):
        open_task(cub, "trainval")


def test_escape_and_missing_image(cub: Path):
    (cub / "val.json").write_text(json.dumps({"../../x.jpg": 1}))
    with pytest.raises(TaskDataError, match=r"val\.json \[\.\./\.\./x\.jpg\]: .*outside"):
        open_task(cub, "val")
    (cub / "val.json").write_text(json.dumps({"001.A/zz.jpg": 1}))
    with pytest.raises(TaskDataError, match=r"zz\.jpg does not exist"):
        open_task(cub, "val")


def test_classes_txt_takes_ids_as_labels(cub: Path):
    (cub / "classes.txt").write_text("a\nb\nc\n")  # ids 1..3 are now labels; 3 is out of range
    (cub / "train.json").write_text(json.dumps({"001.A/a1.jpg": 1, "002.B/b1.jpg": 2}))
    assert [y for _, y in open_task(cub, "train").samples] == [1, 2]
    with pytest.raises(TaskDataError, match=r"test\.json \[003\.C/c1\.jpg\]: label 3 is out of range"):
        open_task(cub, "test")


def test_a_class_id_missing_from_train_is_refused(cub: Path):
    """Without classes.txt a class no training image has would be silently added to the head."""
    (cub / "train.json").write_text(json.dumps({"001.A/a1.jpg": 1, "002.B/b1.jpg": 2}))
    with pytest.raises(TaskDataError) as err:
        open_task(cub, "train")
    msg = str(err.value)
    assert "train.json: without classes.txt every class id must occur in train.json; it has ids 1-2" in msg
    assert "the other splits also use 3" in msg and "test.json [003.C/c1.jpg]: class id 3 does not occur" in msg
    (cub / "classes.txt").write_text("a\nb\nc\nd\n")
    assert open_task(cub, "test").num_classes == 4


def test_every_bad_entry_is_reported_together_and_an_empty_split_refused(cub: Path):
    (cub / "val.json").write_text(json.dumps({"001.A/a2.jpg": "one", "001.A/zz.jpg": 1, "../x.jpg": 2}))
    with pytest.raises(TaskDataError) as err:
        open_task(cub, "val")
    assert [str(p.line) for p in err.value.problems] == ["001.A/a2.jpg", "001.A/zz.jpg", "../x.jpg"] or \
        sorted(str(p.line) for p in err.value.problems) == ["../x.jpg", "001.A/a2.jpg", "001.A/zz.jpg"]
    assert str(err.value).startswith("3 problems in split val of task CUB_200_2011:")
    (cub / "val.json").write_text("{}")
    with pytest.raises(TaskDataError, match=r"split 'val' holds no images: the split is empty"):
        open_task(cub, "val")
