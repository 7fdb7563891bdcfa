"""The training loop: AdamW, cosine schedule with per-step warm-up, mixed precision, data
parallel, exact resume.

``fit`` trains exactly the parameters that have ``requires_grad`` (``apply_plan`` decides
which; nothing here flips the flag). Everything random is a function of the seed and the
position in training, so a run is reproducible on CPU and a killed run resumes exactly:

* data order: epoch ``e`` shuffles with a generator seeded from ``(seed, e)``; a global batch
  is split into equal per-rank chunks, so 1 process and N processes see the same global batches;
* augmentation: each item's transform draws from an RNG seeded from ``(seed, e, index)``, so
  it does not depend on the worker count, the rank or where a resumed run restarts;
* model randomness (dropout, drop-path): the global RNG is reseeded from ``(seed, e, rank)``
  at every epoch start and saved in mid-epoch checkpoints.

The loss of a step is the sum over the global batch divided by its size, also under DDP
(each rank's sum is scaled so that DDP's gradient average equals the global mean).
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import random
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from sensitune.engine.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_trainable_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from sensitune.engine.config import LEGACY_FROZEN_BN, NORM_STATS, TrainConfig
from sensitune.engine.evaluation import autocast_context, evaluate_model, logits_of

#: settings that may change between a run and its resumption (they do not change the math)
RESUME_FREE_KEYS = {"device", "num_workers", "progress", "tensorboard", "eval_batch_size", "data_root",
                    "checkpoint_every", "eval_every"}

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "images", "epoch_seconds", "images_per_s"]


class NonFiniteLossError(RuntimeError):
    """The loss or a trained tensor became NaN or infinite: training stopped at that step.

    No checkpoint ever holds a non-finite tensor (each is checked before it is written), so the
    one on disk, which the message names, is the last with finite weights. The CLI reports this
    in one line with exit code 2 (it almost always means a setting, such as the lr, is wrong).
    """


# -- devices and processes ------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA. Returns this process's rank and the world size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory: CUDA allocator peak on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_max_rss"}


# -- seeding and data order ------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SeededItems(Dataset):
    """Wraps a dataset so each item's random transform depends only on (seed, epoch, index)."""

    def __init__(self, data: Dataset, seed: int):
        self.data, self.seed, self.epoch = data, seed, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        s = _mix(self.seed, self.epoch, index)
        py_state = random.getstate()
        random.seed(s)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return self.data[index]
        finally:
            random.setstate(py_state)


class GlobalBatches(Sampler[list[int]]):
    """This rank's share of each global batch of one epoch, optionally skipping done batches."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool, info: DistInfo):
        if batch_size % info.world:
            raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by the "
                             f"number of processes {info.world}")
        self.n, self.batch_size, self.seed, self.drop_last, self.info = n, batch_size, seed, drop_last, info
        self.epoch, self.skip = 0, 0

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0xDA7A))
        order = torch.randperm(self.n, generator=g).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        # a partial last batch is dropped when asked, or when it cannot give every rank an item
        if batches and len(batches[-1]) < self.batch_size and (self.drop_last or len(batches[-1]) < self.info.world):
            batches.pop()
        return batches

    def __len__(self) -> int:
        return len(self.global_batches()) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        w, r = self.info.world, self.info.rank
        for batch in self.global_batches()[self.skip:]:
            # contiguous equal-as-possible chunks, one per rank
            bounds = [round(i * len(batch) / w) for i in range(w + 1)]
            yield batch[bounds[r]:bounds[r + 1]]


# -- optimiser and schedule --------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float,
                 no_decay: Callable[[str, nn.Parameter], bool] | None = None,
                 head: Callable[[str, nn.Parameter], bool] | None = None,
                 head_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices and undecayed 1-D tensors (biases, norms, sparse values);
    with ``head_lr`` the tensors ``head(name, param)`` names form their own groups at that lr.

    ``no_decay(name, param)`` may name more tensors to exempt (e.g. roles from a Plan).
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or (no_decay is not None and no_decay(name, p))
        is_head = head_lr is not None and head is not None and head(name, p)
        buckets.setdefault((is_head, exempt), []).append(p)
    groups = []
    for is_head in (False, True):
        for exempt in (False, True):
            params = buckets.get((is_head, exempt))
            if params:
                group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if exempt else weight_decay}
                if is_head:
                    group["lr"] = head_lr
                groups.append(group)
    return groups


def stat_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every norm layer that keeps running statistics (BatchNorm and the like)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def frozen_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Norm layers with running statistics none of whose own parameters train.

    "Own" includes what apply_plan registers on the layer (a sparse ``weight_delta``). This is
    the set ``norm_stats: pretrained-if-frozen`` (sensitune 0.1's rule) keeps in eval mode.
    """
    return [m for m in stat_norm_layers(model) if not any(p.requires_grad for p in m.parameters(recurse=False))]


