"""SPT sensitivity: s = Σ_b (∂L_b/∂w)², a sum of squared *per-batch* gradients (spec spt.md §1).

L_b is the mean cross-entropy of batch b through the model's head (for SPT a freshly
initialised one: build the model with ``num_classes`` of the task). The gradient is fresh for
every batch and squared before it is added — the square of a sum would be a different,
batch-size dependent quantity. Defaults follow the reference: 16 batches of 32 images in list
order, no augmentation (the dataset's own transform is used as is).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitune.scoring import common
from sensitune.scoring.scoremap import ScoreMap
from sensitune.scoring.registry import Scorer, register


def sensitivity_scores(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int | None = None,
                       batches: int | None = 16, samples: int | None = None,
                       kinds: Sequence[str] = common.DEFAULT_KINDS, include: str | None = None,
                       exclude: str | None = None, train_mode: bool = True, batchnorm: str = "eval",
                       seed: int = 0, num_workers: int | None = None, progress: bool = False,
                       method: str = "sensitivity") -> ScoreMap:
    """Sum over batches of the squared gradient of each batch's mean cross-entropy.

    ``batches=None`` takes every sample; ``samples`` caps the sample count directly.
    Returns float32 scores on CPU; ``meta`` holds samples, batches and the mean loss.
    """
    source = common.as_source(data, batch_size, num_workers)
    plan = common.plan_batches(len(source.dataset), source.batch_size, batches, samples, method)
    named = common.scored_parameters(model, kinds, include, exclude)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    device = params[0].device
    acc = [torch.zeros_like(p, dtype=common.acc_dtype(p)) for p in params]
    rank, world = common.distributed()
    mine, loader = common.loader_for(source, plan, rank, world)
    loss_sum, seen = 0.0, 0

    with common.scoring_mode(model, params, train_mode=train_mode, batchnorm=batchnorm), \
            torch.random.fork_rng(devices=common.rng_devices(params)), \
            common.progress(len(mine), progress, method) as bar, \
            common.consuming_gradients(params, acc, _add_square):
        for b, (x, y) in zip(mine, loader):
            torch.manual_seed(common.batch_seed(seed, b))
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            loss_sum += common.check_loss(loss, b, method)
            common.check_connected(loss, method)
            torch.autograd.grad(loss, params, allow_unused=True)  # the hooks add g² (unused tensors add nothing)
            del loss
            seen += len(y)
            bar.update(1)

    common.all_reduce_(acc)
    loss_sum, seen = common.reduce_stats([loss_sum, seen], device)
    common.check_finite(names, acc, method)
    meta = {"method": method, "samples": int(seen), "batches": len(plan), "batch_size": source.batch_size,
            "mean_loss": loss_sum / len(plan), "world_size": world,
            "options": {"kinds": list(kinds) if not isinstance(kinds, str) else [kinds], "include": include,
                        "exclude": exclude, "train_mode": train_mode, "batchnorm": batchnorm, "seed": seed,
                        "batches": batches, "samples": samples}}
    return ScoreMap(dict(zip(names, acc)), meta)


def _add_square(acc: torch.Tensor, grad: torch.Tensor) -> None:
    acc.addcmul_(grad, grad)


register(Scorer("sensitivity", sensitivity_scores))
