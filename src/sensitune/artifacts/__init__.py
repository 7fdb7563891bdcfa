"""Task deltas: save, load, merge, switch tasks, export (delta / PEFT / merged).

* ``save_delta(model, path, *, plan=None, meta=None, norm_stats=None)`` writes a folder with
  ``delta.safetensors`` (only what the plan trained: sparse values + indices in the narrowest
  integer type, LoRA/adapter weights — bit-packed codes + μ, σ when ``bits`` < 32 — head, full
  tensors and biases, BatchNorm running statistics) and ``delta.json`` (plan, method, backbone
  and how to rebuild it, base fingerprint, class names, data config, manifest of every tensor,
  storage report: bytes on disk vs the theoretical minimum by part, versions). Atomic.
* ``load_delta(base_or_name_or_None, path, *, force=False)`` checks the base fingerprint
  (``weights_fingerprint`` of every base tensor the delta relies on: head, tensors it replaces
  and, if the delta stores them, BatchNorm statistics excluded, so no record from before
  training is needed) and every
  stored key, dtype, shape and index; safetensors + json only, never a pickle.
* ``merge(model)``: a plain timm/torch copy with sparse, LoRA and k-bit weights folded in.
  Adapters and AdaptFormer are non-linear and are refused.
* ``TaskBank(base)``: ``add(name, delta)``, ``activate(name)``: switches by swapping only the
  modules a delta touches (frozen tensors shared with the base), bit-identical to a fresh load.
* Export (``sensitune export``, :mod:`.export`): ``delta``, ``merged`` (model.safetensors +
  config.json, :func:`~sensitune.artifacts.export.load_merged`) and ``peft``. PEFT receives
  LoRA units (fused-qkv slices as one block-structured LoRA on ``qkv``; k-bit factors
  dequantised), the head and whole tuned modules / BatchNorm statistics as ``modules_to_save``.
  PEFT cannot express sparse entries, sequential adapters, AdaptFormer, root-level tensors
  (``pos_embed``) or a full/bias unit on a module that also has a LoRA: the export is refused
  with that list unless ``--partial``, and a delta without any LoRA unit is refused (PEFT's
  LoRA config needs a target).
"""
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
from sensitune.artifacts.format import BaseMismatchError, DeltaError, index_dtype
from sensitune.artifacts.merge import base_fingerprint, merge

__all__ = [
    "BaseMismatchError",
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
