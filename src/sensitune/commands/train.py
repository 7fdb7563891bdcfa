"""``sensitune train``: score -> plan -> apply -> train -> evaluate -> save, into one run folder."""
from __future__ import annotations

import argparse
import json
import os

import yaml


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a model or reads a task."""
    p.add_argument("--model", required=True, metavar="NAME", help="backbone name (timm, efficientnet_lite0, hf:...)")
    p.add_argument("--task", required=True, metavar="TASK", help="built-in task name or a task folder (VTAB-1k layout)")
    p.add_argument("--pretrained", metavar="auto|none|PATH",
                   help="auto = the model's real weights where they can be had, none = random init, or a checkpoint")
    p.add_argument("--img-size", type=int, metavar="PX", help="input resolution (built-in tasks: 64)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (split across processes under torchrun)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the method's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--data-root", metavar="DIR", help="folder holding task folders")


def register(subparsers) -> None:
    from sensitune.methods import describe

    p = subparsers.add_parser(
        "train", help="train one method on one task into a run folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score (if the method needs scores), plan, apply, train, evaluate and save a task delta.\n"
                    "Settings: defaults <- method defaults <- --config <- flags (and --set KEY=VALUE).\n\n"
                    "methods:\n" + describe())
    add_model_options(p)
    p.add_argument("--method", required=True, help="one of the methods listed above")
    p.add_argument("--budget", help="trainable parameters for budgeted methods: 400000, 0.4M, 400k or 0.5%%")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to create")
    p.add_argument("--config", metavar="FILE", help="YAML file of settings, or a recipe name: paper, mini")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="discard the run in --out and start again")
    p.add_argument("--protocol", choices=("val", "final"),
                   help="val: train800 -> val200 (default, for selection); final: train800val200 -> test")
    p.add_argument("--eval-split", help="evaluate on this split instead of the protocol's")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--drop-path", type=float)
    p.add_argument("--augment", help="training augmentation: flip, rrc-flip, randaug")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true", help="also log to <out>/tensorboard (if installed)")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="[STAGE.]KEY=VALUE",
                   help="any other setting, scoped by stage: plan.rank=4 (the planner's option), score.batches=8 "
                        "(the scorer's), train.min_lr=1e-6 (a training setting); a bare KEY goes to the one stage "
                        "that has it (a name both a planner option and a training setting, e.g. drop_path for "
                        "lora, must be scoped)")
    p.set_defaults(func=run)


OVERRIDE_FLAGS = ("pretrained", "img_size", "epochs", "batch_size", "lr", "seed", "device", "data_root", "protocol",
                  "eval_split", "precision", "weight_decay", "warmup_epochs", "grad_clip", "label_smoothing",
                  "drop_path", "augment", "num_workers")


def staged_overrides(method: str, pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``--set`` pairs as ``train()`` overrides: training settings as they are, planner options
    (``plan.*``) into ``method_options`` and scorer options (``score.*``) into ``score_options``,
    over any given as those settings themselves."""
    if not pairs:
        return {}
    from sensitune.methods import get_method

    staged = get_method(method).stage_options(dict(pairs), "--set")
    out: dict[str, object] = dict(staged.train)
    for key, options in (("method_options", staged.plan), ("score_options", staged.score)):
        if options:
            out[key] = {**dict(out.get(key) or {}), **options}  # type: ignore[call-overload]
    return out


def run(args: argparse.Namespace) -> int:
    from sensitune.engine.pipeline import train

    overrides = {k: getattr(args, k) for k in OVERRIDE_FLAGS}
    if args.no_progress:
        overrides["progress"] = False
    if args.tensorboard:
        overrides["tensorboard"] = True
    overrides.update(staged_overrides(args.method, args.set))
    results = train(args.model, args.task, args.method, args.out, budget=args.budget, config=args.config,
                    resume=args.resume, overwrite=args.overwrite, **overrides)
    if results and int(os.environ.get("RANK", "0")) == 0:  # under torchrun the summary is rank 0's alone
        keys = ("task_name", "method", "eval_split", "accuracy", "trainable_params", "trainable_params_without_head",
                "wall_seconds", "images_per_s", "peak_memory_mb")
        print(json.dumps({k: results.get(k) for k in keys}, indent=2))
    return 0