def pretrained_stat_layers(model: nn.Module, norm_stats: str) -> list[nn.Module]:
    """The norm layers that normalise with their pretrained statistics during training under ``norm_stats``."""
    if norm_stats == "pretrained":
        return stat_norm_layers(model)
    if norm_stats == "pretrained-if-frozen":
        return frozen_norm_layers(model)
    if norm_stats == "batch":
        return []
    raise ValueError(f"norm_stats={norm_stats!r} is invalid: choose one of {NORM_STATS}")


def set_train_mode(net: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """``net.train()``, then the ``frozen_norms`` back to eval mode (pretrained statistics)."""
    net.train()
    for m in frozen_norms:
        m.eval()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step linear warm-up from ``warmup_lr`` to ``lr``, then cosine down to ``min_lr``."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # its "no effect" warning for a 1-step cosine is noise here
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                                 warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    finally:
        timm_log.setLevel(level)


def schedule_lr(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Closed form of :func:`make_scheduler`'s learning rate at optimizer step ``step`` (0-based)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if step < warmup:
        return cfg.warmup_lr + step * (cfg.lr - cfg.warmup_lr) / warmup
    t, span = step - warmup, max(1, total - warmup)
    if t >= span:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / span))


# -- bookkeeping -------------------------------------------------------------------------------
#: settings added after the first checkpoints were written, with the value that reproduces how
#: those runs trained: an old checkpoint lacking the key resumes under that value
LEGACY_DEFAULTS: dict[str, Any] = {"head_init": "default", "head_lr": None}


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings in today's keys: a missing key gets the value its run trained
    under (``LEGACY_DEFAULTS``); ``frozen_bn`` (0.1) becomes the ``norm_stats`` it meant, and a
    checkpoint older than both trained every norm layer on batch statistics."""
    out = {**LEGACY_DEFAULTS, **saved}
    if "norm_stats" not in out:
        out["norm_stats"] = LEGACY_FROZEN_BN[out.pop("frozen_bn", "train")]
    out.pop("frozen_bn", None)
    return out


#: settings ``TrainConfig.to_dict`` leaves out while empty (so runs made before they existed compare equal)
OMITTED_WHEN_EMPTY = ("score_options",)


def config_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS}


def settings_diff(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (was, now)}`` for every setting that changes the math and differs between a
    saved run's settings (a checkpoint's or results.json's) and ``cfg``."""
    was, now = saved_settings(saved), config_fingerprint(cfg)
    for key in OMITTED_WHEN_EMPTY:  # absent on either side means empty, so a change either way shows
        was.setdefault(key, {})
        now.setdefault(key, {})
    return {k: (was.get(k), v) for k, v in now.items() if was.get(k) != v}


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """``lr: was 0.001, now 0.002, epochs: ...`` for a refusal message."""
    return ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    columns = list(METRIC_COLUMNS)
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


@contextmanager
def _deterministic(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=True)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    global_step: int
    steps_per_epoch: int
    train_seconds: float
    images_per_s: float
    peak: dict[str, float]
    resumed_from: dict[str, int] | None = None
    last_eval: dict[str, Any] | None = field(default=None)


def divergence(history: list[dict[str, Any]]) -> str | None:
    """Why a finished run counts as diverged, or None: its last epoch's training loss is not
    finite, or ends above where training started (the loss of the first batch, before any
    update; the first epoch's mean for runs that did not record it). Such a run is a failure
    to flag, never a result to select."""
    if not history:
        return None
    start = history[0].get("start_loss", history[0]["train_loss"])
    end = history[-1]["train_loss"]
    if not math.isfinite(end):
        return f"training loss is {end}"
    if end > start:
        if end - start < 1e-3 * abs(start):  # "1.792, above 1.792" reads as a contradiction: show the digits
            return (f"training loss ended at {end:.6g}, above where it started ({start:.6g}): it learned "
                    f"nothing (a run collapsed to constant predictions ends at the label entropy, ln C "
                    f"for balanced classes)")
        return f"training loss ended at {end:.4g}, above where it started ({start:.4g})"
    return None


