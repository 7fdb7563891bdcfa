"""The Plan: the one serialisable answer to "where and how is this model tuned".

A :class:`Plan` is a list of :class:`Unit` s plus the shapes of the model it was made for.
Every tensor not named by a unit stays frozen. A unit names a tuning mode, and everything that
depends on the mode — its options, what it may target, its parameter and byte cost, how it
attaches, merges, is stored and exported — is asked of the mode's spec in the registry
(:mod:`sensitune.tuners.modes`: ``full``, ``head``, ``sparse``, ``lora``, ``adapter``,
``adaptformer``, ``ssf``); an unregistered mode is refused when the unit is built.

The Plan is the language of the tuners (``apply_plan`` reads it); the planners in
:mod:`sensitune.planning` decide what goes in it, so planning imports tuners and never the
other way round.

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
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from sensitune.io import atomic_save_file, atomic_write_text, index_dtype
from sensitune.tuners.modes import Mode, get_mode, registered


def __getattr__(name: str) -> Any:
    if name == "MODES":  # the registry can grow after import: answer with what it holds now
        return registered()
    if name == "STRUCTURED":
        return tuple(m for m in registered() if get_mode(m).structured)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: roles of trainable parameters (see :meth:`Plan.parameters`)
ROLES: tuple[str, ...] = ("full", "bias", "head", "sparse", "lora_A", "lora_B", "adapter", "ssf")

FORMAT_VERSION = 1
#: per-unit JSON keys that are not options of the unit's mode
_UNIT_KEYS = ("target", "mode", "shape", "slice", "slice_rows", "nnz")


class Unit:
    """How one tensor (or a q/k/v row slice of it, a block, or a module) is tuned.

    ``Unit(target, mode, shape, slice=None, slice_rows=None, indices=None, **options)``: the
    options are the mode's (e.g. ``rank``, ``bits``, ``scale``, ``dropout``, ``drop_path``),
    typed and checked by its spec; one it does not take raises ValueError.
    """

    __slots__ = ("target", "mode", "shape", "slice", "slice_rows", "indices", "options")

    def __init__(self, target: str, mode: str, shape: Iterable[int], slice: str | None = None,
                 slice_rows: tuple[int, int] | None = None, indices: Tensor | None = None, **options: Any) -> None:
        self.target = target
        self.mode = mode
        self.shape = tuple(int(s) for s in shape)
        self.slice = slice
        self.slice_rows = None if slice_rows is None else (int(slice_rows[0]), int(slice_rows[1]))
        spec = get_mode(mode)  # unknown mode: ValueError naming the registered ones
        where = f"{mode} unit {target!r}"
        self.options = spec.parse_options(options, where)
        self.indices = self._checked_indices(spec, indices)
        if slice is not None and not spec.sliceable:
            raise ValueError(f"{where}: mode {mode!r} cannot act on a slice ({slice!r})")
        if self.slice is not None and self.slice_rows is None:
            raise ValueError(f"unit {target!r}: slice {slice!r} needs slice_rows")
        spec.check(self)

    def _checked_indices(self, spec: Mode, indices: Tensor | None) -> Tensor | None:
        if not spec.indexed:
            if indices is not None:
                raise ValueError(f"unit {self.target!r}: only sparse units carry indices (mode {self.mode!r})")
            return None
        if indices is None:
            raise ValueError(f"{self.mode} unit {self.target!r} needs indices")
        idx = torch.unique(torch.as_tensor(indices).reshape(-1).to(torch.int64))  # sorted, unique
        if idx.numel() == 0:
            raise ValueError(f"{self.mode} unit {self.target!r} has no indices")
        if int(idx[0]) < 0 or int(idx[-1]) >= math.prod(self.shape):
            raise ValueError(f"{self.mode} unit {self.target!r}: index out of range [0, {math.prod(self.shape)}) "
                             f"(got {int(idx[0])}..{int(idx[-1])})")
        return idx

    # ---------------------------------------------------------------- options
    @property
    def spec(self) -> Mode:
        return get_mode(self.mode)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    # the common options, with the value "absent" means for a mode that has none
    rank = property(lambda self: self.options.get("rank", 0))
    bits = property(lambda self: self.options.get("bits", 32))
    scale = property(lambda self: self.options.get("scale", 1.0))
    dropout = property(lambda self: self.options.get("dropout", 0.0))
    drop_path = property(lambda self: self.options.get("drop_path", 0.0))

    def with_options(self, **options: Any) -> "Unit":
        """A copy with some options changed (checked by the mode like any other)."""
        return Unit(self.target, self.mode, self.shape, slice=self.slice, slice_rows=self.slice_rows,
                    indices=self.indices, **{**self.options, **options})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Unit):
            return NotImplemented
        same_idx = (self.indices is None and other.indices is None) or (
            self.indices is not None and other.indices is not None and torch.equal(self.indices, other.indices))
        return same_idx and all(getattr(self, k) == getattr(other, k) for k in self.__slots__ if k != "indices")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        sl = f", slice={self.slice!r}" if self.slice else ""
        nnz = f", nnz={self.indices.numel()}" if self.indices is not None else ""
        return f"Unit({self.target!r}, {self.mode!r}, {self.shape}{sl}{extra}{nnz})"

    def __copy__(self) -> "Unit":
        new = Unit.__new__(Unit)
        for k in self.__slots__:
            setattr(new, k, getattr(self, k))
        new.options = dict(self.options)
        return new

    # ---------------------------------------------------------------- geometry
    @property
    def site(self) -> str:
        """What the target names: parameter, matrix, block or module (see Mode.site)."""
        return self.spec.site

    @property
    def module(self) -> str:
        """The module apply_plan changes (a parameter's owner, or the block/module itself)."""
        return self.spec.module(self)

    @property
    def leaf(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the matrix the unit acts on (slice rows only, conv kernel flattened)."""
        return self.spec.matrix_shape(self)

    @property
    def key(self) -> str:
        """Name of the unit's sub-module inside the owning module's ModuleDict."""
        return self.slice or "w"

    @property
    def num_params(self) -> int:
        """Trainable scalars this unit adds or unfreezes."""
        return sum(n for _, _, n in self.parameters())

    def parameters(self) -> list[tuple[str, str, int]]:
        """(name after apply_plan, role, numel) of every trainable tensor this unit owns."""
        return self.spec.parameters(self)

    def nbytes(self) -> int:
        """Estimated bytes on disk of what this unit trains (values + indices / packed weights)."""
        return self.spec.nbytes(self)

    # ---------------------------------------------------------------- io
    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target, "mode": self.mode, "shape": list(self.shape)}
        if self.slice is not None:
            d["slice"] = self.slice
            d["slice_rows"] = list(self.slice_rows)
        for opt in self.spec.options:
            value = self.options[opt.name]
            if not (opt.omit_default and value == opt.default):
                d[opt.name] = value
        if self.indices is not None:
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
        options = {k: v for k, v in d.items() if k not in _UNIT_KEYS}
        try:
            return cls(d["target"], d["mode"], tuple(d["shape"]), slice=d.get("slice"),
                       slice_rows=tuple(d["slice_rows"]) if "slice_rows" in d else None,
                       indices=None if indices is None else indices.to(torch.int64), **options)
        except KeyError as exc:
            raise ValueError(f"plan unit lacks {exc}") from None
        except TypeError as exc:
            raise ValueError(f"plan unit {d.get('target')!r} is malformed: {exc}") from None


def index_key(i: int, target: str) -> str:
    """Key of sparse unit ``i``'s flat indices in an indices file (plan files; deltas prefix it)."""
    return f"{i}:{target}"


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
        """Each unit's target fits the model, no unit repeats another, and no two units clash."""
        seen: set[tuple[str, str, str | None]] = set()
        near: dict[str, list[Unit]] = defaultdict(list)  # target or module -> units there
        for u in self.units:
            u.spec.check_target(u, self.tensors)
            key = (u.target, u.mode, u.slice)
            if key in seen:
                raise ValueError(f"plan has two {u.mode} units for {u.target!r} ({u.key})")
            seen.add(key)
            for place in {u.target, u.module}:
                near[place].append(u)
        for u in self.units:
            for v in {id(v): v for place in {u.target, u.module} for v in near[place]}.values():
                if v is u:
                    continue
                if u.spec.clash(u, v) or v.spec.clash(v, u):
                    raise ValueError(f"plan tunes {u.target!r} in incompatible ways: {sorted({u.mode, v.mode})}")
                if (u.mode == v.mode and u.target == v.target and u.spec.sliceable
                        and (u.slice is None) != (v.slice is None)):
                    raise ValueError(f"plan has a whole-matrix {u.mode} and a sliced one on {u.target!r}")

    # ---------------------------------------------------------------- counts
    def is_head_unit(self, u: Unit) -> bool:
        return u.mode == "head" or (u.site == "parameter" and u.target in self.head)

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
            elif u.spec.structured:
                out["structured"] += 1
                out["structured_params"] += u.num_params
            elif u.spec.indexed:
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
            kind = "structured" if u.spec.structured else ("sparse" if u.spec.indexed else "whole")
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.to_json()
        tensors = {index_key(i, u.target): u.indices.to(index_dtype(u.numel)).contiguous()
                   for i, u in enumerate(self.units) if u.indices is not None}
        if tensors:
            side = path.with_suffix(".safetensors")
            atomic_save_file(tensors, side, metadata={"format": "sensitune.plan.indices"})
            meta["indices"] = {"file": side.name, "sha256": _sha256(side)}
        atomic_write_text(path, json.dumps(meta, indent=1))
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
            if isinstance(d, Mapping) and _indexed(d.get("mode")):
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


def _indexed(mode: Any) -> bool:
    """Whether units of ``mode`` carry indices (an unknown mode is refused later, by Unit)."""
    try:
        return get_mode(mode).indexed
    except ValueError:
        return False
