"""The compact on-disk layout of a task delta (format version 2): its bytes are its tensors'.

Version 1 stored one safetensors tensor per trained tensor (a 1-bit Bi-LoRA of
EfficientNet-Lite0: 194 tensors, a 17.6 KB header) and repeated the plan and a manifest of every
tensor in ``delta.json`` (50 KB) — most of the file at the papers' scale. Version 2 keeps the
same logical content (what :func:`sensitune.artifacts.save_delta` decides to store: each
entry's key, part, dtype and size) but

* stores **one tensor per part and dtype** (``lora.float32``, ``lowbit_codes.uint8``,
  ``sparse_indices.int16``, ``norm_stats.float32`` ...), the entries concatenated flat in a fixed
  order, so the safetensors header names a dozen tensors, not hundreds;
* records no manifest: the order and size of every entry follow from the plan alone
  (:func:`entries`: sparse indices per unit, then each trained parameter — packed codes + μ, σ
  when low-bit — then the BatchNorm statistics by name), so reading rebuilds the manifest and
  cuts each group back into its entries;
* keeps the plan (the one plan JSON that plan files use) and the statistics' names
  zlib-compressed (base85) in ``delta.json``, beside the facts people read (method, backbone,
  fingerprint, classes, storage report), which stay plain JSON.

Reading checks that every group tensor exists with its dtype and holds exactly the values the
plan needs, so a truncated, padded or re-typed tensor is a DeltaError naming the group.
"""
from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from sensitune.artifacts.format import DeltaError, dtype_name
from sensitune.io import index_dtype

PLAN_PREFIX = "plan::"
BUFFER_PREFIX = "buffer::"
LOWBIT_FIELDS = ("codes", "mu", "sigma")
#: largest decompressed size of the packed metadata (a plan of a huge model is a few MB)
MAX_PACKED_BYTES = 256 << 20


@dataclass(frozen=True)
class Entry:
    """One logical stored tensor: its v1 key, manifest info, dtype and number of elements."""

    key: str
    info: dict[str, Any]
    dtype: torch.dtype
    numel: int

    @property
    def group(self) -> str:
        return f"{self.info['part']}.{dtype_name(self.dtype)}"


def _dtype(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise DeltaError(f"{where}: unknown dtype {name!r}")
    return dt


def entries(plan, norm_buffers: Iterable[tuple[str, int, str]], dtypes: Mapping[str, str],
            value_dtype: str = "float32") -> list[Entry]:
    """Every stored tensor of a delta for ``plan``, in storage order.

    ``norm_buffers``: (name, numel, dtype) of the stored BatchNorm statistics; ``dtypes``: the
    dtype of each trained parameter whose dtype is not ``value_dtype``. Codes are uint8 and μ, σ
    float32 (:func:`sensitune.tuners.quant.pack_quantized`).
    """
    from sensitune.planning.plan import index_key

    out: list[Entry] = []
    for i, u in enumerate(plan.units):
        if u.indices is not None:
            out.append(Entry(PLAN_PREFIX + index_key(i, u.target),
                             {"part": "sparse_indices", "unit": i, "target": u.target, "target_numel": u.numel},
                             index_dtype(u.numel), int(u.indices.numel())))
    for i, u in enumerate(plan.units):
        quantised = u.spec.quantised(u)
        for name, role, numel in u.parameters():
            base = {"param": name, "role": role, "unit": i}
            if name in quantised:
                bits = quantised[name]
                info = dict(base, bits=bits, param_shape=[numel])
                out.append(Entry(f"{name}::codes", dict(info, part="lowbit_codes", field="codes"), torch.uint8,
                                 math.ceil(numel * bits / 8)))
                for f in ("mu", "sigma"):
                    out.append(Entry(f"{name}::{f}", dict(info, part="lowbit_stats", field=f), torch.float32, 1))
            else:
                dt = _dtype(dtypes.get(name, value_dtype), "delta")
                out.append(Entry(name, dict(base, part=u.spec.part(role)), dt, numel))
    for name, numel, dt in norm_buffers:
        out.append(Entry(f"{BUFFER_PREFIX}{name}", {"part": "norm_stats", "buffer": name}, _dtype(dt, "delta"), numel))
    return out


def pack_json(obj: Any) -> str:
    """``obj`` as compact JSON, zlib level 9, base85 text (what delta.json's ``packed`` holds)."""
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return base64.b85encode(zlib.compress(raw, 9)).decode("ascii")


def unpack_json(text: Any, where: str) -> Any:
    if not isinstance(text, str):
        raise DeltaError(f"{where}: 'packed' must be a base85 string, got {type(text).__name__}")
    try:
        data = base64.b85decode(text.encode("ascii"))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_PACKED_BYTES)
        if inflater.unconsumed_tail:
            raise DeltaError(f"{where}: packed metadata inflates past {MAX_PACKED_BYTES} bytes")
        return json.loads(raw)
    except (ValueError, zlib.error, UnicodeError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"{where}: packed metadata is corrupt ({exc})") from None