# -- the loop: a training state and the named steps that change it ------------------------------
def _fresh_sums() -> dict[str, Any]:
    """The running sums of an epoch in progress (a checkpoint saves them mid-epoch)."""
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}


@dataclass(frozen=True)
class FitEnv:
    """Where and how ``fit`` runs; fixed for the whole run (settings, process, device, output)."""
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    out: Path | None
    log: Callable[[str], None]
    eval_data: Dataset | None = None
    writer: Any = None  # tensorboard's SummaryWriter on rank 0, when asked for

    @property
    def ckpt_path(self) -> Path | None:
        return self.out / "checkpoints" / "last.pt" if self.out is not None else None


@dataclass
class TrainState:
    """Everything ``fit`` trains and moves forward: the model (``net`` is its DDP wrapper under
    torchrun, else the model itself), the optimizer, schedule and grad scaler, the seeded data
    order, the position (``start_*`` where this call began, ``global_step`` now), the history, the
    sums of the epoch in progress and the last checkpoint and evaluation. Each step below is a
    function of this state and the :class:`FitEnv`, so the loop reads as its stages."""
    model: nn.Module
    net: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    frozen_norms: list[nn.Module]
    items: SeededItems
    sampler: GlobalBatches
    steps_per_epoch: int
    start_epoch: int = 0
    start_batch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, Any] = field(default_factory=_fresh_sums)
    resumed_from: dict[str, int] | None = None
    saved_at: dict[str, int] | None = None  # the checkpoint on disk (finite by construction)
    last_eval: dict[str, Any] | None = None
    images_total: int = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def fit(
    model: nn.Module,
    train_data: Dataset,
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    eval_data: Dataset | None = None,
    resume: bool = False,
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
    head: Callable[[str, nn.Parameter], bool] | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``train_data`` (items ``(image, label)``).

    ``cfg.batch_size`` is the global batch (split across processes under torchrun). With
    ``out_dir``, rank 0 writes ``checkpoints/last.pt`` after every epoch (and every
    ``cfg.checkpoint_every`` steps) and ``metrics.csv``; ``resume=True`` continues from that
    checkpoint. Raises :class:`NonFiniteLossError` on a NaN/inf loss or trained weight (checked at
    every step) and never writes a checkpoint holding one, so the last checkpoint stays usable.
    ``head(name, param)`` names the classification head's tensors, which train at ``cfg.head_lr``
    when it is set. ``cfg.norm_stats`` decides which norm layers stay in
    eval mode throughout (:func:`pretrained_stat_layers`; by default all of them).
    """
    env = _setup_env(cfg, out_dir, eval_data, log)
    state = _setup_state(model, train_data, env, no_decay, head)
    if resume and env.ckpt_path is not None and env.ckpt_path.is_file():
        _resume(state, env)
    if env.info.world > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        state.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    env = replace(env, writer=_tensorboard(env.out, cfg, env.info, log))
    t_start = time.perf_counter()
    with _deterministic(cfg.deterministic and env.device.type == "cpu"):
        for epoch in range(state.start_epoch, cfg.epochs):
            _run_epoch(state, env, epoch)
    return _finish(state, env, t_start)


def _setup_env(cfg: TrainConfig, out_dir: str | Path | None, eval_data: Dataset | None,
               log: Callable[[str], None]) -> FitEnv:
    """Validate the settings, join the process group and pick this process's device."""
    cfg.validate()
    info = distributed(cfg.device)
    device = resolve_device(cfg.device, info.local_rank)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (it relies on a grad scaler); use bf16 on CPU")
    return FitEnv(cfg=cfg, info=info, device=device, out=Path(out_dir) if out_dir is not None else None,
                  log=log, eval_data=eval_data)


def _setup_state(model: nn.Module, train_data: Dataset, env: FitEnv,
                 no_decay: Callable[[str, nn.Parameter], bool] | None,
                 head: Callable[[str, nn.Parameter], bool] | None) -> TrainState:
    """The state at step 0: model on its device, seeded data order, optimizer, schedule, scaler."""
    cfg = env.cfg
    model.to(env.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter (nothing has requires_grad): the plan trains nothing")
    seed_everything(cfg.seed)
    items = SeededItems(train_data, cfg.seed)
    sampler = GlobalBatches(len(items), cfg.batch_size, cfg.seed, cfg.drop_last, env.info)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(items)} training samples give no full batch of {cfg.batch_size}; "
                         f"lower batch_size or set drop_last: false")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, no_decay, head, cfg.head_lr), lr=cfg.lr,
                                  betas=cfg.betas, eps=cfg.eps)
    frozen_norms = pretrained_stat_layers(model, cfg.norm_stats)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=cfg.label_smoothing)
    return TrainState(model=model, net=model, trainable=trainable, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, criterion=criterion, frozen_norms=frozen_norms, items=items, sampler=sampler,
                      steps_per_epoch=steps_per_epoch)


