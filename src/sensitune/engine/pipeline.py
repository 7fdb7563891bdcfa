"""``train()``: one call from a model name and a task to a trained, evaluated, saved run.

score (when the method needs scores) -> plan -> apply -> fit -> evaluate -> save; every stage
writes its output into the run folder, so a run can be inspected, resumed or re-evaluated.
``train`` reads as its stages (as torchtune's recipes do): ``_setup`` (method, budget,
settings), ``_check_run``, ``_open_splits``, ``_setup_model``, ``_setup_data``,
``_prepare_folder``, then ``_score``, ``_plan``, ``_fit``, ``_evaluate``, ``_save`` and
``_finish``, each over a :class:`TrainRun` that carries what one stage hands the next; the
results are a :class:`RunResults` whose ``to_dict()`` is results.json:

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

import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from sensitune.artifacts import save_delta
from sensitune.artifacts.merge import norm_stats as delta_norm_stats
from sensitune.data import (AUGMENTATIONS, DEFAULT_MINI_IMG_SIZE, TaskDataError, build_transform, open_task,
                            resolve_task)
from sensitune.engine.checkpoint import load_checkpoint, load_trainable_state
from sensitune.engine.config import TrainConfig, build_config
from sensitune.engine.evaluation import evaluate_model
from sensitune.engine.trainer import (
    DistInfo,
    FitResult,
    describe_diff,
    distributed,
    divergence,
    fit,
    nonfinite_tensors,
    peak_memory_mb,
    resolve_device,
    settings_diff,
)
from sensitune.io import read_json, write_json
from sensitune.methods import Method, get_method
from sensitune.models import create_backbone, data_config, find_head, weights_fingerprint
from sensitune.planning import Plan, make_plan
from sensitune.planning.budget import parse_budget
from sensitune.planning.common import context
from sensitune.scoring import ScoreMap, score
from sensitune.tuners import apply_plan
from sensitune.tuners.apply import trainable_parameters

RUN_FORMAT = "sensitune-run/1"
RESULTS_FORMAT = "sensitune-results/1"
#: what must be equal for --resume to continue a run
IDENTITY_KEYS = ("model", "task", "method", "budget")


# -- run folder ------------------------------------------------------------------------------------
def _started(out: Path) -> bool:
    """Whether the run in ``out`` got as far as training (a checkpoint or its results exist)."""
    return (out / "checkpoints" / "last.pt").is_file() or (out / "results.json").is_file()


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """run.json's content, or None when it is unreadable or not a JSON object."""
    try:
        return read_json(marker)
    except (OSError, ValueError):
        return None


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
    if cfg.augment is not None and cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"config: augment={cfg.augment!r} is unknown; choose one of {', '.join(AUGMENTATIONS)}")
    if cfg.score_options and m.scorer is None:
        raise ValueError(f"method {m.name!r} computes no scores, so score_options "
                         f"{cfg.score_options!r} would never be used; drop them")
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
    backbone = context(net).backbone_params
    count = parse_budget(budget, backbone, available=10**30)
    if count > backbone:
        raise ValueError(f"budget {budget!r} = {count:,} parameters is more than the whole backbone "
                         f"({backbone:,} parameters, head excluded)")


def _score_options(m: Method, cfg: TrainConfig, info: Any) -> dict[str, Any]:
    """What the scorer is called with (its preset options, then the run's settings)."""
    opts = {**m.score_options, "seed": cfg.seed, "progress": cfg.progress and info.is_main}
    if m.scorer_spec is not None and "batchnorm" in m.scorer_spec.options:  # scoring normalises as training will
        opts.setdefault("batchnorm", "train" if cfg.norm_stats == "batch" else "eval")
    if cfg.score_batches is not None:
        opts["batches"] = cfg.score_batches
    if cfg.score_batch_size is not None:
        opts["batch_size"] = cfg.score_batch_size
    opts.update(cfg.score_options)  # ``score.X`` / ``score_options``: the run's explicit scorer options win
    return opts


def _quiet(_: str) -> None:
    """The log of every process but rank 0 (a torchrun run reports once)."""


