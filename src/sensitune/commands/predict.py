"""``sensitune predict --delta DIR image.jpg [...]``: top-k classes of images under a task delta.

The base model is rebuilt from what the delta recorded (backbone name, pretrained source, image
size), the delta is loaded onto it (fingerprint checked), and each image is preprocessed with the
delta's recorded data config — the same preprocessing the task was evaluated with.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sensitune.cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images with a task delta (top-k classes and probabilities)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files (anything Pillow opens)")
    p.add_argument("--delta", required=True, help="a delta folder (delta.json + delta.safetensors) or a run folder")
    p.add_argument("--top", type=int, default=5, help="how many classes to print per image (default 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument("--force", action="store_true", help="load even if the base weights' fingerprint differs")
    p.set_defaults(func=run)


def _open_images(paths: list[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise CLIError(f"{path}: not a readable image ({exc})") from None
    return images


def run(args: argparse.Namespace) -> int:
    import torch

    from sensitune.artifacts import load_delta, predict_topk, read_delta, resolve_delta_dir

    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    from sensitune.commands._checks import refuse_non_finite_delta

    folder = resolve_delta_dir(args.delta)
    delta = read_delta(folder)
    refuse_non_finite_delta(delta, folder)
    images = _open_images(args.images)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_delta(None, folder, force=args.force).to(device).eval()
    results = predict_topk(model, images, delta, k=args.top, batch_size=args.batch_size)
    for path, top in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "index": i, "prob": p} for i, c, p in top]}))
            continue
        print(path)
        for rank, (index, name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<30} {prob:7.2%}  (class {index})")
    return 0
