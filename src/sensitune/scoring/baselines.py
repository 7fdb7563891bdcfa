"""Data-free and reference baselines: magnitude |w|, seeded random, and empirical Fisher.

They answer "is the data-driven score better than a trivial one?" in benchmarks, so they
score exactly the tensors the data-driven methods score (same ``kinds``/``include``/``exclude``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitune.scoring import common
from sensitune.scoring.scoremap import ScoreMap
from sensitune.scoring.registry import Scorer, register
from sensitune.scoring.sensitivity import sensitivity_scores


def _options(kinds, include, exclude) -> dict:
    return {"kinds": [kinds] if isinstance(kinds, str) else list(kinds), "include": include, "exclude": exclude}


def magnitude_scores(model: nn.Module, *, kinds: Sequence[str] = common.DEFAULT_KINDS, include: str | None = None,
                     exclude: str | None = None) -> ScoreMap:
    """|w| of every scored tensor (no data)."""
    named = common.scored_parameters(model, kinds, include, exclude)
    scores = {n: p.detach().float().abs().cpu() for n, p in named}
    common.check_finite(list(scores), list(scores.values()), "magnitude")
    return ScoreMap(scores, {"method": "magnitude", "samples": 0, "batches": 0,
                             "options": _options(kinds, include, exclude)})


def random_scores(model: nn.Module, *, seed: int = 0, kinds: Sequence[str] = common.DEFAULT_KINDS,
                  include: str | None = None, exclude: str | None = None) -> ScoreMap:
    """Uniform [0, 1) scores from a CPU generator seeded with ``seed`` (same seed, same map)."""
    named = common.scored_parameters(model, kinds, include, exclude)
    gen = torch.Generator().manual_seed(int(seed))
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in named}
    return ScoreMap(scores, {"method": "random", "samples": 0, "batches": 0,
                             "options": {**_options(kinds, include, exclude), "seed": seed}})


def fisher_scores(model: nn.Module, data: Dataset | DataLoader, *, samples: int | None = 128,
                  **options) -> ScoreMap:
    """Empirical Fisher diagonal: Σ_i (∂CE_i/∂w)² over single samples.

    It is sensitivity with batches of one: the sum of squared *per-sample* gradients. With BN
    in eval mode (the default) a sample's gradient does not depend on its batch, so this is the
    exact per-sample quantity. Costs one forward/backward per sample, hence 128 by default.
    """
    if options.pop("batch_size", 1) != 1:
        raise ValueError("fisher scores are per-sample: batch_size is always 1")
    if isinstance(data, DataLoader):
        data = data.dataset
    options.pop("batches", None)
    return sensitivity_scores(model, data, batch_size=1, batches=None, samples=samples, method="fisher", **options)


register(Scorer("magnitude", magnitude_scores, needs_data=False))
register(Scorer("random", random_scores, needs_data=False))
register(Scorer("fisher", fisher_scores, forwards=sensitivity_scores))
