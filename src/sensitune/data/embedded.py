"""The built-in mini suite: small real and rendered tasks that install with the package.

Written once into ``cache_dir()/mini/<task>/`` in the VTAB-1k layout (so the same reader
serves it), deterministic for a seed, grouped like VTAB. Sources ship inside PyPI packages,
so the suite builds offline (a few seconds on 2 CPU cores) — see ../shared/assets.md.

| task          | group       | classes | train800/val200/test | source                                                      |
|---------------|-------------|---------|----------------------|-------------------------------------------------------------|
| digits        | natural     | 10      | 800/200/797          | scikit-learn ``load_digits`` (8×8 scans, stored 64 px grey)  |
| textures      | natural     | 3       | 800/200/600          | scikit-image brick/grass/gravel photos: random 40–96 px tiles, resized to 64; train, val and test tiles come from disjoint bands of each photo |
| textile       | specialized | 3       | 800/200/1000         | ``conformal-clip-data`` simulated textile defects nominal/local/global (2000 photos, 250 px → 96 px grey); stratified, no photo in two splits |
| shapes_loc    | structured  | 16      | 800/200/1000         | rendered (procedural.py): 4×4 grid cell of a white ring      |
| shapes_ori    | structured  | 8       | 800/200/1000         | rendered: 45° heading bin of a white arrow                   |
| shapes_count  | structured  | 8       | 800/200/1000         | rendered: number of objects, 3..10                           |
| shapes_dist   | structured  | 6       | 800/200/1000         | rendered: distance bin between a red circle and a blue square |

LFW faces (200 images) are left out: too few for an 800/200 protocol.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from sensitune.data import procedural

SUITE_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_MINI_IMG_SIZE = 64


@dataclass(frozen=True)
class MiniTask:
    name: str
    group: str
    classes: int
    sizes: tuple[int, int, int]  # train800, val200, test
    source: str


TASKS: dict[str, MiniTask] = {t.name: t for t in [
    MiniTask("digits", "natural", 10, (800, 200, 797), "scikit-learn load_digits, 8x8 scans upscaled to 64 px"),
    MiniTask("textures", "natural", 3, (800, 200, 600), "scikit-image brick/grass/gravel, random tiles from disjoint bands"),
    MiniTask("textile", "specialized", 3, (800, 200, 1000), "conformal-clip-data simulated textile defects, 96 px"),
    MiniTask("shapes_loc", "structured", 16, (800, 200, 1000), "rendered: 4x4 grid cell of a white ring"),
    MiniTask("shapes_ori", "structured", 8, (800, 200, 1000), "rendered: 45 degree heading bin of a white arrow"),
    MiniTask("shapes_count", "structured", 8, (800, 200, 1000), "rendered: number of objects (3..10)"),
    MiniTask("shapes_dist", "structured", 6, (800, 200, 1000), "rendered: red circle to blue square distance bin"),
]}

MINI_SUITE: list[tuple[str, str]] = [(t.name, t.group) for t in TASKS.values()]

Split = list[tuple[Image.Image, int]]


def cache_dir() -> Path:
    """``$SENSITUNE_CACHE`` or ``~/.cache/sensitune``."""
    env = os.environ.get("SENSITUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sensitune"


def mini_root(seed: int = DEFAULT_SEED) -> Path:
    return cache_dir() / ("mini" if seed == DEFAULT_SEED else f"mini-seed{seed}")


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# ---------------------------------------------------------------------------- sources
def _digits(rng: np.random.Generator) -> tuple[list[str], dict[str, Split]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = rng.permutation(len(d.target))
    imgs = [(Image.fromarray((d.images[i] * (255.0 / 16.0)).round().astype(np.uint8), "L")
             .resize((64, 64), Image.Resampling.BICUBIC), int(d.target[i])) for i in order]
    return [str(k) for k in range(10)], {"train800": imgs[:800], "val200": imgs[800:1000], "test": imgs[1000:]}


def _textures(rng: np.random.Generator) -> tuple[list[str], dict[str, Split]]:
    import skimage.data

    names = ["brick", "grass", "gravel"]
    photos = [getattr(skimage.data, n)() for n in names]
    # Disjoint horizontal bands per photo, so no pixel of a test tile was seen in training.
    bands = {"train800": (0, 256), "val200": (256, 352), "test": (352, 512)}
    sizes = {"train800": 800, "val200": 200, "test": 600}
    out: dict[str, Split] = {}
    for split, n in sizes.items():
        lo, hi = bands[split]
        labels = rng.permutation(np.arange(n) % 3)
        items: Split = []
        for lab in labels:
            photo = photos[lab]
            side = int(rng.integers(40, 97))
            y = int(rng.integers(lo, hi - side + 1))
            x = int(rng.integers(0, photo.shape[1] - side + 1))
            tile = photo[y:y + side, x:x + side]
            tile = np.rot90(tile, int(rng.integers(4)))
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            # Mild photometric jitter: classes must be told apart by texture, not mean brightness.
            gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
            tile = np.clip(tile.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
            items.append((Image.fromarray(np.ascontiguousarray(tile), "L")
                          .resize((64, 64), Image.Resampling.BICUBIC), int(lab)))
        out[split] = items
    return names, out


def _textile(rng: np.random.Generator) -> tuple[list[str], dict[str, Split]]:
    import conformal_clip_data

    base = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    names = ["nominal", "local", "global"]
    out: dict[str, Split] = {"train800": [], "val200": [], "test": []}
    for lab, cls in enumerate(names):
        files = sorted((base / cls).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no textile images under {base / cls}: is conformal-clip-data installed?")
        files = [files[i] for i in rng.permutation(len(files))]
        n_train, n_val = (len(files) * 2) // 5, len(files) // 10  # 40 % / 10 % / 50 %: 800/200/1000 overall
        parts = {"train800": files[:n_train], "val200": files[n_train:n_train + n_val], "test": files[n_train + n_val:]}
        for split, fs in parts.items():
            for f in fs:
                with Image.open(f) as im:
                    im.draft("L", (125, 125))  # JPEG DCT-domain downscale: fast and deterministic
                    out[split].append((im.convert("L").resize((96, 96), Image.Resampling.BICUBIC), lab))
    for split in out:  # interleave classes
        out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
    return names, out


def _procedural(name: str) -> Callable[[np.random.Generator], tuple[list[str], dict[str, Split]]]:
    def build(rng: np.random.Generator) -> tuple[list[str], dict[str, Split]]:
        t = TASKS[name]
        splits = {s: procedural.render_split(name, rng, n) for s, n in zip(("train800", "val200", "test"), t.sizes)}
        return procedural.RENDERERS[name][1], splits
    return build


BUILDERS: dict[str, Callable[[np.random.Generator], tuple[list[str], dict[str, Split]]]] = {
    "digits": _digits, "textures": _textures, "textile": _textile,
    **{n: _procedural(n) for n in procedural.RENDERERS},
}


# ---------------------------------------------------------------------------- writing
def _write_task(name: str, seed: int, dest: Path) -> None:
    """Render the task into ``dest`` (a fresh temp folder) in the VTAB-1k layout."""
    classes, splits = BUILDERS[name](_rng(name, seed))
    t = TASKS[name]
    if len(classes) != t.classes:
        raise AssertionError(f"{name}: builder gave {len(classes)} classes, table says {t.classes}")
    lines: dict[str, list[str]] = {}
    for split, items in splits.items():
        folder = dest / "images" / split
        folder.mkdir(parents=True)
        lines[split] = []
        for i, (img, label) in enumerate(items):
            rel = f"images/{split}/{i:06d}.png"
            img.save(dest / rel, format="PNG", optimize=False, compress_level=6)
            lines[split].append(f"{rel} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (dest / f"{split}.txt").write_text("".join(ls), encoding="utf-8")
    (dest / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    meta = {"name": name, "group": t.group, "source": t.source, "seed": seed, "version": SUITE_VERSION,
            "classes": len(classes), "sizes": {s: len(ls) for s, ls in lines.items()}}
    (dest / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _is_current(folder: Path, seed: int) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("version") == SUITE_VERSION and meta.get("seed") == seed


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An advisory inter-process lock where the OS offers one (the rename below is the real guard)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize(name: str, *, seed: int = DEFAULT_SEED, root: Path | None = None) -> Path:
    """Return the folder of built-in task ``name``, building it first if needed.

    Built in a temp folder next to the target and renamed into place, under a file lock, so
    concurrent processes never see (or both write) a half-built task.
    """
    if name not in TASKS:
        raise KeyError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    root = Path(root) if root is not None else mini_root(seed)
    final = root / name
    if _is_current(final, seed):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        if _is_current(final, seed):  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            _write_task(name, seed, tmp)
            if _is_current(final, seed):  # no OS lock and another process won the race
                return final
            if final.exists():  # stale (older suite version or seed): replace it
                shutil.rmtree(final)
            try:
                os.replace(tmp, final)
            except OSError:
                if not _is_current(final, seed):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
