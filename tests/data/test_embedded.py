"""The built-in mini suite: sizes, disjoint splits, balance, determinism, safe concurrent builds,
and labels re-derived independently from the rendered pixels."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sensitune.data import MINI_SUITE, cache_dir, list_tasks, open_task
from sensitune.data.embedded import TASKS, materialize
from sensitune.data.procedural import DIST_EDGES

SPLITS = ("train800", "val200", "train800val200", "test")


@pytest.fixture(scope="module")
def suite() -> dict[str, Path]:
    return {name: materialize(name) for name, _ in MINI_SUITE}


def _pixels(ds) -> list[np.ndarray]:
    return [np.asarray(ds.load_image(i)) for i in range(len(ds))]


def test_suite_covers_the_three_vtab_groups():
    # holds under any SENSITUNE_CACHE: where the suite is built is test_cache_dir_follows_env's business
    assert len(MINI_SUITE) >= 6
    assert {g for _, g in MINI_SUITE} == {"natural", "specialized", "structured"}
    assert MINI_SUITE == [(t.name, t.group) for t in TASKS.values()]


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSITUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SENSITUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sensitune"


@pytest.mark.parametrize("name", list(TASKS))
def test_sizes_classes_and_listing_match_the_table(suite, name):
    t = TASKS[name]
    folder = suite[name]
    assert folder.parent == cache_dir() / "mini"
    sets = {s: open_task(name, s) for s in SPLITS}
    n_train, n_val, n_test = t.sizes
    assert [len(sets[s]) for s in SPLITS] == [n_train, n_val, n_train + n_val, n_test]
    assert n_train == 800 and n_val == 200 and n_test >= 500
    assert {d.num_classes for d in sets.values()} == {t.classes}
    assert all(d.group == t.group and d.name == name for d in sets.values())
    assert len((folder / "classes.txt").read_text().splitlines()) == t.classes
    assert sets["train800val200"].samples == sets["train800"].samples + sets["val200"].samples
    listed = next(r for r in list_tasks() if r["name"] == name and r["builtin"])
    assert listed["built"] and listed["classes"] == t.classes
    assert listed["sizes"] == {s: len(sets[s]) for s in SPLITS}
    assert json.loads((folder / "meta.json").read_text())["sizes"] == listed["sizes"]
    image, label = sets["test"][0]
    assert image.mode == "RGB" and 64 <= image.size[0] <= 96 and 0 <= label < t.classes


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_and_roughly_balanced(suite, name):
    hashes = {}
    for s in ("train800", "val200", "test"):
        ds = open_task(name, s, verify=False)
        hashes[s] = {hashlib.sha1(a.tobytes()).hexdigest() for a in _pixels(ds)}
        assert len(hashes[s]) == len(ds)  # no duplicate image inside a split either
        counts = collections.Counter(ds.targets)
        assert set(counts) == set(range(ds.num_classes))
        if name == "textile":  # 1000/500/500 nominal/local/global, split 40/10/50 % per class
            assert [counts[c] / len(ds) for c in range(3)] == [0.5, 0.25, 0.25]
        else:
            mean = len(ds) / ds.num_classes
            assert 0.5 * mean <= min(counts.values()) and max(counts.values()) <= 1.5 * mean
    assert not hashes["train800"] & hashes["val200"]
    assert not hashes["train800"] & hashes["test"]
    assert not hashes["val200"] & hashes["test"]


@pytest.mark.parametrize("name", ["digits", "textures", "shapes_dist"])
def test_same_seed_same_bytes_other_seed_other_bytes(suite, tmp_path, name):
    again = materialize(name, seed=0, root=tmp_path / "a")
    files = sorted(p.relative_to(suite[name]) for p in suite[name].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((suite[name] / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = materialize(name, seed=1, root=tmp_path / "b")
    assert (other / "train800.txt").read_text() != (again / "train800.txt").read_text() or any(
        (other / f).read_bytes() != (again / f).read_bytes() for f in files if f.suffix == ".png")


def test_concurrent_builds_do_not_collide(tmp_path):
    code = ("import sys; from pathlib import Path; from sensitune.data.embedded import materialize;"
            "print(materialize('shapes_dist', root=Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / "shapes_dist")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["shapes_dist"]
    assert len(open_task(tmp_path / "shapes_dist", "test")) == 1000


def test_unknown_builtin_name():
    with pytest.raises(KeyError, match="unknown built-in task 'cifar'"):
        materialize("cifar")


# --- labels re-derived from pixels, independently of the renderer ------------------------------
def _white(a: np.ndarray) -> np.ndarray:
    return (a > 215).all(axis=2)


def test_loc_label_is_grid_cell_of_the_white_ring(suite):
    ds = open_task("shapes_loc", "val200", verify=False)
    clear = 0
    for a, label in zip(_pixels(ds), ds.targets):
        ys, xs = np.nonzero(_white(a))
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel i covers [i, i + 1)
        if min(abs(cy - 16 * round(cy / 16)), abs(cx - 16 * round(cx / 16))) < 1:
            continue  # centre within a pixel of a cell edge: either cell is a fair reading
        clear += 1
        assert int(cy // 16) * 4 + int(cx // 16) == label
    assert clear >= 0.8 * len(ds)


def test_ori_label_is_heading_bin_of_the_white_arrow(suite):
    ds = open_task("shapes_ori", "val200", verify=False)
    clear = 0
    for a, label in zip(_pixels(ds), ds.targets):
        ys, xs = np.nonzero(_white(a))
        cy, cx = ys.mean(), xs.mean()
        far = np.argmax((ys - cy) ** 2 + (xs - cx) ** 2)  # the tip: farthest from the centroid
        heading = math.degrees(math.atan2(-(ys[far] - cy), xs[far] - cx)) % 360
        if min(heading % 45, 45 - heading % 45) < 2:
            continue  # within 2 degrees of a bin edge: pixel rounding may read either bin
        clear += 1
        assert int(heading // 45) == label, (heading, label)
    assert clear >= 0.85 * len(ds)  # 181 of 200 at seed 0


def test_count_label_is_number_of_objects(suite):
    ds = open_task("shapes_count", "val200", verify=False)
    hits = 0
    for a, label in zip(_pixels(ds), ds.targets):
        a = a.astype(int)
        bg = np.median(a.reshape(-1, 3), axis=0)  # the flat background covers most pixels
        components, _ = ndimage.label(np.abs(a - bg).sum(axis=2) > 30)
        sizes = np.bincount(components.ravel())[1:]
        hits += int((sizes >= 4).sum()) == label + 3  # ignore stray anti-aliased corner pixels
    assert hits >= 0.95 * len(ds)


def test_dist_label_is_bin_of_red_to_blue_distance(suite):
    ds = open_task("shapes_dist", "val200", verify=False)
    hits = 0
    for a, label in zip(_pixels(ds), ds.targets):
        a = a.astype(int)
        red = (a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 90)
        blue = (a[..., 2] > 190) & (a[..., 0] < 90) & (a[..., 1] < 120)
        (ry, rx), (by, bx) = [np.argwhere(m).mean(axis=0) for m in (red, blue)]
        d = math.hypot(ry - by, rx - bx)
        hits += DIST_EDGES[label] - 1 <= d <= DIST_EDGES[label + 1] + 1
    assert hits >= 0.95 * len(ds)
