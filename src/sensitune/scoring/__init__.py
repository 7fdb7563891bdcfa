"""Where to tune: per-parameter scores of a model on a task (SPT sensitivity, GPS gradients, baselines).

``score(model, data, method, **options) -> ScoreMap`` is the one entry point; the result is a
``Mapping[str, Tensor]`` (parameter name -> float32 CPU tensor of the parameter's shape) with
``meta``, saved and loaded as safetensors.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sensitune.scoring.baselines import fisher_scores, magnitude_scores, random_scores
from sensitune.scoring.heatmap import Placement, describe, placement
from sensitune.scoring.gradient import backbone_features, gps_scores, gps_view_transform, supcon_loss
from sensitune.scoring.scoremap import ScoreMap
from sensitune.scoring.sensitivity import sensitivity_scores

METHODS = ("sensitivity", "gps", "magnitude", "random", "fisher")
DATA_FREE = ("magnitude", "random")


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
    ``temperature``, ``view_transform``. The model is left exactly as it was.
    """
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}: choose one of {', '.join(METHODS)}")
    if method not in DATA_FREE and data is None:
        raise ValueError(f"{method} scoring needs data (a Dataset or DataLoader of (image, label))")
    try:
        if method == "sensitivity":
            result = sensitivity_scores(model, data, **options)
        elif method == "gps":
            result = gps_scores(model, data, **options)
        elif method == "fisher":
            result = fisher_scores(model, data, **options)
        elif method == "magnitude":
            result = magnitude_scores(model, **options)
        else:
            result = random_scores(model, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ValueError(f"{method} scoring: {exc}") from None
        raise
    from sensitune.models import tunable_tensors

    # the facts a report needs (block, role, kind, q/k/v slices), so it works from the file alone
    result.meta["tensors"] = {n: f for n, f in describe(tunable_tensors(model)).items() if n in result}
    result.meta["backbone_params"] = sum(p.numel() for n, p in model.named_parameters()
                                         if not n.startswith(_head_prefix(model)))
    if fingerprint:
        from sensitune.models import weights_fingerprint

        result.meta["model_fingerprint"] = weights_fingerprint(model)
    source = getattr(model, "sensitune_source", None)
    if source:
        result.meta["model"] = {k: source.get(k) for k in ("name", "pretrained", "num_classes")}
    return result


def _head_prefix(model: nn.Module) -> tuple[str, ...]:
    from sensitune.models import find_head

    head = find_head(model)
    return (head + ".",) if head else ()


__all__ = ["METHODS", "Placement", "ScoreMap", "placement", "backbone_features", "fisher_scores", "gps_scores", "gps_view_transform",
           "magnitude_scores", "random_scores", "score", "sensitivity_scores", "supcon_loss"]
