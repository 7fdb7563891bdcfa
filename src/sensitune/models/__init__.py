"""Backbones and the shared description of their tunable tensors."""
from sensitune.models.tensors import RowSlice, TensorInfo, as_matrix, find_head, select, tunable_tensors

__all__ = ["RowSlice", "TensorInfo", "as_matrix", "find_head", "select", "tunable_tensors"]
