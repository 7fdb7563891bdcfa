"""Backbones and the shared description of their tunable tensors."""
from sensitune.models.backbones import (
    OTHER_BACKBONES_NOTE,
    WeightsUnavailableError,
    create_backbone,
    data_config,
    list_backbones,
    resolve_name,
    weights_fingerprint,
)
from sensitune.models.hf import HFImageClassifier
from sensitune.models.tensors import (RowSlice, TensorInfo, as_matrix, find_head, kept_training_flags, select,
                                      tunable_tensors)

__all__ = [
    "HFImageClassifier",
    "OTHER_BACKBONES_NOTE",
    "RowSlice",
    "TensorInfo",
    "WeightsUnavailableError",
    "as_matrix",
    "kept_training_flags",
    "create_backbone",
    "data_config",
    "find_head",
    "list_backbones",
    "resolve_name",
    "select",
    "tunable_tensors",
    "weights_fingerprint",
]
