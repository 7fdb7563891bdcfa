"""``sensitune plan``: turn a score file (or a preset) into a plan.json (+ .safetensors indices)."""
from __future__ import annotations

import argparse
from pathlib import Path


def planner_names() -> list[str]:
    """The planners a plan can be made with, from the methods (torch-free, for ``--help``): each
    method names its planner, and every registered planner is some method's."""
    from sensitune.methods import METHODS

    return list(dict.fromkeys(m.plan for m in METHODS.values()))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="allocate where and how to tune (SPT, GPS, top-k, presets) into plan.json",
        description="Build the backbone's shapes (random init: a plan needs shapes, not weights), read the "
                    "scores, allocate with --method and write plan.json (sparse indices go to plan.safetensors "
                    "beside it). Prints the plan's summary.")
    p.add_argument("--model", metavar="NAME", help="backbone name (default: the one recorded in --scores)")
    p.add_argument("--scores", metavar="FILE", help="score file from `sensitune score` (needed by spt-*, gps, topk-sparse)")
    p.add_argument("--method", required=True, help=", ".join(planner_names()))
    p.add_argument("--budget", metavar="N", help="400000, 0.4M, 400k or 0.5%% (share of the backbone, head excluded)")
    p.add_argument("--out", required=True, metavar="FILE", help="plan file to write (.json)")
    p.add_argument("--num-classes", type=int, metavar="C", help="head size (default: recorded in --scores)")
    p.add_argument("--img-size", type=int, metavar="PX", help="input resolution the model is built for (ViTs)")
    p.add_argument("--rank", type=int, help="rank of LoRA / adapter modules")
    p.add_argument("--K", type=int, dest="K", help="gps: entries per row")
    p.add_argument("--targets", metavar="REGEX", help="lora/adapter/adaptformer: module names to tune")
    p.add_argument("--slices", help="lora/adapter: split fused qkv, e.g. qkv or qv")
    p.add_argument("--bits", type=int, choices=(1, 2, 4, 8, 32), help="width of LoRA/adapter weights")
    p.add_argument("--scale", type=float, help="LoRA/AdaptFormer output scale s")
    p.add_argument("--head-bits", type=int, choices=(1, 2, 4, 8, 32), help="quantise the head's weight")
    p.add_argument("--no-head", action="store_true", help="keep the classification head frozen")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sensitune.models import create_backbone
    from sensitune.planning import make_plan

    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {out}")
    scores = None
    recorded: dict = {}
    if args.scores:
        from sensitune.scoring import ScoreMap

        scores = ScoreMap.load(args.scores)
        recorded = scores.meta.get("model") or {}
    name = args.model or recorded.get("name")
    if not name:
        raise ValueError("--model is required (the score file does not record one)")
    num_classes = args.num_classes or recorded.get("num_classes")
    if not num_classes:
        raise ValueError("--num-classes is required (the score file does not record the head size)")
    model = create_backbone(name, int(num_classes), "none", img_size=args.img_size)
    options = {k: getattr(args, k) for k in ("rank", "K", "targets", "slices", "bits", "scale")
               if getattr(args, k) is not None}
    if args.head_bits is not None:
        options["head_bits"] = args.head_bits
    if args.no_head:
        options["head"] = False
    try:
        plan = make_plan(model, scores, args.method, args.budget, **options)
    except ValueError as exc:
        if scores is not None and "shape" in str(exc):
            raise ValueError(f"{exc} — were the scores made with another --model/--img-size/--num-classes?") from exc
        raise
    plan.save(out)
    print(plan.summary())
    print(f"wrote {out}" + (f" and {out.with_suffix('.safetensors')}" if any(u.mode == "sparse" for u in plan.units) else ""))
    return 0