def encode(manifest: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor], plan,
           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(group tensors, packed metadata) of a delta whose v1-style ``manifest``/``tensors`` save_delta built.

    The entries' order is recomputed from the plan and must be exactly the manifest's keys: the
    layout a reader will rebuild is the one written.
    """
    values = [tensors[e] for e, info in manifest.items() if "param" in info and "field" not in info]
    value_dtype = dtype_name(values[0].dtype) if values else "float32"
    dtypes = {info["param"]: dtype_name(tensors[k].dtype) for k, info in manifest.items()
              if "param" in info and "field" not in info and dtype_name(tensors[k].dtype) != value_dtype}
    norm = [(info["buffer"], tensors[k].numel(), dtype_name(tensors[k].dtype))
            for k, info in manifest.items() if info["part"] == "norm_stats"]
    layout = entries(plan, norm, dtypes, value_dtype)
    if [e.key for e in layout] != list(manifest):  # pragma: no cover - save_delta and entries() disagree
        raise RuntimeError("the compact delta layout does not match what save_delta stored")
    groups: dict[str, list[Tensor]] = {}
    for e in layout:
        t = tensors[e.key]
        if t.dtype != e.dtype or t.numel() != e.numel:  # pragma: no cover - same
            raise RuntimeError(f"{e.key}: stored {t.dtype} x {t.numel()}, layout says {e.dtype} x {e.numel}")
        groups.setdefault(e.group, []).append(t.reshape(-1))
    packed = {"plan": plan.to_json(), "norm_buffers": [[n, k, d] for n, k, d in norm],
              "value_dtype": value_dtype, "dtypes": dtypes}
    return {g: torch.cat(parts).contiguous() for g, parts in groups.items()}, packed


def _index_entries(record: Mapping[str, Any], where: str) -> list[Entry]:
    """The sparse-index entries, read off the plan JSON (the Plan itself needs them to be built)."""
    from sensitune.planning.plan import index_key
    from sensitune.tuners.modes import get_mode

    out = []
    units = record.get("units") if isinstance(record, Mapping) else None
    if not isinstance(units, list):
        raise DeltaError(f"{where}: the packed plan has no list of units")
    for i, d in enumerate(units):
        try:
            indexed = isinstance(d, Mapping) and get_mode(d.get("mode")).indexed
        except ValueError as exc:
            raise DeltaError(f"{where}: unit {i}: {exc}") from None
        if not indexed:
            continue
        shape, nnz = d.get("shape"), d.get("nnz")
        if not (isinstance(shape, list) and all(type(k) is int and k > 0 for k in shape)) or type(nnz) is not int or nnz < 1:
            raise DeltaError(f"{where}: sparse unit {i} needs a positive shape and nnz, got {shape!r}, {nnz!r}")
        numel = math.prod(shape)
        out.append(Entry(PLAN_PREFIX + index_key(i, d.get("target")),
                         {"part": "sparse_indices", "unit": i, "target": d.get("target"), "target_numel": numel},
                         index_dtype(numel), nnz))
    return out


def _check_groups(groups: Mapping[str, Tensor], layout: list[Entry], where: str, *, exact: bool) -> None:
    need: dict[str, int] = {}
    for e in layout:
        need[e.group] = need.get(e.group, 0) + e.numel
    if exact:
        extra = sorted(set(groups) - set(need))
        if extra:
            raise DeltaError(f"{where}: unexpected tensor(s) {extra[:5]} that the plan does not store")
    for g, n in need.items():
        t = groups.get(g)
        if t is None:
            raise DeltaError(f"{where}: missing tensor {g!r} (the plan stores {n} values in it)")
        want = g.rsplit(".", 1)[1]
        if dtype_name(t.dtype) != want:
            raise DeltaError(f"{where}: tensor {g!r} has dtype {dtype_name(t.dtype)}, its name says {want}")
        if t.dim() != 1 or t.numel() != n:
            raise DeltaError(f"{where}: tensor {g!r} holds {list(t.shape)} values, the plan needs [{n}]")


def _cut(groups: Mapping[str, Tensor], layout: list[Entry]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    offsets: dict[str, int] = {}
    tensors: dict[str, Tensor] = {}
    manifest: dict[str, dict[str, Any]] = {}
    for e in layout:
        start = offsets.get(e.group, 0)
        tensors[e.key] = groups[e.group].narrow(0, start, e.numel)
        offsets[e.group] = start + e.numel
        manifest[e.key] = {"dtype": dtype_name(e.dtype), "shape": [e.numel], **e.info}
    return tensors, manifest


def decode(groups: Mapping[str, Tensor], packed: Mapping[str, Any], build_plan: Callable[[dict[str, Tensor]], Any],
           where: str) -> tuple[Any, dict[str, Tensor], dict[str, dict[str, Any]]]:
    """(plan, v1-style tensors, manifest) from the group tensors; any mismatch is a DeltaError.

    ``build_plan(indices)`` parses the packed plan given its sparse indices (cut first, from the
    index groups alone), so the rest of the layout can follow from the plan.
    """
    if not isinstance(packed, Mapping):
        raise DeltaError(f"{where}: packed metadata must be a JSON object")
    index_layout = _index_entries(packed.get("plan"), where)
    index_groups = {e.group for e in index_layout}
    _check_groups({g: t for g, t in groups.items() if g in index_groups}, index_layout, where, exact=False)
    indices, _ = _cut(groups, index_layout)
    plan = build_plan(indices)
    try:
        norm = [(str(n), int(k), str(d)) for n, k, d in packed.get("norm_buffers", [])]
        layout = entries(plan, norm, dict(packed.get("dtypes", {})), str(packed.get("value_dtype", "float32")))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"{where}: packed metadata is malformed ({exc})") from None
    _check_groups(groups, layout, where, exact=True)
    tensors, manifest = _cut(groups, layout)
    return plan, tensors, manifest