def _build_model(model: str | nn.Module, num_classes: int, cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    from sensitune.state import source_of

    if isinstance(model, nn.Module):
        out = _head_size(model)
        if out is not None and out != num_classes:
            raise ValueError(f"the given model's head has {out} outputs but the task has {num_classes} classes")
        return model, source_of(model) or {"name": type(model).__name__}
    net = create_backbone(model, num_classes, pretrained=cfg.pretrained, img_size=cfg.img_size,
                          drop_path_rate=cfg.drop_path)
    return net, source_of(net) or {"name": model}


def _head_size(model: nn.Module) -> int | None:
    name = find_head(model)
    head = dict(model.named_modules()).get(name) if name else None
    return head.out_features if isinstance(head, nn.Linear) else None


def _plan_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> role the applied plan gives it."""
    return {name: role for name, _, role in trainable_parameters(model)}


def _no_decay_from_plan(roles: dict[str, str]) -> Callable[[str, nn.Parameter], bool]:
    """Exempt from weight decay what the plan calls ``bias`` or ``sparse`` (plus every 1-D tensor)."""
    return lambda name, p: roles.get(name) in ("bias", "sparse")


def _zero_head(model: nn.Module) -> None:
    """Zero the classification head's weight and bias (``head_init: zero``)."""
    name = find_head(model)
    head = dict(model.named_modules()).get(name) if name else None
    if head is None:
        raise ValueError("head_init=zero: cannot find the model's classification head")
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()


def _norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of exactly the running statistics a delta would store (``save_delta(norm_stats=True)``)."""
    return {k: v.clone() for k, v in delta_norm_stats(model).items()}


def _save_delta(model: nn.Module, out: Path, meta: dict[str, Any], norm_stats: bool) -> dict[str, Any]:
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


# -- the pipeline: a run and its stages ------------------------------------------------------------
@dataclass(kw_only=True)
class RunResults:
    """results.json of a finished run, one field per key in the file's order (the bench, the
    report and earlier run folders read these keys; ``tests/engine`` pins them)."""
    format: str = RESULTS_FORMAT
    status: str = "complete"
    model: Any
    task: str
    method: str
    budget: Any
    task_name: str
    group: Any
    num_classes: int
    protocol: str
    train_split: str
    eval_split: str
    accuracy: float
    eval_loss: float
    eval_samples: int
    per_class_accuracy: dict[str, float | None]
    train_loss: float
    train_accuracy: float
    train_loss_start: float | None
    divergence: str | None
    diverged: bool
    epochs: int
    steps: int
    lr: float
    seed: int
    trainable_params: int
    trainable_params_without_head: int
    trainable_params_measured: int
    backbone_params: int
    plan_mix: Any
    bytes_estimate: int
    bytes_estimate_without_head: int
    delta: str
    delta_bytes_on_disk: int
    wall_seconds: float
    train_seconds: float
    stage_seconds: dict[str, float]
    images_per_s: float
    peak_memory_mb: float
    peak_memory_kind: str
    resumed_from: dict[str, int] | None
    device: str
    world_size: int
    precision: str
    model_source: dict[str, Any]
    base_fingerprint: str
    img_size: int
    config: dict[str, Any]
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The results.json mapping, keys in field order (values as they are: no copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RunData:
    """The task's splits under the transforms of the run's backbone, and what a delta records of the task."""
    train: Dataset  # augmented, for training
    train_plain: Dataset  # evaluation transform, for scoring
    eval: Dataset
    name: str
    group: Any
    num_classes: int
    class_names: list[str]
    data_config: dict[str, Any]


@dataclass
class TrainRun:
    """One ``train()`` call: its settings and folder, and what each stage hands the next."""
    method: Method
    cfg: TrainConfig
    out: Path
    info: DistInfo
    log: Callable[[str], None]
    budget: Any
    t0: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    action: str = "new"  # what check_run_dir decided
    net: nn.Module | None = None
    source: dict[str, Any] = field(default_factory=dict)
    base_fingerprint: str = ""
    early_plan: Any = None  # a plan made during validation (methods without a scorer)
    data: RunData | None = None
    device: torch.device | None = None

    @property
    def resuming(self) -> bool:
        return self.action == "resume"

    @property
    def splits(self) -> tuple[str, str]:
        return self.cfg.splits()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into ``stage_seconds[name]``."""
        t = time.perf_counter()
        yield
        self.stage_seconds[name] = time.perf_counter() - t


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
    run = _setup(method, out, budget, config, overrides, log)
    with run.stage("setup"):
        # 1. validate everything before any work and before anything is written
        _check_run(run, model, task, resume=resume, overwrite=overwrite)
        if run.action == "complete":
            run.log(f"{run.out}: run already complete with these settings; returning its results")
            return read_json(run.out / "results.json")
        train_set, eval_set = _open_splits(run, task)
        _setup_model(run, model, train_set)
        _setup_data(run, train_set, eval_set)
        # 2. the run folder: only now is anything cleared or written
        _prepare_folder(run, overwrite)
    scores = _score(run)
    plan, trainable_now = _plan(run, scores, head_made_here=isinstance(model, str))
    fitted, norm_moved = _fit(run)
    results: dict[str, Any] = {}
    if run.info.is_main:
        ev = _evaluate(run)
        delta = _save(run, norm_moved)
        results = _finish(run, plan, trainable_now, fitted, ev, delta).to_dict()
        write_json(run.out / "results.json", results)
        run.log(f"{run.data.name} {run.method.name}: {run.splits[1]} accuracy {ev['accuracy']:.2f}% "
                f"({results['trainable_params_without_head']:,} trainable without head) -> {run.out}")
    if run.info.world > 1:
        obj = [results]
        torch.distributed.broadcast_object_list(obj, src=0)
        results = obj[0]
    return results