def _resume(state: TrainState, env: FitEnv) -> None:
    """Load the interrupted run's checkpoint into the model, optimizer, scheduler, scaler, RNGs and
    position. Refuses changed settings (naming the ``--set`` that continues the run) and a
    checkpoint with non-finite weights."""
    ckpt_path = env.ckpt_path
    ckpt = load_checkpoint(ckpt_path)
    diff = settings_diff(ckpt["config"], env.cfg)
    if diff:
        raise ValueError(f"cannot resume {ckpt_path}: settings differ from the interrupted run "
                         + describe_diff(diff)
                         + "; to continue it, pass its settings: "
                         + " ".join(f"--set {k}={'null' if a is None else a}" for k, (a, _) in diff.items()))
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise ValueError(f"cannot resume {ckpt_path}: it holds non-finite weights ({len(bad)} tensor(s), e.g. "
                         f"{bad[0]}); start the run again with --overwrite (and a lower lr)")
    load_trainable_state(state.model, ckpt["model"], str(ckpt_path))
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["step_in_epoch"]:
        set_rng_state(ckpt["rng"])
    state.start_epoch, state.start_batch, state.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
    state.history, state.partial = list(ckpt["history"]), dict(ckpt["partial"])
    state.resumed_from = {"epoch": state.start_epoch, "step_in_epoch": state.start_batch,
                          "global_step": state.global_step}
    state.saved_at = dict(state.resumed_from)
    if env.info.is_main:
        env.log(f"resuming from {ckpt_path}: epoch {state.start_epoch + 1}, step {state.start_batch} of "
                f"{state.steps_per_epoch}")


