"""The Plan: the one serialisable answer to "where and how is this model tuned".

A :class:`Plan` is a list of :class:`Unit` s plus the shapes of the model it was made for.
Every tensor not named by a unit stays frozen. Unit modes:

``full``        the parameter trains as it is (biases for BitFit/GPS, everything for ``full``);
``head``        a parameter of the classification head (``bits`` < 32 quantises its weight);
``sparse``      fixed flat ``indices`` into the parameter; a values vector trains, W' = W + scatter;
``lora``        ΔY = s·B·A·dropout(x) on a weight matrix, or on one row ``slice`` (q/k/v) of a fused qkv;
``adapter``     sequential bottleneck y ← y + Up(GELU(Down(y))) with biases on a layer's output (or slice);
``adaptformer`` parallel bottleneck on a block: out += s·Up(dropout(ReLU(Down(x)))), no biases;
                ``target`` is the block's module name and ``shape`` is (d_in, d_out).

On disk a plan is JSON (human-readable) plus a safetensors file beside it holding the sparse
indices in the narrowest integer dtype that fits (int64 in memory). :meth:`Plan.parameters` lists the trainable
parameters that :func:`sensitune.apply_plan` creates or unfreezes, with their role, so the
engine can build parameter groups and the artifacts can save exactly what was trained.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import Tensor, nn

Mode = Literal["full", "head", "sparse", "lora", "adapter", "adaptformer"]
MODES: tuple[str, ...] = ("full", "head", "sparse", "lora", "adapter", "adaptformer")
#: modes that build a new module (with rank, bits, scale, dropout)
STRUCTURED: tuple[str, ...] = ("lora", "adapter", "adaptformer")
#: roles of trainable parameters (see :meth:`Plan.parameters`)
ROLES: tuple[str, ...] = ("full", "bias", "head", "sparse", "lora_A", "lora_B", "adapter")

FORMAT_VERSION = 1


@dataclass
class Unit:
    """How one tensor (or a q/k/v row slice of it, or one block for AdaptFormer) is tuned."""

    target: str
    mode: Mode
    shape: tuple[int, ...]
    slice: str | None = None
    slice_rows: tuple[int, int] | None = None  # (start, stop) of the slice's rows
    rank: int = 0
    bits: int = 32
    scale: float = 1.0
    dropout: float = 0.0
    drop_path: float = 0.0
    indices: Tensor | None = None  # sparse: sorted unique flat indices into the full tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.mode not in MODES:
            raise ValueError(f"unit {self.target!r}: unknown mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "sparse":
            if self.indices is None:
                raise ValueError(f"sparse unit {self.target!r} needs indices")
            idx = torch.as_tensor(self.indices).reshape(-1).to(torch.int64)
            idx = torch.unique(idx)  # sorted, unique
            if idx.numel() == 0:
                raise ValueError(f"sparse unit {self.target!r} has no indices")
            if int(idx[0]) < 0 or int(idx[-1]) >= math.prod(self.shape):
                raise ValueError(
                    f"sparse unit {self.target!r}: index out of range [0, {math.prod(self.shape)}) "
                    f"(got {int(idx[0])}..{int(idx[-1])})")
            self.indices = idx
        elif self.indices is not None:
            raise ValueError(f"unit {self.target!r}: only sparse units carry indices (mode {self.mode!r})")
        if self.mode in STRUCTURED:
            if self.rank <= 0:
                raise ValueError(f"{self.mode} unit {self.target!r}: rank must be > 0, got {self.rank}")
            if self.bits not in (1, 2, 4, 8, 32):
                raise ValueError(f"unit {self.target!r}: bits={self.bits} is not one of 1, 2, 4, 8, 32")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"unit {self.target!r}: dropout and drop_path must be in [0, 1)")
        if self.slice is not None and self.slice_rows is None:
            raise ValueError(f"unit {self.target!r}: slice {self.slice!r} needs slice_rows")
        if self.slice_rows is not None:
            self.slice_rows = (int(self.slice_rows[0]), int(self.slice_rows[1]))

    # ---------------------------------------------------------------- geometry
    @property
    def module(self) -> str:
        """Owning module of a parameter target (the block itself for AdaptFormer)."""
        if self.mode == "adaptformer":
            return self.target
        return self.target.rsplit(".", 1)[0] if "." in self.target else ""

    @property
    def leaf(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the matrix the unit acts on (slice rows only, conv kernel flattened)."""
        if self.mode == "adaptformer":
            return (self.shape[1], self.shape[0])
        rows = self.shape[0] if len(self.shape) > 1 else 1
        cols = math.prod(self.shape) // rows
        if self.slice_rows is not None:
            rows = self.slice_rows[1] - self.slice_rows[0]
        return (rows, cols)

    @property
    def key(self) -> str:
        """Name of the unit's sub-module inside the owning module's ModuleDict."""
        return self.slice or "w"

    @property
    def num_params(self) -> int:
        """Trainable scalars this unit adds (structured modules at their stated formulas)."""
        d_out, d_in = self.matrix_shape
        r = self.rank
        if self.mode in ("full", "head"):
            return math.prod(self.shape)
        if self.mode == "sparse":
            return int(self.indices.numel())
        if self.mode == "lora":
            return r * (d_in + d_out)
        if self.mode == "adapter":
            return 2 * r * d_out + r + d_out
        return r * (d_in + d_out)  # adaptformer: no biases

    def parameters(self) -> list[tuple[str, str, int]]:
        """(name after apply_plan, role, numel) of every trainable tensor this unit owns."""
        d_out, d_in = self.matrix_shape
        r, mod = self.rank, self.module
        pre = f"{mod}." if mod else ""
        if self.mode == "full":
            role = "bias" if len(self.shape) == 1 else "full"
            return [(self.target, role, self.num_params)]
        if self.mode == "head":
            return [(self.target, "head", self.num_params)]
        if self.mode == "sparse":
            return [(f"{pre}{self.leaf}_delta", "sparse", self.num_params)]
        if self.mode == "lora":
            base = f"{pre}lora.{self.key}"
            return [(f"{base}.A", "lora_A", r * d_in), (f"{base}.B", "lora_B", r * d_out)]
        if self.mode == "adapter":
            base = f"{pre}adapter.{self.key}"
            return [(f"{base}.down_w", "adapter", r * d_out), (f"{base}.down_b", "adapter", r),
                    (f"{base}.up_w", "adapter", r * d_out), (f"{base}.up_b", "adapter", d_out)]
        base = f"{pre}adaptformer"
        return [(f"{base}.down_w", "adapter", r * d_in), (f"{base}.up_w", "adapter", r * d_out)]

    def nbytes(self) -> int:
        """Estimated bytes on disk of what this unit trains (values + indices / packed weights)."""
        if self.mode == "sparse":
            n = self.num_params
            return 4 * n + n * index_dtype(math.prod(self.shape)).itemsize
        if self.mode in ("full", "head"):
            if self.mode == "head" and self.bits < 32 and len(self.shape) > 1:
                return _packed(math.prod(self.shape), self.bits)
            return 4 * self.num_params
        # weight matrices packed at ``bits``; adapter biases stay float32
        rows = self.parameters()
        weights = sum(_packed(numel, self.bits) for n, _, numel in rows if not n.endswith("_b"))
        return weights + 4 * sum(numel for n, _, numel in rows if n.endswith("_b"))

    # ---------------------------------------------------------------- io
    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "mode": self.mode, "shape": list(self.shape)}
        if self.slice is not None:
            d["slice"] = self.slice
            d["slice_rows"] = list(self.slice_rows)
        if self.mode in STRUCTURED:
            d.update(rank=self.rank, bits=self.bits, scale=self.scale, dropout=self.dropout, drop_path=self.drop_path)
        if self.mode == "head" and self.bits != 32:
            d["bits"] = self.bits
        if self.mode == "sparse":
            d["nnz"] = int(self.indices.numel())
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], indices: Tensor | None = None) -> "Unit":
        """The unit :meth:`to_json` wrote; a sparse unit's indices travel separately (safetensors)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan unit must be a JSON object, got {type(d).__name__}")
        shape = d.get("shape")
        if "shape" in d and not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise ValueError(f"plan unit {d.get('target')!r}: shape must be a list of integers >= 0, got {shape!r}")
        try:
            return cls(target=d["target"], mode=d["mode"], shape=tuple(d["shape"]), slice=d.get("slice"),
                       slice_rows=tuple(d["slice_rows"]) if "slice_rows" in d else None,
                       rank=int(d.get("rank", 0)), bits=int(d.get("bits", 32)), scale=float(d.get("scale", 1.0)),
                       dropout=float(d.get("dropout", 0.0)), drop_path=float(d.get("drop_path", 0.0)),
                       indices=None if indices is None else indices.to(torch.int64))
        except KeyError as exc:
            raise ValueError(f"plan unit lacks {exc}") from None
        except TypeError as exc:
            raise ValueError(f"plan unit {d.get('target')!r} is malformed: {exc}") from None


def _packed(numel: int, bits: int) -> int:
    return 4 * numel if bits == 32 else math.ceil(numel * bits / 8) + 8


def index_key(i: int, target: str) -> str:
    """Key of sparse unit ``i``'s flat indices in an indices file (plan files; deltas prefix it)."""
    return f"{i}:{target}"


