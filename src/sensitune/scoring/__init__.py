"""Where to tune: per-parameter scores of a model on a task (SPT sensitivity, GPS gradients, baselines).

``score(model, data, method, **options) -> ScoreMap`` is the one entry point; the result is a
``Mapping[str, Tensor]`` (parameter name -> float32 CPU tensor of the parameter's shape) with
``meta``, saved and loaded as safetensors.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sensitune.scoring.sensitivity import sensitivity_scores  # each scorer module registers its scorers
from sensitune.scoring.gradient import backbone_features, gps_scores, gps_view_transform, supcon_loss
from sensitune.scoring.baselines import fisher_scores, magnitude_scores, random_scores
from sensitune.scoring.heatmap import Placement, describe, placement
from sensitune.scoring.registry import SCORERS, Scorer, get_scorer, register
from sensitune.scoring.scoremap import ScoreMap
from sensitune.state import source_of

METHODS: tuple[str, ...] = tuple(SCORERS)
DATA_FREE: tuple[str, ...] = tuple(n for n, s in SCORERS.items() if not s.needs_data)


def score(model: nn.Module, data: Any, method: str = "sensitivity", *, fingerprint: bool = True,
          **options: Any) -> ScoreMap:
    """Score every tunable tensor of ``model`` with ``method``.

    ``data``: a torch Dataset yielding ``(image_tensor, label)`` (e.g. ``sensitune.data.open_task``)
    or a DataLoader (its dataset, batch_size and workers are used; samples go in list order);
    ignored (may be None) for ``magnitude`` and ``random``.
    Options common to all methods: ``kinds`` (default matrix, vector, other: all but head and
    embeddings), ``include``/``exclude`` (regex on names), ``seed``. Data-driven methods also
    take ``batch_size``, ``batches``, ``samples``, ``train_mode`` (True), ``batchnorm``
    ("eval"), ``num_workers``, ``progress``; ``gps`` takes ``loss`` ("supcon" | "ce"),
    ``temperature``, ``view_transform`` (:data:`SCORERS` holds each one's typed options). An
    unknown method, an option it does not take or a value of the wrong type raise ValueError
    listing the valid ones, before any work. The model is left exactly as it was.
    """
    result = get_scorer(method)(model, data, **options)
    from sensitune.models import tunable_tensors

    # the facts a report needs (block, role, kind, q/k/v slices), so it works from the file alone
    result.meta["tensors"] = {n: f for n, f in describe(tunable_tensors(model)).items() if n in result}
    result.meta["backbone_params"] = sum(p.numel() for n, p in model.named_parameters()
                                         if not n.startswith(_head_prefix(model)))
    if fingerprint:
        from sensitune.models import weights_fingerprint

        result.meta["model_fingerprint"] = weights_fingerprint(model)
    source = source_of(model)
    if source:
        result.meta["model"] = {k: source.get(k) for k in ("name", "pretrained", "num_classes")}
    return result


def _head_prefix(model: nn.Module) -> tuple[str, ...]:
    from sensitune.models import find_head

    head = find_head(model)
    return (head + ".",) if head else ()


__all__ = ["METHODS", "SCORERS", "Placement", "ScoreMap", "Scorer", "get_scorer", "register", "placement", "backbone_features", "fisher_scores", "gps_scores", "gps_view_transform",
           "magnitude_scores", "random_scores", "score", "sensitivity_scores", "supcon_loss"]