def _run_epoch(state: TrainState, env: FitEnv, epoch: int) -> None:
    """One epoch (or the rest of a resumed one): its seeded batches, each a step, mid-epoch
    checkpoints, then the epoch's row, evaluation and checkpoint."""
    cfg, info = env.cfg, env.info
    skip = state.start_batch if epoch == state.start_epoch else 0
    if skip == 0:
        seed_everything(_mix(cfg.seed, epoch, info.rank, 0x5EED))
        state.partial = _fresh_sums()
    state.items.epoch = state.sampler.epoch = epoch
    state.sampler.skip = skip
    global_sizes = [len(b) for b in state.sampler.global_batches()][skip:]
    # own generator: creating the iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(state.items, batch_sampler=state.sampler, generator=torch.Generator().manual_seed(epoch),
                        num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda")
    set_train_mode(state.net, state.frozen_norms)  # every epoch: an evaluation may have switched modes
    bar = tqdm(total=state.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
    t_epoch = time.perf_counter()
    for k, (images, labels) in enumerate(loader):
        step_in_epoch = skip + k
        loss_value, n = _train_step(state, env, images, labels, global_sizes[k], epoch, step_in_epoch)
        if info.is_main:
            _show_step(state, env, bar, loss_value / n, time.perf_counter() - t_epoch)
        if (cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0
                and step_in_epoch + 1 < state.steps_per_epoch):
            state.partial["seconds"] += time.perf_counter() - t_epoch
            t_epoch = time.perf_counter()
            _checkpoint(state, env, epoch, step_in_epoch + 1)
    bar.close()
    state.partial["seconds"] += time.perf_counter() - t_epoch
    _end_epoch(state, env, epoch)


def _train_step(state: TrainState, env: FitEnv, images: torch.Tensor, labels: torch.Tensor, global_size: int,
                epoch: int, step_in_epoch: int) -> tuple[float, int]:
    """One optimizer step on this rank's share of a global batch of ``global_size`` items;
    returns (this rank's summed loss, its item count)."""
    cfg, info, device = env.cfg, env.info, env.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    state.scheduler.step_update(state.global_step)
    with autocast_context(device, cfg.precision):
        logits = logits_of(state.net(images))
    loss_sum = state.criterion(logits.float(), labels)
    loss_value = loss_sum.item()  # the step's one host sync for the loss
    if not _all_ranks_finite(loss_value, info, device):
        raise _stop(state, env, f"training loss ({loss_value})", _step_name(state, epoch, step_in_epoch))
    scale = info.world / global_size
    _update(state, cfg, loss_sum * scale)
    # the step is accepted only with finite weights (a finite gradient can still blow a
    # weight up, e.g. through weight decay at a huge lr); max |w| is finite iff all are,
    # and DDP keeps every rank's weights equal, so no rank is left waiting
    if not torch.isfinite(_max_abs(state.trainable)).item():
        bad = nonfinite_tensors(dict(_unwrap(state.net).named_parameters()), only_trainable=True)
        raise _stop(state, env, f"weights in {len(bad)} of {len(state.trainable)} trained tensor(s) (e.g. "
                    f"{bad[0] if bad else '?'}) after the update", _step_name(state, epoch, step_in_epoch))
    state.global_step += 1
    partial = state.partial
    with torch.no_grad():
        if state.global_step == 1:  # the loss before any update: where training started
            partial["start_loss"] = loss_value / labels.numel()
        partial["loss"] += loss_value
        partial["correct"] += (logits.argmax(1) == labels).sum().item()
        partial["count"] += labels.numel()
    state.images_total += labels.numel() * info.world
    return loss_value, labels.numel()


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |x| over all the tensors as one device scalar (NaN if any is NaN): no host sync.
    torch >= 2.6 computes it in fused kernels (get_total_norm); older torch one norm per tensor."""
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(tensors, norm_type=math.inf)
    if not tensors:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(t.detach(), math.inf) for t in tensors]  # exact in any dtype
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    return torch.stack([n.to(device=norms[0].device, dtype=dtype) for n in norms]).amax()


def _update(state: TrainState, cfg: TrainConfig, loss: torch.Tensor) -> None:
    """Backward, optional gradient clipping, optimizer step (through the grad scaler under fp16)."""
    scaler, optimizer = state.scaler, state.optimizer
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(state.trainable, cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _show_step(state: TrainState, env: FitEnv, bar: Any, step_loss: float, epoch_elapsed: float) -> None:
    """Rank 0's progress bar and per-step tensorboard scalars."""
    partial = state.partial
    el = partial["seconds"] + epoch_elapsed
    bar.update(1)
    bar.set_postfix(loss=f"{partial['loss'] / partial['count']:.3f}",
                    acc=f"{100 * partial['correct'] / partial['count']:.1f}",
                    img_s=f"{partial['count'] * env.info.world / max(el, 1e-9):.1f}", refresh=False)
    if env.writer is not None:
        env.writer.add_scalar("train/loss_step", step_loss, state.global_step)
        env.writer.add_scalar("train/lr", state.lr, state.global_step)


def _end_epoch(state: TrainState, env: FitEnv, epoch: int) -> None:
    """The finished epoch's metrics row (with an evaluation when due), its log line, tensorboard
    scalars and metrics.csv, then the end-of-epoch checkpoint."""
    cfg, info = env.cfg, env.info
    row = _epoch_row(state.partial, info, epoch, state.global_step, state.lr)
    if env.eval_data is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
        if info.is_main:
            state.last_eval = evaluate_model(state.model, env.eval_data,
                                             batch_size=cfg.eval_batch_size or cfg.batch_size, device=env.device,
                                             precision=cfg.precision, num_workers=cfg.num_workers)
            row["eval_loss"], row["eval_acc"] = state.last_eval["loss"], state.last_eval["accuracy"]
        if info.world > 1:
            dist.barrier()
    state.history.append(row)
    if info.is_main:
        env.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.1f}% "
                f"lr {row['lr']:.3g} {row['images_per_s']:.1f} img/s"
                + (f" eval acc {row['eval_acc']:.1f}%" if "eval_acc" in row else ""))
        if env.writer is not None:
            for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "images_per_s"):
                if key in row:
                    env.writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
        if env.out is not None:
            write_metrics_csv(env.out / "metrics.csv", state.history)
    state.partial = _fresh_sums()
    _checkpoint(state, env, epoch + 1, 0)


