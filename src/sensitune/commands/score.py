"""``sensitune score``: per-parameter scores of a backbone on a task, saved as safetensors."""
from __future__ import annotations

import argparse
from pathlib import Path


SCORER_NAMES = ("sensitivity", "gps", "fisher", "magnitude", "random")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="score where to tune (SPT sensitivity, GPS gradients, baselines) into a .safetensors file",
        description="Build the backbone with a fresh head for the task, score its tensors on the task's "
                    "training split (list order, no augmentation; GPS makes its own two views) and save a "
                    "ScoreMap. Under torchrun every process scores its share of the batches.")
    p.add_argument("--model", required=True, metavar="NAME", help="backbone name (timm, efficientnet_lite0, hf:...)")
    p.add_argument("--task", required=True, metavar="TASK", help="built-in task name or a task folder")
    # the scorers of sensitune.scoring.SCORERS, written out so --help imports no torch (a test keeps them equal)
    p.add_argument("--method", default="sensitivity", choices=SCORER_NAMES)
    p.add_argument("--out", required=True, metavar="FILE", help="scores file to write (.safetensors)")
    p.add_argument("--split", default="train", help="split to score on (default: train = train800)")
    p.add_argument("--pretrained", default="auto", metavar="auto|none|PATH")
    p.add_argument("--img-size", type=int, metavar="PX", help="input resolution")
    p.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    p.add_argument("--batches", type=int, help="batches to score (sensitivity default 16; gps default: all)")
    p.add_argument("--loss", choices=("supcon", "ce"), help="GPS loss (default supcon)")
    p.add_argument("--batchnorm", choices=("eval", "train"), default="eval",
                   help="BatchNorm mode while scoring (default eval: pretrained statistics, batch-independent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", metavar="DIR")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _device(name: str, local_rank: int):
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def _options(args: argparse.Namespace) -> dict:
    """The scorer's options from the flags: the always-present settings where the scorer takes
    them, and an explicitly given flag the scorer does not take refused (listing what it takes)."""
    from sensitune.scoring import get_scorer

    scorer = get_scorer(args.method)
    settings = {"seed": args.seed, "progress": not args.no_progress, "batchnorm": args.batchnorm,
                "num_workers": args.num_workers}
    options = {k: v for k, v in settings.items() if k in scorer.options}
    given = {k: getattr(args, k) for k in ("batch_size", "batches", "loss") if getattr(args, k) is not None}
    if args.method == "fisher" and "batches" in given:  # fisher scores single samples: --batches counts them
        given["samples"] = given.pop("batches")
    for key, value in given.items():
        if key not in scorer.options:
            flag = "--batches" if key == "samples" else "--" + key.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --method {args.method} (it takes: "
                             f"{', '.join(scorer.options)})")
        options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from sensitune.data import build_transform, open_task
    from sensitune.models import create_backbone, data_config
    from sensitune.scoring import score

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    options = _options(args)  # a flag the scorer does not take is refused before any work
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = _device(args.device, int(os.environ.get("LOCAL_RANK", 0)))

    probe = open_task(args.task, args.split, data_root=args.data_root, verify=False)
    model = create_backbone(args.model, probe.num_classes, args.pretrained, img_size=args.img_size).to(device)
    cfg = data_config(model, img_size=args.img_size)
    data = open_task(args.task, args.split, data_root=args.data_root,
                     transform=build_transform(cfg, train=False))
    scores = score(model, data, args.method, **options)
    scores.meta["task"] = {"name": data.name, "split": data.split}
    if rank == 0:
        scores.save(out)
        m = scores.meta
        print(f"{args.method} scores of {len(scores)} tensors ({scores.numel:,} entries) on {data.name}/{data.split}: "
              f"{m.get('samples', 0)} samples in {m.get('batches', 0)} batches"
              + (f", mean loss {m['mean_loss']:.4f}" if "mean_loss" in m else "") + f" -> {out}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