def index_dtype(numel: int) -> torch.dtype:
    """Narrowest integer dtype (uint8, int16, int32, int64) that holds every flat index of a tensor with ``numel`` entries."""
    for dt in (torch.uint8, torch.int16, torch.int32):
        if numel - 1 <= torch.iinfo(dt).max:
            return dt
    return torch.int64


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter (what a plan is checked against)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@dataclass
class Plan:
    """Units + the shapes of the model they were made for + how they were chosen.

    ``tensors`` maps every parameter of the model to its shape (checked by apply_plan);
    ``head`` lists the head's parameter names (excluded from budgets); ``stats`` records
    the allocation (e.g. SPT's mix of structured matrices, sparse entries and whole vectors).
    """

    method: str
    units: list[Unit]
    tensors: dict[str, tuple[int, ...]]
    head: list[str] = field(default_factory=list)
    budget: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors = {k: tuple(int(s) for s in v) for k, v in self.tensors.items()}
        self._check_units()

    def _check_units(self) -> None:
        seen: dict[tuple[str, str], Unit] = {}
        by_target: dict[str, set[str]] = defaultdict(set)
        for u in self.units:
            if u.mode != "adaptformer":
                if u.target not in self.tensors:
                    raise ValueError(f"plan unit names {u.target!r}, which is not a parameter of the planned model")
                if self.tensors[u.target] != u.shape:
                    raise ValueError(f"plan unit {u.target!r} has shape {u.shape}, model tensor is {self.tensors[u.target]}")
            key = (u.target, u.key if u.mode in ("lora", "adapter") else u.mode)
            if key in seen and seen[key].mode == u.mode:
                raise ValueError(f"plan has two {u.mode} units for {u.target!r} ({u.key})")
            seen[key] = u
            by_target[u.target].add(u.mode)
        for target, modes in by_target.items():
            if len(modes & {"full", "head", "sparse"}) > 1 or ({"full", "head"} & modes and modes & {"lora", "adapter"}):
                raise ValueError(f"plan tunes {target!r} in incompatible ways: {sorted(modes)}")
            if "sparse" in modes and sum(1 for u in self.units if u.target == target and u.mode == "sparse") > 1:
                raise ValueError(f"plan has two sparse units for {target!r}; merge their indices")
        for u in self.units:
            if u.mode in ("lora", "adapter") and u.slice is None and any(
                    v.target == u.target and v.mode == u.mode and v.slice is not None for v in self.units):
                raise ValueError(f"plan has a whole-matrix {u.mode} and a sliced one on {u.target!r}")

    # ---------------------------------------------------------------- counts
    def is_head_unit(self, u: Unit) -> bool:
        return u.mode == "head" or (u.mode != "adaptformer" and u.target in self.head)

    def num_trainable(self, include_head: bool = True) -> int:
        """Trainable scalars after apply_plan (the head's parameters counted only if asked)."""
        return sum(u.num_params for u in self.units if include_head or not self.is_head_unit(u))

    @property
    def backbone_params(self) -> int:
        """Parameters of the planned model outside the head (what a "%" budget refers to)."""
        return sum(math.prod(s) for n, s in self.tensors.items() if n not in self.head)

    def parameters(self) -> list[tuple[str, str, int]]:
        """(name, role, numel) of every parameter that requires grad after apply_plan.

        Roles: ``full`` / ``bias`` (an original tensor trained as is), ``head``, ``sparse``
        (values of a sparse delta: no weight decay), ``lora_A``, ``lora_B``, ``adapter``.
        """
        return [row for u in self.units for row in u.parameters()]

    def nbytes(self, include_head: bool = True) -> int:
        """Estimated bytes on disk of the trained delta (float32 values, packed low-bit weights, indices)."""
        return sum(u.nbytes() for u in self.units if include_head or not self.is_head_unit(u))

    def mix(self) -> dict[str, int]:
        """Counts by kind: structured modules, sparse entries, whole tensors, head parameters."""
        out = {"structured": 0, "structured_params": 0, "sparse_entries": 0, "sparse_tensors": 0,
               "whole_vectors": 0, "whole_matrices": 0, "head_params": 0}
        for u in self.units:
            if self.is_head_unit(u):
                out["head_params"] += u.num_params
            elif u.mode in STRUCTURED:
                out["structured"] += 1
                out["structured_params"] += u.num_params
            elif u.mode == "sparse":
                out["sparse_entries"] += u.num_params
                out["sparse_tensors"] += 1
            elif len(u.shape) == 1:
                out["whole_vectors"] += 1
            else:
                out["whole_matrices"] += 1
        return out

    def summary(self) -> str:
        """Per-layer counts, structured vs unstructured, totals with/without head, bytes on disk."""
        from sensitune.models.tensors import _split_block

        rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for u in self.units:
            block = "head" if self.is_head_unit(u) else (_split_block(u.module)[0] or "(stem/top)")
            kind = "structured" if u.mode in STRUCTURED else ("sparse" if u.mode == "sparse" else "whole")
            rows[block][kind] += u.num_params
            rows[block]["units"] += 1
        lines = [f"plan: method={self.method}" + (f" budget={self.budget:,}" if self.budget else ""),
                 f"{'layer':<22}{'units':>7}{'structured':>12}{'sparse':>10}{'whole':>10}{'total':>11}"]
        for block in sorted(rows, key=_natural_key):
            r = rows[block]
            total = r["structured"] + r["sparse"] + r["whole"]
            lines.append(f"{block:<22}{r['units']:>7}{r['structured']:>12,}{r['sparse']:>10,}{r['whole']:>10,}{total:>11,}")
        m = self.mix()
        with_head, without = self.num_trainable(True), self.num_trainable(False)
        share = 100.0 * without / max(1, self.backbone_params)
        lines += [
            f"structured modules: {m['structured']} ({m['structured_params']:,} params); "
            f"sparse entries: {m['sparse_entries']:,} in {m['sparse_tensors']} tensors; "
            f"whole vectors: {m['whole_vectors']}; whole matrices: {m['whole_matrices']}",
            f"trainable: {with_head:,} with head, {without:,} without ({share:.3f}% of {self.backbone_params:,} backbone)",
            f"estimated delta on disk: {self.nbytes(True):,} B with head, {self.nbytes(False):,} B without",
        ]
        for k, v in self.stats.items():
            if not isinstance(v, (dict, list)):
                lines.append(f"{k}: {v}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- io
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "sensitune.plan", "version": FORMAT_VERSION, "method": self.method,
            "budget": self.budget, "options": self.options, "stats": self.stats,
            "trainable": {"with_head": self.num_trainable(True), "without_head": self.num_trainable(False)},
            "head": list(self.head), "units": [u.to_json() for u in self.units],
            "tensors": {k: list(v) for k, v in self.tensors.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (JSON) and, if any unit is sparse, ``<stem>.safetensors`` beside it; atomic."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.to_json()
        tensors = {index_key(i, u.target): u.indices.to(index_dtype(math.prod(u.shape))).contiguous()
                   for i, u in enumerate(self.units) if u.mode == "sparse"}
        if tensors:
            side = path.with_suffix(".safetensors")
            fd, tmp = tempfile.mkstemp(dir=side.parent, prefix=side.name, suffix=".tmp")
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata={"format": "sensitune.plan.indices"})
                digest = _sha256(tmp)
                os.replace(tmp, side)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            meta["indices"] = {"file": side.name, "sha256": digest}
        _atomic_write_text(path, json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save`; the indices file must match the JSON's checksum."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a JSON plan ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != "sensitune.plan":
            raise ValueError(f"{path}: not a sensitune plan (missing format='sensitune.plan')")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: plan format version {meta.get('version')} is not supported (expected {FORMAT_VERSION})")
        stored: dict[str, Tensor] = {}
        if "indices" in meta:
            side = path.parent / meta["indices"]["file"]
            if not side.is_file():
                raise FileNotFoundError(f"{path}: its indices file {side} is missing")
            if _sha256(side) != meta["indices"]["sha256"]:
                raise ValueError(f"{side} does not match {path} (checksum differs): files from different saves?")
            stored = load_file(str(side))
        try:
            return cls.from_json(meta, stored)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], indices: Mapping[str, Tensor] | None = None, *,
                  prefix: str = "") -> "Plan":
        """The plan :meth:`to_json` wrote; sparse unit ``i``'s flat indices are ``indices[prefix + index_key(i, target)]``
        (the keys plan files and deltas store them under).

        The one parser of plan JSON (plan files, task deltas); raises ValueError naming what is wrong.
        """
        indices = indices or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(meta).__name__}")
        if "units" not in meta:
            raise ValueError("plan lacks 'units' (a plan that tunes nothing says \"units\": [])")
        if not isinstance(meta["units"], list):
            raise ValueError(f"plan 'units' must be a list, got {type(meta['units']).__name__}")
        units = []
        for i, d in enumerate(meta["units"]):
            where, idx = f"unit {i}", None
            if isinstance(d, Mapping) and d.get("mode") == "sparse":
                key = prefix + index_key(i, d.get("target"))
                where += f" (indices {key!r})"
                idx = indices.get(key)
                if idx is None:
                    raise ValueError(f"{where}: sparse unit {d.get('target')!r} has no stored indices")
            try:
                units.append(Unit.from_json(d, idx))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        try:
            return cls(method=meta["method"], units=units, tensors=meta["tensors"], head=meta.get("head", []),
                       budget=meta.get("budget"), options=meta.get("options", {}), stats=meta.get("stats", {}))
        except KeyError as exc:
            raise ValueError(f"plan lacks {exc}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"plan is malformed: {exc}") from None

    # ---------------------------------------------------------------- checks
    def check_model(self, model: nn.Module) -> None:
        """Raise a ValueError naming the differences if ``model`` is not the model this plan was made for."""
        have = model_shapes(model)
        missing = [n for n in self.tensors if n not in have]
        extra = [n for n in have if n not in self.tensors]
        wrong = [(n, self.tensors[n], have[n]) for n in self.tensors if n in have and have[n] != self.tensors[n]]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensors missing from the model (e.g. {missing[:3]})")
            if extra:
                parts.append(f"{len(extra)} tensors the plan does not know (e.g. {extra[:3]})")
            if wrong:
                n, a, b = wrong[0]
                parts.append(f"{len(wrong)} shape mismatches (e.g. {n}: plan {a}, model {b})")
            raise ValueError(f"plan ({self.method}) was made for a different model: " + "; ".join(parts))

    def with_units(self, units: Iterable[Unit]) -> "Plan":
        return replace(self, units=list(units))


def _natural_key(s: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
