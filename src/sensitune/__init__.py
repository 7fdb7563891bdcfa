"""sensitune: parameter-efficient fine-tuning of pretrained vision models that knows where to tune.

The flow is one-way: data -> backbone -> score -> plan -> tune -> train -> evaluate -> delta.
Each public function below is one arrow; the names are imported lazily so that
``import sensitune`` stays cheap and each stage can be used on its own.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "create_backbone": "sensitune.models",
    "tunable_tensors": "sensitune.models",
    "open_task": "sensitune.data",
    "score": "sensitune.scoring",
    "ScoreMap": "sensitune.scoring",
    "make_plan": "sensitune.planning",
    "Plan": "sensitune.planning",
    "apply_plan": "sensitune.tuners",
    "train": "sensitune.engine",
    "evaluate": "sensitune.engine",
    "save_delta": "sensitune.artifacts",
    "load_delta": "sensitune.artifacts",
    "merge": "sensitune.artifacts",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sensitune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