def _setup(method: str | Method, out: str | Path, budget: Any, config: Any, overrides: Mapping[str, Any],
          log: Callable[[str], None]) -> TrainRun:
    """The method, its budget (syntax, at least one parameter, a share within (0, 100] %), the
    settings and this process's place under torchrun (only rank 0 logs)."""
    t0 = time.perf_counter()
    m = get_method(method)
    budget = m.check_budget(budget)
    cfg = build_config(m.train, config, overrides)
    info = distributed(cfg.device)
    return TrainRun(method=m, cfg=cfg, out=Path(out), info=info, log=log if info.is_main else _quiet,
                    budget=budget, t0=t0)


def _check_run(run: TrainRun, model: str | nn.Module, task: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Settings and method options, the task's name, the image size of built-in tasks, and what
    to do with the folder (``run.action``); nothing is read beyond the task's index, nothing written."""
    cfg = run.cfg
    _check_settings(run.method, cfg, run.info)
    _, _, builtin = resolve_task(task, data_root=cfg.data_root)
    if cfg.img_size is None and builtin:
        cfg.img_size = DEFAULT_MINI_IMG_SIZE  # the built-in tasks are small images
    run.identity = {"format": RUN_FORMAT, "model": model if isinstance(model, str) else type(model).__name__,
                    "task": str(task), "method": run.method.name, "budget": run.budget}
    run.action = _on_main(run.info, lambda: check_run_dir(run.out, run.identity, cfg, resume=resume,
                                                          overwrite=overwrite))


def _open_splits(run: TrainRun, task: str | Path) -> tuple[Dataset, Dataset]:
    """Both splits, every image decoded, and at least one batch of training data."""
    train_split, eval_split = run.splits
    data = _open_data(task, run.cfg, run.info, (train_split, eval_split))
    train_set, eval_set = data[train_split], data[eval_split]
    _check_batch(run.cfg, len(train_set), train_split, run.info)
    return train_set, eval_set


def _setup_model(run: TrainRun, model: str | nn.Module, train_set: Dataset) -> None:
    """The backbone with the task's head, the budget against its size, the base fingerprint, and
    (for a method without a scorer) its plan now: that checks every option against the model."""
    cfg, m = run.cfg, run.method
    torch.manual_seed(cfg.seed)  # a fresh head / random init is part of the run's seed
    net, run.source = _build_model(model, train_set.num_classes, cfg)
    if run.budget is not None:
        _check_budget_range(run.budget, net)
    if m.scorer is None and not (run.resuming and (run.out / "plan.json").is_file()):
        run.early_plan = make_plan(net, None, m.plan, budget=run.budget, **{**m.plan_options, **cfg.method_options})
    run.base_fingerprint = weights_fingerprint(net)
    run.net = net


def _setup_data(run: TrainRun, train_set: Any, eval_set: Any) -> None:
    """The splits under the backbone's transforms (augmented for training, plain for scoring and evaluation)."""
    cfg = run.cfg
    dc = data_config(run.net, cfg.img_size)
    eval_tf = build_transform(dc, img_size=cfg.img_size, train=False)
    run.data = RunData(
        train=train_set.with_transform(build_transform(dc, img_size=cfg.img_size, train=True, augment=cfg.augment)),
        train_plain=train_set.with_transform(eval_tf), eval=eval_set.with_transform(eval_tf),
        name=train_set.name, group=train_set.group, num_classes=train_set.num_classes,
        class_names=list(train_set.class_names), data_config=dc)


def _prepare_folder(run: TrainRun, overwrite: bool) -> None:
    """Clear the folder if asked, write run.json (rank 0), then put the model on its device."""
    out, info = run.out, run.info
    if info.is_main:
        if run.action == "clear":
            if not overwrite:
                run.log(f"{out}: the run there never started training; starting it afresh")
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", {**run.identity, "config": run.cfg.to_dict(), "splits": list(run.splits),
                                      "world_size": info.world, "base_fingerprint": run.base_fingerprint})
    if info.world > 1:
        torch.distributed.barrier()
    run.device = resolve_device(run.cfg.device, info.local_rank)
    run.net.to(run.device)


