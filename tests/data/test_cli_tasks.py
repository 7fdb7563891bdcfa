"""``sensitune tasks``: built-in tasks plus the folders found under --data-root."""
from __future__ import annotations

import json
from pathlib import Path

from sensitune.cli import main
from sensitune.data import MINI_SUITE


def _root(tmp_path: Path, make_vtab, make_image) -> Path:
    root = tmp_path / "vtab"
    make_vtab(root / "dtd", {"train800": [(1, 0), (2, 3), (4, 1), (5, 2)], "test": [(3, 1)]})
    make_vtab(root / "gappy", {"train800": [(1, 0), (2, 3)], "test": [(3, 1)]})  # labels 1, 2 never trained
    make_image(root / "flowers" / "train" / "rose" / "a.jpg")
    make_image(root / "flowers" / "test" / "tulip" / "b.jpg")
    (root / "cub").mkdir()
    (root / "cub" / "test.json").write_text(json.dumps({"x.jpg": 5, "y.jpg": 7}))
    make_vtab(root / "broken", {"test": [(1, 0)]})
    (root / "broken" / "test.txt").write_text("images/test/000000.png zero\n")
    (root / "notes").mkdir()
    (root / "notes" / "README").write_text("not a task")
    return root


def test_table_lists_builtin_and_found_tasks(tmp_path, capsys, make_vtab, make_image):
    root = _root(tmp_path, make_vtab, make_image)
    assert main(["tasks", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name, group in MINI_SUITE:
        assert "built-in" in lines[name] and group in lines[name]
    assert lines["dtd"].split()[1:5] == ["found", "natural", "vtab1k", "4"] and "train800=4 test=1" in lines["dtd"]
    assert "ERROR" in lines["gappy"] and "labels 1-2 have no training image" in lines["gappy"]
    assert len(lines["gappy"].splitlines()) == 1
    assert lines["flowers"].split()[3:5] == ["folder", "2"] and "train=1 test=1" in lines["flowers"]
    assert lines["cub"].split()[3:5] == ["fgvc", "2"] and "test=2" in lines["cub"]
    assert "ERROR" in lines["broken"] and "test.txt:1" in lines["broken"]
    assert "notes" not in lines


def test_json_output(tmp_path, capsys, make_vtab, make_image):
    root = _root(tmp_path, make_vtab, make_image)
    assert main(["tasks", "--data-root", str(root), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out) if not r["builtin"]}
    assert rows["dtd"]["sizes"] == {"train800": 4, "test": 1} and rows["dtd"]["classes"] == 4
    assert set(rows) == {"dtd", "gappy", "flowers", "cub", "broken"}
    assert "train800.txt has labels 0, 3 (2 distinct)" in rows["gappy"]["error"]


def test_missing_data_root_is_a_user_error(tmp_path, capsys):
    assert main(["tasks", "--data-root", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
