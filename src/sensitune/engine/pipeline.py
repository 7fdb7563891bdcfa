"""``train()``: one call from a model name and a task to a trained, evaluated, saved run.

score (when the method needs scores) -> plan -> apply -> fit -> evaluate -> save; every stage
writes its output into the run folder, so a run can be inspected, resumed or re-evaluated:

    run.json            what this run is (model, task, method, budget, settings)
    scores.safetensors  the scorer's output (methods with a scorer)
    plan.json (+ .safetensors for sparse indices)
    checkpoints/last.pt trainable state + optimizer + scheduler + RNG + position (atomic)
    metrics.csv         one row per epoch
    eval_<split>_confusion.csv / .png
    delta/              the task delta (``sensitune.artifacts.save_delta``)
    results.json        accuracy, trainable parameters with/without head, bytes, time, memory, images/s

Protocol: ``protocol="val"`` (default) trains on train800 and evaluates val200 — the split used
to select hyper-parameters; ``protocol="final"`` trains on train800val200 and reports test.
Scores are computed on the training split only, so nothing is ever selected on test.

Order of work: everything that can be checked is checked before any scoring, planning,
training or writing — budget syntax and range, method options (names and types, read off the
planner's signature), settings, batch size against the split, every image of every split the
run reads (decoded in full), the folder's state. A refused run writes nothing, and a run folder
whose run never started training (no checkpoint, no results: a setup that failed) never blocks
the next command: it is cleared and reused. Resuming a finished run with other settings is
refused, listing them (see README, "Resuming a run").
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from sensitune.engine.checkpoint import load_checkpoint, load_trainable_state
from sensitune.io import atomic_write_text
from sensitune.engine.config import TrainConfig, build_config
from sensitune.engine.evaluation import evaluate_model
from sensitune.engine.trainer import (
    describe_diff,
    distributed,
    divergence,
    fit,
    nonfinite_tensors,
    peak_memory_mb,
    resolve_device,
    settings_diff,
)
from sensitune.methods import Method, get_method

RUN_FORMAT = "sensitune-run/1"
#: what must be equal for --resume to continue a run
IDENTITY_KEYS = ("model", "task", "method", "budget")
#: scorers that run the model forward in training mode and take a ``batchnorm`` mode
GRADIENT_SCORERS = ("sensitivity", "gps")


# -- run folder ------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _started(out: Path) -> bool:
    """Whether the run in ``out`` got as far as training (a checkpoint or its results exist)."""
    return (out / "checkpoints" / "last.pt").is_file() or (out / "results.json").is_file()


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _identity_diff(previous: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    return [f"{k}: was {previous.get(k)!r}, now {identity.get(k)!r}" for k in IDENTITY_KEYS
            if previous.get(k) != identity.get(k)]


def check_run_dir(out: Path, identity: dict[str, Any], cfg: TrainConfig, *, resume: bool, overwrite: bool) -> str:
    """What to do with ``out``; decides everything and changes nothing (clearing comes later,
    once the whole run has been validated).

    ``new``: absent or empty. ``clear``: a run folder to empty first (``overwrite``, or a run
    that never started training: a failed setup leaves nothing worth keeping, so it never
    blocks the corrected command). ``resume``: continue it (a run that never started training is
    resumed only with the same identity and settings, reusing its scores and plan).
    ``complete``: resuming a finished run with the same settings returns its results; with other
    settings it is refused, listing them. A non-empty folder that is not a run is never touched.
    """
    if resume and overwrite:
        raise ValueError("choose either resume or overwrite, not both")
    marker = out / "run.json"
    if not out.exists():
        if resume:
            raise FileNotFoundError(f"cannot resume: {out} does not exist")
        return "new"
    if not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if not marker.is_file():
        if any(out.iterdir()):
            raise ValueError(f"output folder {out} is not empty and holds no sensitune run; choose a new folder")
        if resume:
            raise FileNotFoundError(f"cannot resume: {out} holds no run")
        return "new"
    if overwrite:
        return "clear"
    previous = _read_marker(marker)
    if not _started(out):
        same = (previous is not None and not _identity_diff(previous, identity)
                and not settings_diff(previous.get("config") or {}, cfg))
        return "resume" if resume and same else "clear"
    if not resume:
        raise ValueError(f"output folder {out} already holds a run ({marker}); pass --resume to continue it "
                         f"or --overwrite to start again")
    if previous is None:
        raise ValueError(f"cannot resume {out}: {marker} is not readable JSON")
    diff = _identity_diff(previous, identity)
    if diff:
        raise ValueError(f"cannot resume {out}: it holds a different run (" + "; ".join(diff) + ")")
    results = out / "results.json"
    if results.is_file():
        changed = settings_diff(read_json(results).get("config") or {}, cfg)
        if changed:
            raise ValueError(f"cannot resume {out}: the run is complete and these settings differ from it: "
                             f"{describe_diff(changed)}. A finished run is not continued (its learning-rate "
                             f"schedule has run its course): train into another --out, or pass --overwrite to "
                             f"replace it")
        return "complete"
    return "resume"


def clear_run_dir(out: Path) -> None:
    """Empty a folder recognised as a run (``check_run_dir`` said ``clear``)."""
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


# -- stages ------------------------------------------------------------------------------------------
def _open_data(task: Any, cfg: TrainConfig, info: Any, splits: tuple[str, ...]) -> dict[str, Dataset]:
    """Open and validate every split the run reads, each image decoded in full (rank 0 does the
    decoding under torchrun); the problems of all splits are raised together."""
    from sensitune.data import TaskDataError, open_task

    wanted = tuple(dict.fromkeys(splits))

    def check() -> dict[str, Dataset]:
        opened: dict[str, Dataset] = {}
        problems: list[TaskDataError] = []
        for split in wanted:
            try:
                opened[split] = open_task(task, split, data_root=cfg.data_root)
            except TaskDataError as exc:
                problems.append(exc)
        if problems:
            raise TaskDataError.combine(problems, f"the splits this run reads ({', '.join(wanted)})")
        return opened

    if info.world == 1:
        return check()

    def check_only() -> None:  # rank 0's verdict is broadcast; the datasets stay on each rank
        check()

    _on_main(info, check_only)
    return {split: open_task(task, split, data_root=cfg.data_root, verify=False) for split in wanted}


def _check_settings(m: Method, cfg: TrainConfig, info: Any) -> None:
    """The checks that need neither data nor model: augmentation, method options, batch vs processes."""
    from sensitune.data import AUGMENTATIONS

    if cfg.augment is not None and cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"config: augment={cfg.augment!r} is unknown; choose one of {', '.join(AUGMENTATIONS)}")
    m.check_options(cfg.method_options, _score_options(m, cfg, info))
    if cfg.batch_size % info.world:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the number of "
                         f"processes {info.world}")


def _check_batch(cfg: TrainConfig, n_train: int, train_split: str, info: Any) -> None:
    """A training split must give at least one batch (``fit`` would find out only at training)."""
    if cfg.drop_last and n_train < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training split {train_split} "
                         f"({n_train} images): no full batch; lower --batch-size or --set drop_last=false")
    if n_train < info.world:
        raise ValueError(f"the training split {train_split} has {n_train} images, fewer than the {info.world} "
                         f"processes")


def _check_budget_range(budget: Any, net: nn.Module) -> None:
    """A budget larger than the backbone (head excluded) is refused before scoring."""
    from sensitune.planning.budget import parse_budget
    from sensitune.planning.common import context

    backbone = context(net).backbone_params
    count = parse_budget(budget, backbone, available=10**30)
    if count > backbone:
        raise ValueError(f"budget {budget!r} = {count:,} parameters is more than the whole backbone "
                         f"({backbone:,} parameters, head excluded)")


def _score_options(m: Method, cfg: TrainConfig, info: Any) -> dict[str, Any]:
    """What the scorer is called with (its preset options, then the run's settings)."""
    opts = {**m.score_options, "seed": cfg.seed, "progress": cfg.progress and info.is_main}
    if m.scorer in GRADIENT_SCORERS:  # scoring normalises as training will
        opts.setdefault("batchnorm", "train" if cfg.norm_stats == "batch" else "eval")
    if cfg.score_batches is not None:
        opts["batches"] = cfg.score_batches
    if cfg.score_batch_size is not None:
        opts["batch_size"] = cfg.score_batch_size
    return opts


def _quiet(_: str) -> None:
    """The log of every process but rank 0 (a torchrun run reports once)."""


def _build_model(model: str | nn.Module, num_classes: int, cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(model, nn.Module):
        out = _head_size(model)
        if out is not None and out != num_classes:
            raise ValueError(f"the given model's head has {out} outputs but the task has {num_classes} classes")
        return model, dict(getattr(model, "sensitune_source", {}) or {"name": type(model).__name__})
    from sensitune.models import create_backbone

    net = create_backbone(model, num_classes, pretrained=cfg.pretrained, img_size=cfg.img_size,
                          drop_path_rate=cfg.drop_path)
    return net, dict(getattr(net, "sensitune_source", {}) or {"name": model})


def _head_size(model: nn.Module) -> int | None:
    from sensitune.models import find_head

    name = find_head(model)
    head = dict(model.named_modules()).get(name) if name else None
    return head.out_features if isinstance(head, nn.Linear) else None


def _plan_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role the applied plan gives it."""
    from sensitune.tuners.apply import trainable_parameters

    return {name: role for name, _, role in trainable_parameters(model)}


def _no_decay_from_plan(roles: dict[str, str]) -> Callable[[str, nn.Parameter], bool]:
    """Exempt from weight decay what the plan calls ``bias`` or ``sparse`` (plus every 1-D tensor)."""
    return lambda name, p: roles.get(name) in ("bias", "sparse")


def _zero_head(model: nn.Module) -> None:
    """Zero the classification head's weight and bias (``head_init: zero``)."""
    from sensitune.models import find_head

    name = find_head(model)
    head = dict(model.named_modules()).get(name) if name else None
    if head is None:
        raise ValueError("head_init=zero: cannot find the model's classification head")
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()


def _norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of exactly the running statistics a delta would store (``save_delta(norm_stats=True)``)."""
    from sensitune.artifacts.merge import norm_stats

    return {k: v.clone() for k, v in norm_stats(model).items()}


def _save_delta(model: nn.Module, out: Path, meta: dict[str, Any], norm_stats: bool) -> dict[str, Any]:
    from sensitune.artifacts import save_delta

    path = save_delta(model, out / "delta", meta=meta, norm_stats=norm_stats)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"delta": str(Path(path).relative_to(out)), "delta_bytes_on_disk": size}


def _on_main(info, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank, so a refused
    run stops all processes instead of leaving the others waiting."""
    if info.world == 1:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except (ValueError, FileNotFoundError) as exc:
            box[0] = (type(exc).__name__, str(exc))
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    raise (FileNotFoundError if status == "FileNotFoundError" else ValueError)(value)


# -- the pipeline ------------------------------------------------------------------------------------
def train(
    model: str | nn.Module,
    task: str | Path,
    method: str | Method,
    out: str | Path,
    budget: int | float | str | None = None,
    config: str | Path | Mapping[str, Any] | TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Score, plan, apply, train, evaluate and save one run into ``out``; return results.json.

    ``model``: a backbone name for :func:`sensitune.models.create_backbone` or a module whose
    head already matches the task. ``task``: a built-in task name or a task folder.
    ``method``: a preset of :mod:`sensitune.methods`; ``budget`` only for budgeted methods.
    ``config``: YAML file, recipe name (``paper``, ``mini``) or mapping; ``overrides``: any
    :class:`TrainConfig` key (e.g. ``epochs=5, lr=1e-3, protocol="final"``).
    The returned dict holds ``accuracy`` (top-1 % on the eval split), ``eval_loss``,
    ``train_loss`` and the other results (see module docstring).
    """
    t0 = time.perf_counter()
    m = get_method(method)
    budget = m.check_budget(budget)  # syntax, at least one parameter, a share within (0, 100] %
    cfg = build_config(m.train, config, overrides)
    out = Path(out)
    info = distributed(cfg.device)
    if not info.is_main:
        log = _quiet
    stage_seconds: dict[str, float] = {}

    # 1. validate everything before any work and before anything is written
    t = time.perf_counter()
    from sensitune.data import DEFAULT_MINI_IMG_SIZE, build_transform, resolve_task

    _check_settings(m, cfg, info)
    _, _, builtin = resolve_task(task, data_root=cfg.data_root)
    if cfg.img_size is None and builtin:
        cfg.img_size = DEFAULT_MINI_IMG_SIZE  # the built-in tasks are small images
    train_split, eval_split = cfg.splits()
    identity = {"format": RUN_FORMAT, "model": model if isinstance(model, str) else type(model).__name__,
                "task": str(task), "method": m.name, "budget": budget}
    action = _on_main(info, lambda: check_run_dir(out, identity, cfg, resume=resume, overwrite=overwrite))
    if action == "complete":
        log(f"{out}: run already complete with these settings; returning its results")
        return read_json(out / "results.json")
    resuming = action == "resume"
    data = _open_data(task, cfg, info, (train_split, eval_split))
    train_set, eval_set = data[train_split], data[eval_split]
    _check_batch(cfg, len(train_set), train_split, info)
    torch.manual_seed(cfg.seed)  # a fresh head / random init is part of the run's seed
    net, source = _build_model(model, train_set.num_classes, cfg)
    if budget is not None:
        _check_budget_range(budget, net)
    from sensitune.models import data_config, weights_fingerprint
    from sensitune.planning import Plan, make_plan

    plan_path = out / "plan.json"
    early_plan = None
    if m.scorer is None and not (resuming and plan_path.is_file()):
        # a plan without scores is cheap: making it now checks every option against the model
        early_plan = make_plan(net, None, m.plan, budget=budget, **{**m.plan_options, **cfg.method_options})
    base_fingerprint = weights_fingerprint(net)
    dc = data_config(net, cfg.img_size)
    eval_tf = build_transform(dc, img_size=cfg.img_size, train=False)
    train_data = train_set.with_transform(build_transform(dc, img_size=cfg.img_size, train=True,
                                                          augment=cfg.augment))
    train_plain = train_set.with_transform(eval_tf)
    eval_data = eval_set.with_transform(eval_tf)
    task_info = {"name": train_set.name, "group": train_set.group, "num_classes": train_set.num_classes,
                 "class_names": list(train_set.class_names), "data_config": dc}

    # 2. the run folder: only now is anything cleared or written
    if info.is_main:
        if action == "clear":
            if not overwrite:
                log(f"{out}: the run there never started training; starting it afresh")
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", {**identity, "config": cfg.to_dict(), "splits": [train_split, eval_split],
                                      "world_size": info.world, "base_fingerprint": base_fingerprint})
    if info.world > 1:
        torch.distributed.barrier()
    device = resolve_device(cfg.device, info.local_rank)
    net.to(device)
    stage_seconds["setup"] = time.perf_counter() - t

    # score
    scores = None
    if m.scorer is not None:
        t = time.perf_counter()
        scores_path = out / "scores.safetensors"
        from sensitune.scoring import ScoreMap, score

        if resuming and scores_path.is_file():
            scores = ScoreMap.load(scores_path)
            log(f"scores: reusing {scores_path}")
        else:
            log(f"scores: {m.scorer} on {task_info['name']}/{train_split}")
            scores = score(net, train_plain, m.scorer, **_score_options(m, cfg, info))
            if info.is_main:
                scores.save(scores_path)
        stage_seconds["score"] = time.perf_counter() - t

    # plan and apply
    t = time.perf_counter()
    from sensitune.tuners import apply_plan

    if resuming and plan_path.is_file():
        plan = Plan.load(plan_path)
        log(f"plan: reusing {plan_path}")
    else:
        plan = early_plan if early_plan is not None else make_plan(net, scores, m.plan, budget=budget, **{**m.plan_options, **cfg.method_options})
        if info.is_main:
            plan.save(plan_path)
    apply_plan(net, plan)
    # after scoring (SPT's sensitivities flow through the head: a zero head would zero them all),
    # only a head made here (never a given model's), and only a float one (a 1-bit head's scale is
    # the spread of its weights, which zeros would collapse)
    # and only a head the plan trains (a frozen zero head would output zeros and pass no gradient)
    head_units = [u for u in plan.units if plan.is_head_unit(u)]
    if cfg.head_init == "zero" and isinstance(model, str):
        if not head_units:
            log("head_init=zero: skipped, the plan does not train the head; it keeps the default init")
        elif any(u.bits < 32 for u in head_units):
            log("head_init=zero: skipped for a quantised head (head_bits < 32); it keeps the default init")
        else:
            _zero_head(net)
    trainable_now = sum(p.numel() for p in net.parameters() if p.requires_grad)
    log(plan.summary())
    stage_seconds["plan"] = time.perf_counter() - t

    # train
    t = time.perf_counter()
    roles = _plan_roles(net)
    norm_before = _norm_buffers(net)
    fitted = fit(net, train_data, cfg, out_dir=out, eval_data=eval_data, resume=resuming,
                 no_decay=_no_decay_from_plan(roles), head=lambda name, p: roles.get(name) == "head", log=log)
    # the delta carries norm statistics only when training moved them (only under norm_stats
    # batch / pretrained-if-frozen; the base holds them otherwise); a resumed run compares the
    # checkpoint's statistics with the pretrained ones it rebuilt
    norm_after = _norm_buffers(net)
    norm_moved = any(not torch.equal(norm_before[k], v.to(norm_before[k].device)) for k, v in norm_after.items())
    stage_seconds["train"] = time.perf_counter() - t

    # evaluate and save (rank 0)
    results: dict[str, Any] = {}
    if info.is_main:
        t = time.perf_counter()
        ev = evaluate_model(net, eval_data, batch_size=cfg.eval_batch_size or cfg.batch_size, device=device,
                            precision=cfg.precision, num_workers=cfg.num_workers, out=out, prefix=f"eval_{eval_split}_")
        stage_seconds["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        delta = _save_delta(net, out, {"class_names": task_info["class_names"], "data_config": task_info["data_config"],
                                       "backbone": {**source, "img_size": cfg.img_size},
                                       "base_fingerprint": base_fingerprint}, norm_moved)
        stage_seconds["save"] = time.perf_counter() - t
        last = fitted.history[-1]
        diverged = divergence(fitted.history)
        if diverged:
            log(f"WARNING: this run diverged ({diverged}); its accuracy is not a result")
        results = {
            "format": "sensitune-results/1",
            "status": "complete",
            **{k: identity[k] for k in IDENTITY_KEYS},
            "task_name": task_info["name"], "group": task_info["group"], "num_classes": task_info["num_classes"],
            "protocol": cfg.protocol, "train_split": train_split, "eval_split": eval_split,
            "accuracy": ev["accuracy"], "eval_loss": ev["loss"], "eval_samples": ev["num_samples"],
            "per_class_accuracy": ev["per_class_accuracy"],
            "train_loss": last["train_loss"], "train_accuracy": last["train_acc"],
            "train_loss_start": fitted.history[0].get("start_loss"), "divergence": diverged,
            "diverged": diverged is not None,
            "epochs": cfg.epochs, "steps": fitted.global_step, "lr": cfg.lr, "seed": cfg.seed,
            "trainable_params": plan.num_trainable(True),
            "trainable_params_without_head": plan.num_trainable(False),
            "trainable_params_measured": trainable_now,
            "backbone_params": plan.backbone_params,
            "plan_mix": plan.mix(),
            "bytes_estimate": plan.nbytes(True), "bytes_estimate_without_head": plan.nbytes(False),
            **delta,
            "wall_seconds": time.perf_counter() - t0,
            "train_seconds": fitted.train_seconds,
            "stage_seconds": stage_seconds,
            "images_per_s": fitted.images_per_s,
            **peak_memory_mb(device),
            "resumed_from": fitted.resumed_from,
            "device": str(device), "world_size": info.world, "precision": cfg.precision,
            "model_source": source, "base_fingerprint": base_fingerprint,
            "img_size": cfg.img_size or task_info["data_config"]["input_size"][-1],
            "config": cfg.to_dict(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        write_json(out / "results.json", results)
        log(f"{task_info['name']} {m.name}: {eval_split} accuracy {ev['accuracy']:.2f}% "
            f"({results['trainable_params_without_head']:,} trainable without head) -> {out}")
    if info.world > 1:
        obj = [results]
        torch.distributed.broadcast_object_list(obj, src=0)
        results = obj[0]
    return results


# -- evaluation of a saved run ---------------------------------------------------------------------
def load_run_model(run: str | Path, device: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model of a run folder: backbone + plan + trained tensors of its checkpoint."""
    run = Path(run)
    marker = run / "run.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{run} is not a sensitune run folder (no run.json)")
    meta = read_json(marker)
    ckpt_path = run / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{run} has no checkpoint yet ({ckpt_path})")
    if not isinstance(meta.get("model"), str):
        raise ValueError(f"{run} was trained from a model object, not a backbone name; rebuild it yourself "
                         f"and call evaluate(model, data)")
    cfg = build_config(config=meta["config"])
    from sensitune.models import create_backbone
    from sensitune.planning import Plan
    from sensitune.tuners import apply_plan

    plan = Plan.load(run / "plan.json")
    from sensitune.data import open_task

    num_classes = open_task(meta["task"], cfg.splits()[0], data_root=cfg.data_root, verify=False).num_classes
    torch.manual_seed(cfg.seed)  # as in train(): a random-init backbone is a function of the seed
    net = create_backbone(meta["model"], num_classes, pretrained=cfg.pretrained, img_size=cfg.img_size,
                          drop_path_rate=cfg.drop_path)
    from sensitune.models import weights_fingerprint

    recorded = meta.get("base_fingerprint")
    if recorded and weights_fingerprint(net) != recorded:
        raise ValueError(f"{run}: the rebuilt backbone {meta['model']!r} (pretrained={cfg.pretrained!r}) differs from "
                         f"the one the run was trained on (weights fingerprint mismatch)")
    apply_plan(net, plan)
    state = load_checkpoint(ckpt_path)["model"]
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(f"{run}: its checkpoint {ckpt_path} holds non-finite weights ({len(bad)} of {len(state)} "
                         f"tensors, e.g. {bad[0]}): the run diverged; nothing it predicts means anything. Train it "
                         f"again with a lower lr (--overwrite)")
    load_trainable_state(net, state, str(ckpt_path))
    net.to(resolve_device(device))
    return net, {**meta, "cfg": cfg}


def evaluate_run(run: str | Path, split: str = "test", *, device: str = "auto", batch_size: int | None = None,
                 data_root: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate a run folder's trained model on ``split``; writes ``eval_<split>.json`` and confusion files."""
    from sensitune.data import build_transform, open_task
    from sensitune.models import data_config

    run = Path(run)
    net, meta = load_run_model(run, device)
    cfg: TrainConfig = meta["cfg"]
    root = data_root if data_root is not None else cfg.data_root
    tf = build_transform(data_config(net, cfg.img_size), img_size=cfg.img_size, train=False)
    data = open_task(meta["task"], split, transform=tf, data_root=root)
    res = evaluate_model(net, data, batch_size=batch_size or cfg.eval_batch_size or cfg.batch_size,
                         precision=cfg.precision, out=run, prefix=f"eval_{split}_")
    res = {"run": str(run), "split": split, "task": meta["task"], "method": meta["method"], **res}
    write_json(run / f"eval_{split}.json", res)
    log(f"{run}: {split} accuracy {res['accuracy']:.2f}% on {res['num_samples']} images")
    return res


def evaluate(model: nn.Module | str | Path, data: Dataset | None = None, **kwargs: Any) -> dict[str, Any]:
    """``evaluate(model, data, ...)`` scores a model on a dataset (:func:`evaluate_model`);
    ``evaluate("runs/x", split="test")`` re-evaluates a run folder (:func:`evaluate_run`)."""
    if isinstance(model, (str, Path)):
        if data is not None:
            raise ValueError("evaluate(run_folder, ...) takes split=..., not a dataset")
        return evaluate_run(model, **kwargs)
    if data is None:
        raise ValueError("evaluate(model, data): data is required")
    return evaluate_model(model, data, **kwargs)
