"""Task deltas: save, load, merge, switch tasks, export (delta / PEFT / merged)."""
from sensitune.artifacts.bank import TaskBank
from sensitune.artifacts.delta import (
    Delta,
    format_storage,
    load_delta,
    predict_topk,
    read_delta,
    resolve_delta_dir,
    save_delta,
    storage_report,
)
from sensitune.artifacts.format import DeltaError, index_dtype
from sensitune.artifacts.merge import base_fingerprint, merge

__all__ = [
    "Delta",
    "DeltaError",
    "TaskBank",
    "base_fingerprint",
    "format_storage",
    "index_dtype",
    "load_delta",
    "merge",
    "predict_topk",
    "read_delta",
    "resolve_delta_dir",
    "save_delta",
    "storage_report",
]