def _score(run: TrainRun) -> Any:
    """The scorer's ScoreMap on the training split (reused from the folder when resuming), or
    None for a method without a scorer."""
    m = run.method
    if m.scorer is None:
        return None
    with run.stage("score"):
        scores_path = run.out / "scores.safetensors"
        if run.resuming and scores_path.is_file():
            run.log(f"scores: reusing {scores_path}")
            return ScoreMap.load(scores_path)
        run.log(f"scores: {m.scorer} on {run.data.name}/{run.splits[0]}")
        scores = score(run.net, run.data.train_plain, m.scorer, **_score_options(m, run.cfg, run.info))
        if run.info.is_main:
            scores.save(scores_path)
        return scores


def _plan(run: TrainRun, scores: Any, *, head_made_here: bool) -> tuple[Any, int]:
    """Make (or reuse) the plan, save it, apply it and initialise the head; returns the plan and
    the number of parameters that now have requires_grad."""
    m, cfg, net = run.method, run.cfg, run.net
    with run.stage("plan"):
        plan_path = run.out / "plan.json"
        if run.resuming and plan_path.is_file():
            plan = Plan.load(plan_path)
            run.log(f"plan: reusing {plan_path}")
        else:
            plan = run.early_plan if run.early_plan is not None else make_plan(
                net, scores, m.plan, budget=run.budget, **{**m.plan_options, **cfg.method_options})
            if run.info.is_main:
                plan.save(plan_path)
        apply_plan(net, plan)
        if cfg.head_init == "zero" and head_made_here:
            _init_zero_head(run, plan)
        trainable_now = sum(p.numel() for p in net.parameters() if p.requires_grad)
        run.log(plan.summary())
    return plan, trainable_now


def _init_zero_head(run: TrainRun, plan: Any) -> None:
    """``head_init: zero``, after scoring (SPT's sensitivities flow through the head: a zero head
    would zero them all), only for a head made here (never a given model's), only a float one (a
    1-bit head's scale is the spread of its weights, which zeros would collapse) and only a head
    the plan trains (a frozen zero head would output zeros and pass no gradient)."""
    head_units = [u for u in plan.units if plan.is_head_unit(u)]
    if not head_units:
        run.log("head_init=zero: skipped, the plan does not train the head; it keeps the default init")
    elif any(u.bits < 32 for u in head_units):
        run.log("head_init=zero: skipped for a quantised head (head_bits < 32); it keeps the default init")
    else:
        _zero_head(run.net)


