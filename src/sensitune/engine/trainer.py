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
import io
import logging
import math
import os
import random
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
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


def config_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS}


def settings_diff(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (was, now)}`` for every setting that changes the math and differs between a
    saved run's settings (a checkpoint's or results.json's) and ``cfg``."""
    was = saved_settings(saved)
    return {k: (was.get(k), v) for k, v in config_fingerprint(cfg).items() if was.get(k) != v}


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
        return f"training loss ended at {end:.4g}, above where it started ({start:.4g})"
    return None


# -- the loop ----------------------------------------------------------------------------------
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
    cfg.validate()
    info = distributed(cfg.device)
    device = resolve_device(cfg.device, info.local_rank)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (it relies on a grad scaler); use bf16 on CPU")
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoints" / "last.pt" if out is not None else None

    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter (nothing has requires_grad): the plan trains nothing")
    seed_everything(cfg.seed)
    items = SeededItems(train_data, cfg.seed)
    sampler = GlobalBatches(len(items), cfg.batch_size, cfg.seed, cfg.drop_last, info)
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

    start_epoch, start_batch, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
    resumed_from = None
    saved_at: dict[str, int] | None = None  # the checkpoint on disk (finite by construction)
    if resume and ckpt_path is not None and ckpt_path.is_file():
        start_epoch, start_batch, global_step, history, partial = _resume(
            ckpt_path, cfg, model, optimizer, scheduler, scaler)
        resumed_from = {"epoch": start_epoch, "step_in_epoch": start_batch, "global_step": global_step}
        saved_at = dict(resumed_from)
        if info.is_main:
            log(f"resuming from {ckpt_path}: epoch {start_epoch + 1}, step {start_batch} of {steps_per_epoch}")

    def stop(what: str, at: str) -> NonFiniteLossError:
        """The one-line error for a non-finite ``what`` found ``at`` a point, naming the checkpoint kept."""
        if ckpt_path is None:
            where = "nothing was saved (no output folder)"
        elif saved_at is None:
            where = f"no checkpoint had been written yet, so {out} holds no trained weights"
        else:
            e, k = saved_at["epoch"], saved_at["step_in_epoch"]
            pos = f"the end of epoch {e}" if k == 0 else f"step {k} of epoch {e + 1}"
            where = (f"the last checkpoint with finite weights is kept: {ckpt_path} (after global step "
                     f"{saved_at['global_step']}, {pos})")
        return NonFiniteLossError(
            f"training stopped: non-finite {what} {at}, lr {optimizer.param_groups[0]['lr']:.3g}; {where}. "
            f"Try a lower lr, grad_clip, or precision fp32.")

    def step_name(epoch: int, step_in_epoch: int) -> str:
        return f"at epoch {epoch + 1}, step {step_in_epoch + 1} (global step {global_step + 1})"

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        nonlocal saved_at
        if ckpt_path is None:
            return
        # every rank holds the same weights (DDP), so every rank agrees on this check
        bad = nonfinite_tensors(dict(_unwrap(net).named_parameters()), only_trainable=True) + \
            nonfinite_tensors(dict(_unwrap(net).named_buffers()))
        if bad:
            raise stop(f"weights in {len(bad)} trained tensor(s) (e.g. {bad[0]})",
                       f"when saving the checkpoint after global step {global_step} (not written)")
        if not info.is_main:
            return
        save_checkpoint(ckpt_path, model=trainable_state(_unwrap(net)), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                        rng=rng_state(), epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                        history=history, partial=partial, config=config_fingerprint(cfg), world=info.world)
        saved_at = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step}

    net: nn.Module = model
    if info.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = _tensorboard(out, cfg, info, log)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    last_eval = None
    t_start = time.perf_counter()
    images_total = 0
    with _deterministic(cfg.deterministic and device.type == "cpu"):
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_batch if epoch == start_epoch else 0
            if skip == 0:
                seed_everything(_mix(cfg.seed, epoch, info.rank, 0x5EED))
                partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
            items.epoch = sampler.epoch = epoch
            sampler.skip = skip
            global_sizes = [len(b) for b in sampler.global_batches()][skip:]
            # own generator: creating the iterator must not draw from the global RNG (exact resume)
            loader = DataLoader(items, batch_sampler=sampler, generator=torch.Generator().manual_seed(epoch),
                                **loader_kw)
            set_train_mode(net, frozen_norms)  # every epoch: an evaluation may have switched modes
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
            t_epoch = time.perf_counter()
            for k, (images, labels) in enumerate(loader):
                step_in_epoch = skip + k
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                scheduler.step_update(global_step)
                with autocast_context(device, cfg.precision):
                    logits = logits_of(net(images))
                loss_sum = criterion(logits.float(), labels)
                loss_value = loss_sum.item()  # the step's one host sync for the loss
                if not _all_ranks_finite(loss_value, info, device):
                    raise stop(f"training loss ({loss_value})", step_name(epoch, step_in_epoch))
                scale = info.world / global_sizes[k]
                loss = loss_sum * scale
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # the step is accepted only with finite weights (a finite gradient can still blow a
                # weight up, e.g. through weight decay at a huge lr); max |w| is finite iff all are,
                # and DDP keeps every rank's weights equal, so no rank is left waiting
                if not torch.isfinite(nn.utils.get_total_norm(trainable, norm_type=math.inf)).item():
                    bad = nonfinite_tensors(dict(_unwrap(net).named_parameters()), only_trainable=True)
                    raise stop(f"weights in {len(bad)} of {len(trainable)} trained tensor(s) (e.g. "
                               f"{bad[0] if bad else '?'}) after the update", step_name(epoch, step_in_epoch))
                global_step += 1
                with torch.no_grad():
                    if global_step == 1:  # the loss before any update: where training started
                        partial["start_loss"] = loss_value / labels.numel()
                    partial["loss"] += loss_value
                    partial["correct"] += (logits.argmax(1) == labels).sum().item()
                    partial["count"] += labels.numel()
                images_total += labels.numel() * info.world
                if info.is_main:
                    el = partial["seconds"] + time.perf_counter() - t_epoch
                    bar.update(1)
                    bar.set_postfix(loss=f"{partial['loss'] / partial['count']:.3f}",
                                    acc=f"{100 * partial['correct'] / partial['count']:.1f}",
                                    img_s=f"{partial['count'] * info.world / max(el, 1e-9):.1f}", refresh=False)
                    if writer is not None:
                        writer.add_scalar("train/loss_step", loss_value / labels.numel(), global_step)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step_in_epoch + 1 < steps_per_epoch:
                    partial["seconds"] += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    checkpoint(epoch, step_in_epoch + 1)
            bar.close()
            partial["seconds"] += time.perf_counter() - t_epoch
            row = _epoch_row(partial, info, epoch, global_step, optimizer.param_groups[0]["lr"])
            if eval_data is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                if info.is_main:
                    last_eval = evaluate_model(model, eval_data, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                               device=device, precision=cfg.precision, num_workers=cfg.num_workers)
                    row["eval_loss"], row["eval_acc"] = last_eval["loss"], last_eval["accuracy"]
                if info.world > 1:
                    dist.barrier()
            history.append(row)
            if info.is_main:
                log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.1f}% "
                    f"lr {row['lr']:.3g} {row['images_per_s']:.1f} img/s"
                    + (f" eval acc {row['eval_acc']:.1f}%" if "eval_acc" in row else ""))
                if writer is not None:
                    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "images_per_s"):
                        if key in row:
                            writer.add_scalar(key.replace("_", "/", 1), row[key], epoch + 1)
                if out is not None:
                    write_metrics_csv(out / "metrics.csv", history)
            partial = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
            checkpoint(epoch + 1, 0)
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - t_start
    if info.world > 1:
        dist.barrier()
    return FitResult(history=history, global_step=global_step, steps_per_epoch=steps_per_epoch,
                     train_seconds=seconds, images_per_s=images_total / max(seconds, 1e-9),
                     peak=peak_memory_mb(device), resumed_from=resumed_from, last_eval=last_eval)


def _resume(ckpt_path: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: CosineLRScheduler, scaler: Any) -> tuple[int, int, int, list[dict[str, Any]], dict[str, Any]]:
    """Load the interrupted run's checkpoint into the model, optimizer, scheduler, scaler and RNGs;
    returns (epoch, step in epoch, global step, history, partial epoch sums). Refuses changed
    settings (naming the ``--set`` that continues the run) and a checkpoint with non-finite weights."""
    ckpt = load_checkpoint(ckpt_path)
    diff = settings_diff(ckpt["config"], cfg)
    if diff:
        raise ValueError(f"cannot resume {ckpt_path}: settings differ from the interrupted run "
                         + describe_diff(diff)
                         + "; to continue it, pass its settings: "
                         + " ".join(f"--set {k}={'null' if a is None else a}" for k, (a, _) in diff.items()))
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise ValueError(f"cannot resume {ckpt_path}: it holds non-finite weights ({len(bad)} tensor(s), e.g. "
                         f"{bad[0]}); start the run again with --overwrite (and a lower lr)")
    load_trainable_state(model, ckpt["model"], str(ckpt_path))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["step_in_epoch"]:
        set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"], list(ckpt["history"]), dict(ckpt["partial"])


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
