"""What every data-driven scorer shares: which tensors, which batches, which mode, and a clean exit.

Decisions made here (and why):

* **Which tensors.** Only :func:`sensitune.models.tunable_tensors` decides what a tensor is.
  The default scores kinds ``matrix``, ``vector`` and ``other``: everything but the head and the
  cls/position/patch embeddings, as the SPT reference does. Only scored tensors require grad
  while scoring, so autograd never spends time on the rest (their gradients are not needed;
  the scored gradients are mathematically unchanged).
* **Gradients** are taken with ``torch.autograd.grad``, never written into ``.grad``, so a
  user's accumulated gradients survive scoring untouched. A hook on each scored tensor folds
  its gradient into the accumulator the moment autograd produces it
  (:func:`consuming_gradients`), so a full set of gradients never coexists with the
  accumulators: the peak is activations + accumulators, not activations + gradients +
  accumulators.
* **Mode.** The model runs in train mode (dropout/drop-path active, as both references do),
  except BatchNorm, which by default runs in *eval* mode: it then normalises with the
  pretrained running statistics, so (1) the running statistics cannot change, (2) a sample's
  gradient does not depend on which other samples share its batch, and (3) the scores do not
  depend on the batch size or on how batches are spread over processes. ``batchnorm="train"``
  (batch statistics, as the references' ``model.train()``) is available; the running
  statistics are then restored afterwards.
* **Randomness.** Each batch runs under ``torch.manual_seed(f(seed, batch index))`` inside
  ``fork_rng``: scores are reproducible, the caller's RNG stream is untouched, and drop-path
  masks do not depend on the number of processes.
* **Several processes.** Under ``torch.distributed`` the *batches* (each a fixed list of
  sample indices, identical on every rank) are dealt round-robin to ranks: batch ``b`` runs on
  rank ``b % world``. Every batch therefore has exactly the gradient it has in a one-process
  run (whole batch, same BN statistics, same seed); the per-rank sums (of squares, or of
  gradients) are all-reduced once at the end. This needs one all-reduce per run instead of
  one per batch, and also suits losses that couple the samples of a batch (SupCon).
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitune.models import kept_training_flags, tunable_tensors

DEFAULT_KINDS = ("matrix", "vector", "other")
KINDS = ("matrix", "vector", "embedding", "head", "other")


# --------------------------------------------------------------------------- which tensors
def scored_parameters(model: nn.Module, kinds: Sequence[str] = DEFAULT_KINDS, include: str | None = None,
                      exclude: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the tensors to score, in registration order.

    ``kinds`` filters by :func:`tunable_tensors` kind; ``include``/``exclude`` are regular
    expressions searched in the parameter name (``include`` keeps only matches).
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown tensor kind(s) {bad}: choose from {', '.join(KINDS)}")
    inc = _regex(include, "include")
    exc = _regex(exclude, "exclude")
    params = dict(model.named_parameters())
    infos = tunable_tensors(model)
    chosen = [(i.name, params[i.name]) for i in infos
              if i.kind in kinds and (inc is None or inc.search(i.name)) and not (exc and exc.search(i.name))]
    if not chosen:
        present = sorted({i.kind for i in infos})
        raise ValueError(f"nothing to score: no parameter of {type(model).__name__} matches kinds={list(kinds)}"
                         f"{f', include={include!r}' if include else ''}{f', exclude={exclude!r}' if exclude else ''}"
                         f" (the model has {len(infos)} parameters of kinds {present})")
    return chosen


def _regex(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what}={pattern!r} is not a valid regular expression ({exc})") from None


# --------------------------------------------------------------------------- model state
@contextlib.contextmanager
def scoring_mode(model: nn.Module, scored: Sequence[nn.Parameter], *, train_mode: bool = True,
                 batchnorm: str = "eval") -> Iterator[None]:
    """Put ``model`` in scoring mode and restore it *exactly* on exit (even on error).

    Restored: every module's ``training`` flag, every parameter's ``requires_grad`` and
    ``.grad`` object, and every buffer's values (BN running statistics, counters).
    """
    if batchnorm not in ("eval", "train"):
        raise ValueError(f"batchnorm must be 'eval' or 'train', got {batchnorm!r}")
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    scored_ids = {id(p) for p in scored}
    with kept_training_flags(model):
        try:
            model.train(train_mode)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.train(batchnorm == "train")
            for p in params:
                p.requires_grad_(id(p) in scored_ids)
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, req, g in zip(params, requires, grads):
                p.requires_grad_(req)
                p.grad = g


@contextlib.contextmanager
def consuming_gradients(params: Sequence[torch.Tensor], acc: Sequence[torch.Tensor],
                        update: Callable[[torch.Tensor, torch.Tensor], Any]) -> Iterator[None]:
    """Inside, ``update(acc[i], grad)`` consumes each gradient of ``params[i]`` as autograd makes it.

    The hook hands autograd a zero-stride placeholder instead of the gradient, so
    ``torch.autograd.grad`` returns placeholders and each real gradient is freed as soon as
    it is folded in. Registered last, the hook sees the gradient after any hook of the
    user's (as ``torch.autograd.grad`` would return it); it is removed on exit, even on error.
    """
    handles = []
    try:
        for p, a in zip(params, acc):
            placeholder = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)

            def hook(grad: torch.Tensor, a: torch.Tensor = a, placeholder: torch.Tensor = placeholder) -> torch.Tensor:
                update(a, grad.to(a.dtype))
                return placeholder

            handles.append(p.register_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def rng_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def batch_seed(seed: int, batch: int) -> int:
    return (int(seed) * 1_000_003 + batch) % (2**63 - 1)


# --------------------------------------------------------------------------- data
@dataclass
class Source:
    """The dataset and loading settings a scorer reads from (a DataLoader is unpacked into this)."""

    dataset: Dataset
    batch_size: int
    num_workers: int = 0
    collate_fn: Callable | None = None


def as_source(data: Dataset | DataLoader, batch_size: int | None, num_workers: int | None) -> Source:
    """Accept a Dataset or a DataLoader.

    A DataLoader contributes its dataset, ``batch_size``, ``num_workers`` and ``collate_fn``;
    its sampler is not used because scoring takes samples in list order (the references do,
    and it makes the batches identical on every process).
    """
    if isinstance(data, DataLoader):
        if data.batch_size is None and batch_size is None:
            raise ValueError("the DataLoader has no fixed batch_size (custom batch_sampler); "
                             "pass its dataset and batch_size=... instead")
        bs = batch_size or data.batch_size
        return Source(data.dataset, bs, data.num_workers if num_workers is None else num_workers, data.collate_fn)
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    return Source(data, batch_size or 32, num_workers or 0, None)


def plan_batches(n_available: int, batch_size: int, batches: int | None, samples: int | None,
                 what: str) -> list[list[int]]:
    """Sample indices of each batch, in list order; warn when fewer samples exist than asked."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if n_available == 0:
        raise ValueError(f"no data: the dataset given to {what} scoring is empty")
    wanted = samples if samples is not None else (batch_size * batches if batches is not None else None)
    if wanted is not None:
        if wanted < 1:
            raise ValueError(f"samples/batches must ask for at least one sample, got {wanted}")
        if wanted > n_available:
            warnings.warn(f"{what} scoring asked for {wanted} samples but the dataset has only {n_available}: "
                          f"scoring with all {n_available}", stacklevel=3)
    n = n_available if wanted is None else min(wanted, n_available)
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def loader_for(source: Source, batches: list[list[int]], rank: int, world: int,
               dataset: Dataset | None = None) -> tuple[list[int], DataLoader]:
    """(global batch indices, loader) of this rank's batches: batch b runs on rank b % world."""
    mine = [b for b in range(len(batches)) if b % world == rank]
    kwargs: dict[str, Any] = {"batch_sampler": [batches[b] for b in mine], "num_workers": source.num_workers}
    if source.collate_fn is not None:
        kwargs["collate_fn"] = source.collate_fn
    return mine, DataLoader(dataset if dataset is not None else source.dataset, **kwargs)


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum tensors over processes in place (no-op in one process)."""
    _, world = distributed()
    if world == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def reduce_stats(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    all_reduce_([t])
    return t.tolist()


def check_finite(names: Sequence[str], tensors: Sequence[torch.Tensor], method: str) -> None:
    """Raise naming the tensors whose scores are NaN/inf: never hand back a silently wrong map."""
    bad = [n for n, t in zip(names, tensors) if not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FloatingPointError(f"{method} scoring produced non-finite gradients (NaN or inf) in {len(bad)} "
                                 f"tensor(s): {shown}. Check the inputs, the learning-rate-free loss and "
                                 f"the model weights for NaN/inf, or use float32.")


def check_loss(loss: torch.Tensor, batch: int, method: str) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{method} scoring: the loss of batch {batch} is {value}; "
                                 f"non-finite inputs, weights or labels?")
    return value


def progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    rank, _ = distributed()
    return tqdm(total=total, disable=not enabled or rank != 0, desc=desc, unit="batch", leave=False)


def acc_dtype(param: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 at least (half-precision models), float64 for float64 models."""
    return torch.promote_types(param.dtype, torch.float32)


def check_connected(loss: torch.Tensor, method: str) -> None:
    """The loss must depend on at least one scored tensor, else there is no gradient to score."""
    if not loss.requires_grad:
        raise ValueError(f"{method} scoring: none of the scored tensors takes part in the loss "
                         f"(check kinds/include/exclude; with loss='supcon' the head is not used)")
