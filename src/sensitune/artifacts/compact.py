"""The compact on-disk layout of a task delta (format versions 2 and 3): its bytes are its tensors'.

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

Version 3 (written by default) is version 2 with the sparse indices **bit-packed**: each sparse
unit's ``nnz`` flat indices into ``numel`` entries take :func:`~sensitune.io.index_bits` =
ceil(log2 numel) bits each (:func:`sensitune.tuners.packing.pack_uints`: a little-endian bit
stream, index j at bits [j·bits, (j+1)·bits), zero padding to a whole byte), and the units'
bytes, concatenated in plan order, form the one group ``sparse_indices.uint8`` (instead of one
``sparse_indices.<int dtype>`` group per integer width: a ViT-B ``qkv`` index needs 21 bits and
took 32). Everything else is as in version 2. Reading unpacks them back into the narrowest
integer dtype, so a version-3 delta reads back exactly what version 2 did.

Reading checks that every group tensor exists with its dtype and holds exactly the values the
plan needs, so a truncated, padded or re-typed tensor is a DeltaError naming the group; in
version 3 also that every unpacked index is < its target's numel and that padding bits are zero
(a DeltaError naming the unit).
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
from sensitune.io import index_bits, index_dtype
from sensitune.tuners.packing import pack_uints, unpack_uints

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


def index_entry(unit: int, target: str, numel: int, nnz: int, packed: bool) -> Entry:
    """The stored indices of one sparse unit: ``nnz`` flat indices into ``numel`` entries, either
    bit-packed at :func:`~sensitune.io.index_bits` bits (format 3: ceil(nnz·bits/8) uint8 bytes)
    or in the narrowest integer dtype (format 2)."""
    from sensitune.planning.plan import index_key

    info = {"part": "sparse_indices", "unit": unit, "target": target, "target_numel": numel}
    if not packed:
        return Entry(PLAN_PREFIX + index_key(unit, target), info, index_dtype(numel), nnz)
    bits = index_bits(numel)
    return Entry(PLAN_PREFIX + index_key(unit, target), dict(info, index_bits=bits, count=nnz), torch.uint8,
                 math.ceil(nnz * bits / 8))


def entries(plan, norm_buffers: Iterable[tuple[str, int, str]], dtypes: Mapping[str, str],
            value_dtype: str = "float32", *, packed_indices: bool = True) -> list[Entry]:
    """Every stored tensor of a delta for ``plan``, in storage order.

    ``norm_buffers``: (name, numel, dtype) of the stored BatchNorm statistics; ``dtypes``: the
    dtype of each trained parameter whose dtype is not ``value_dtype``. Codes are uint8 and μ, σ
    float32 (:func:`sensitune.tuners.quant.pack_quantized`); sparse indices bit-packed
    (``packed_indices``, format 3) or in an integer dtype (format 2).
    """
    out = [index_entry(i, u.target, u.numel, int(u.indices.numel()), packed_indices)
           for i, u in enumerate(plan.units) if u.indices is not None]
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


def encode(manifest: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor], plan, *,
           packed_indices: bool = True) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, tuple[dict, Tensor]]]:
    """(group tensors, packed metadata, what is stored) of a delta whose v1-style ``manifest`` /
    ``tensors`` save_delta built; ``packed_indices``: format 3 (else 2).

    The entries' order is recomputed from the plan and must be exactly the manifest's keys: the
    layout a reader will rebuild is the one written. "What is stored" maps each key to its
    manifest entry and tensor as written (a sparse unit's indices as their packed bytes), for
    the storage report.
    """
    values = [tensors[e] for e, info in manifest.items() if "param" in info and "field" not in info]
    value_dtype = dtype_name(values[0].dtype) if values else "float32"
    dtypes = {info["param"]: dtype_name(tensors[k].dtype) for k, info in manifest.items()
              if "param" in info and "field" not in info and dtype_name(tensors[k].dtype) != value_dtype}
    norm = [(info["buffer"], tensors[k].numel(), dtype_name(tensors[k].dtype))
            for k, info in manifest.items() if info["part"] == "norm_stats"]
    layout = entries(plan, norm, dtypes, value_dtype, packed_indices=packed_indices)
    if [e.key for e in layout] != list(manifest):  # pragma: no cover - save_delta and entries() disagree
        raise RuntimeError("the compact delta layout does not match what save_delta stored")
    groups: dict[str, list[Tensor]] = {}
    stored: dict[str, tuple[dict, Tensor]] = {}
    for e in layout:
        t = tensors[e.key]
        if "index_bits" in e.info:
            t = pack_uints(t, e.info["index_bits"])
        if t.dtype != e.dtype or t.numel() != e.numel:  # pragma: no cover - same
            raise RuntimeError(f"{e.key}: stored {t.dtype} x {t.numel()}, layout says {e.dtype} x {e.numel}")
        groups.setdefault(e.group, []).append(t.reshape(-1))
        stored[e.key] = ({**manifest[e.key], **e.info, "dtype": dtype_name(t.dtype), "shape": [t.numel()]}, t)
    packed = {"plan": plan.to_json(), "norm_buffers": [[n, k, d] for n, k, d in norm],
              "value_dtype": value_dtype, "dtypes": dtypes}
    return {g: torch.cat(parts).contiguous() for g, parts in groups.items()}, packed, stored


def _index_entries(record: Mapping[str, Any], where: str, packed: bool) -> list[Entry]:
    """The sparse-index entries, read off the plan JSON (the Plan itself needs them to be built)."""
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
        out.append(index_entry(i, d.get("target"), math.prod(shape), nnz, packed))
    return out


def _unpack_indices(cut: Mapping[str, Tensor], layout: list[Entry], where: str) -> dict[str, Tensor]:
    """Each sparse unit's packed bytes as its flat indices, in the narrowest integer dtype (as
    format 2 stored them); an index >= the target's numel is a DeltaError naming the unit."""
    out = {}
    for e in layout:
        numel, bits, count = e.info["target_numel"], e.info["index_bits"], e.info["count"]
        name = f"sparse unit {e.info['unit']} ({e.info['target']})"
        try:
            idx = unpack_uints(cut[e.key], bits, count)
        except ValueError as exc:
            raise DeltaError(f"{where}: {name}: packed indices are invalid ({exc})") from None
        if int(idx.max()) >= numel:
            raise DeltaError(f"{where}: {name}: packed index {int(idx.max())} is out of range for its "
                             f"{numel} entries")
        out[e.key] = idx.to(index_dtype(numel))
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
           where: str, *, packed_indices: bool = True) -> tuple[Any, dict[str, Tensor], dict[str, dict[str, Any]]]:
    """(plan, v1-style tensors, manifest) from the group tensors; any mismatch is a DeltaError.

    ``build_plan(indices)`` parses the packed plan given its sparse indices (cut first, from the
    index groups alone, and unpacked when ``packed_indices``: format 3), so the rest of the
    layout can follow from the plan. The result is the same whichever format was read: indices
    come back in the narrowest integer dtype.
    """
    if not isinstance(packed, Mapping):
        raise DeltaError(f"{where}: packed metadata must be a JSON object")
    index_layout = _index_entries(packed.get("plan"), where, packed_indices)
    index_groups = {e.group for e in index_layout}
    _check_groups({g: t for g, t in groups.items() if g in index_groups}, index_layout, where, exact=False)
    indices, _ = _cut(groups, index_layout)
    if packed_indices:
        indices = _unpack_indices(indices, index_layout, where)
    plan = build_plan(indices)
    try:
        norm = [(str(n), int(k), str(d)) for n, k, d in packed.get("norm_buffers", [])]
        layout = entries(plan, norm, dict(packed.get("dtypes", {})), str(packed.get("value_dtype", "float32")),
                         packed_indices=packed_indices)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"{where}: packed metadata is malformed ({exc})") from None
    _check_groups(groups, layout, where, exact=True)
    tensors, manifest = _cut(groups, layout)
    for key, idx in indices.items():  # the unpacked indices, described as format 2 stored them
        info = {k: v for k, v in manifest[key].items() if k not in ("index_bits", "count")}
        tensors[key], manifest[key] = idx, dict(info, dtype=dtype_name(idx.dtype), shape=[idx.numel()])
    return plan, tensors, manifest