def _fit(run: TrainRun) -> tuple[FitResult, bool]:
    """Train (resuming from the folder's checkpoint when asked); returns the fit and whether
    training moved the norm statistics. The delta carries them only then (only under norm_stats
    batch / pretrained-if-frozen; the base holds them otherwise); a resumed run compares the
    checkpoint's statistics with the pretrained ones it rebuilt."""
    net = run.net
    with run.stage("train"):
        roles = _plan_roles(net)
        norm_before = _norm_buffers(net)
        fitted = fit(net, run.data.train, run.cfg, out_dir=run.out, eval_data=run.data.eval, resume=run.resuming,
                     no_decay=_no_decay_from_plan(roles), head=lambda name, p: roles.get(name) == "head", log=run.log)
        norm_after = _norm_buffers(net)
        norm_moved = any(not torch.equal(norm_before[k], v.to(norm_before[k].device)) for k, v in norm_after.items())
    return fitted, norm_moved


def _evaluate(run: TrainRun) -> dict[str, Any]:
    """Rank 0: the trained model on the evaluation split, with its confusion and prediction files."""
    cfg = run.cfg
    with run.stage("evaluate"):
        return evaluate_model(run.net, run.data.eval, batch_size=cfg.eval_batch_size or cfg.batch_size,
                              device=run.device, precision=cfg.precision, num_workers=cfg.num_workers, out=run.out,
                              prefix=f"eval_{run.splits[1]}_")


def _save(run: TrainRun, norm_moved: bool) -> dict[str, Any]:
    """Rank 0: the task delta into ``delta/``; returns its path and its bytes on disk."""
    with run.stage("save"):
        meta = {"class_names": run.data.class_names, "data_config": run.data.data_config,
                "backbone": {**run.source, "img_size": run.cfg.img_size}, "base_fingerprint": run.base_fingerprint}
        return _save_delta(run.net, run.out, meta, norm_moved)


def _finish(run: TrainRun, plan: Any, trainable_now: int, fitted: FitResult, ev: dict[str, Any],
            delta: dict[str, Any]) -> RunResults:
    """The run's results (warning when it diverged: its accuracy is then no result)."""
    cfg, data = run.cfg, run.data
    diverged = divergence(fitted.history)
    if diverged:
        run.log(f"WARNING: this run diverged ({diverged}); its accuracy is not a result")
    last = fitted.history[-1]
    train_split, eval_split = run.splits
    return RunResults(
        **{k: run.identity[k] for k in IDENTITY_KEYS},
        task_name=data.name, group=data.group, num_classes=data.num_classes,
        protocol=cfg.protocol, train_split=train_split, eval_split=eval_split,
        accuracy=ev["accuracy"], eval_loss=ev["loss"], eval_samples=ev["num_samples"],
        per_class_accuracy=ev["per_class_accuracy"],
        train_loss=last["train_loss"], train_accuracy=last["train_acc"],
        train_loss_start=fitted.history[0].get("start_loss"), divergence=diverged, diverged=diverged is not None,
        epochs=cfg.epochs, steps=fitted.global_step, lr=cfg.lr, seed=cfg.seed,
        trainable_params=plan.num_trainable(True), trainable_params_without_head=plan.num_trainable(False),
        trainable_params_measured=trainable_now, backbone_params=plan.backbone_params, plan_mix=plan.mix(),
        bytes_estimate=plan.nbytes(True), bytes_estimate_without_head=plan.nbytes(False),
        delta=delta["delta"], delta_bytes_on_disk=delta["delta_bytes_on_disk"],
        wall_seconds=time.perf_counter() - run.t0, train_seconds=fitted.train_seconds,
        stage_seconds=run.stage_seconds, images_per_s=fitted.images_per_s,
        **peak_memory_mb(run.device),
        resumed_from=fitted.resumed_from,
        device=str(run.device), world_size=run.info.world, precision=cfg.precision,
        model_source=run.source, base_fingerprint=run.base_fingerprint,
        img_size=cfg.img_size or data.data_config["input_size"][-1],
        config=cfg.to_dict(),
        versions={"python": platform.python_version(), "torch": torch.__version__},
    )


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
    plan = Plan.load(run / "plan.json")
    num_classes = open_task(meta["task"], cfg.splits()[0], data_root=cfg.data_root, verify=False).num_classes
    torch.manual_seed(cfg.seed)  # as in train(): a random-init backbone is a function of the seed
    net = create_backbone(meta["model"], num_classes, pretrained=cfg.pretrained, img_size=cfg.img_size,
                          drop_path_rate=cfg.drop_path)
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