def _checkpoint(state: TrainState, env: FitEnv, epoch: int, step_in_epoch: int) -> None:
    """Write the state at (epoch, step in epoch) to ``checkpoints/last.pt`` (rank 0), refusing
    non-finite weights so the checkpoint on disk always holds finite ones."""
    if env.ckpt_path is None:
        return
    net = _unwrap(state.net)
    # every rank holds the same weights (DDP), so every rank agrees on this check
    bad = nonfinite_tensors(dict(net.named_parameters()), only_trainable=True) + \
        nonfinite_tensors(dict(net.named_buffers()))
    if bad:
        raise _stop(state, env, f"weights in {len(bad)} trained tensor(s) (e.g. {bad[0]})",
                    f"when saving the checkpoint after global step {state.global_step} (not written)")
    if not env.info.is_main:
        return
    save_checkpoint(env.ckpt_path, model=trainable_state(net), optimizer=state.optimizer.state_dict(),
                    scheduler=state.scheduler.state_dict(),
                    scaler=state.scaler.state_dict() if state.scaler else None,
                    rng=rng_state(), epoch=epoch, step_in_epoch=step_in_epoch, global_step=state.global_step,
                    history=state.history, partial=state.partial, config=config_fingerprint(env.cfg),
                    world=env.info.world)
    state.saved_at = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": state.global_step}


def _step_name(state: TrainState, epoch: int, step_in_epoch: int) -> str:
    return f"at epoch {epoch + 1}, step {step_in_epoch + 1} (global step {state.global_step + 1})"


def _stop(state: TrainState, env: FitEnv, what: str, at: str) -> NonFiniteLossError:
    """The one-line error for a non-finite ``what`` found ``at`` a point, naming the checkpoint kept."""
    saved_at = state.saved_at
    if env.ckpt_path is None:
        where = "nothing was saved (no output folder)"
    elif saved_at is None:
        where = f"no checkpoint had been written yet, so {env.out} holds no trained weights"
    else:
        e, k = saved_at["epoch"], saved_at["step_in_epoch"]
        pos = f"the end of epoch {e}" if k == 0 else f"step {k} of epoch {e + 1}"
        where = (f"the last checkpoint with finite weights is kept: {env.ckpt_path} (after global step "
                 f"{saved_at['global_step']}, {pos})")
    return NonFiniteLossError(
        f"training stopped: non-finite {what} {at}, lr {state.lr:.3g}; {where}. "
        f"Try a lower lr, grad_clip, or precision fp32.")


def _finish(state: TrainState, env: FitEnv, t_start: float) -> FitResult:
    """Close tensorboard, wait for every rank, and sum the run up."""
    if env.writer is not None:
        env.writer.close()
    seconds = time.perf_counter() - t_start
    if env.info.world > 1:
        dist.barrier()
    return FitResult(history=state.history, global_step=state.global_step, steps_per_epoch=state.steps_per_epoch,
                     train_seconds=seconds, images_per_s=state.images_total / max(seconds, 1e-9),
                     peak=peak_memory_mb(env.device), resumed_from=state.resumed_from, last_eval=state.last_eval)


def _epoch_row(partial: dict[str, Any], info: DistInfo, epoch: int, global_step: int, lr: float) -> dict[str, Any]:
    """The metrics row of a finished epoch, its sums reduced over every rank."""
    totals = torch.tensor([partial["loss"], partial["correct"], partial["count"]], dtype=torch.float64)
    if info.world > 1:
        dist.all_reduce(totals)
    loss_e, correct_e, count_e = totals.tolist()
    return {
        "epoch": epoch + 1, "step": global_step, "lr": lr,
        "train_loss": loss_e / count_e, "train_acc": 100 * correct_e / count_e, "images": int(count_e),
        "epoch_seconds": round(partial["seconds"], 3),
        **({"start_loss": partial["start_loss"]} if "start_loss" in partial else {}),
        "images_per_s": round(count_e / max(partial["seconds"], 1e-9), 2),
    }


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _all_ranks_finite(loss: float, info: DistInfo, device: torch.device) -> bool:
    """Whether every rank's loss is finite (checked before the backward pass touches anything)."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device if device.type == "cuda" else "cpu")
    if info.world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def nonfinite_tensors(tensors: dict[str, torch.Tensor], only_trainable: bool = False) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (``only_trainable``:
    among those with ``requires_grad``)."""
    return [n for n, t in tensors.items()
            if t.is_floating_point() and (not only_trainable or t.requires_grad) and not torch.isfinite(t).all()]


def _tensorboard(out: Path | None, cfg: TrainConfig, info: DistInfo, log: Callable[[str], None]):
    if not (cfg.tensorboard and info.is_main and out is not None):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard: not installed (pip install tensorboard); continuing without it")
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))
