"""The training engine: ``train`` (score -> plan -> apply -> fit -> evaluate -> save) and ``evaluate``.

``fit`` is the bare loop over any ``nn.Module`` whose trainable tensors have requires_grad;
``train`` is the whole pipeline into a run folder. Heavy modules load lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {
    "train": "sensitune.engine.pipeline",
    "evaluate": "sensitune.engine.pipeline",
    "evaluate_run": "sensitune.engine.pipeline",
    "fit": "sensitune.engine.trainer",
    "FitResult": "sensitune.engine.trainer",
    "NonFiniteLossError": "sensitune.engine.trainer",
    "evaluate_model": "sensitune.engine.evaluation",
    "TrainConfig": "sensitune.engine.config",
    "build_config": "sensitune.engine.config",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sensitune.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
