"""Task deltas: exactly what a plan trained, safe to load, refusing the wrong base model.

A delta folder holds ``delta.safetensors`` and ``delta.json``. The tensors are only what was
trained (see :meth:`sensitune.planning.Plan.parameters`):

* sparse units: the values vector, plus the plan's flat indices (``plan::<i>:<target>``),
  bit-packed at ceil(log2 numel) bits each (format 3; format 2 stored them in the narrowest
  integer dtype that holds the target's numel, uint8 / int16 / int32 / int64, and reading
  gives them back in that dtype whichever format was read);
* LoRA / adapter / AdaptFormer weights and the head: float32, or for ``bits`` < 32 the
  bit-packed level codes and μ, σ of :func:`sensitune.tuners.quant.pack_quantized`
  (``<param>::codes``, ``::mu``, ``::sigma``);
* full tensors and biases as they are;
* BatchNorm running statistics (``buffer::<name>``): training in train mode moves them, so they
  belong to the task (``norm_stats=False`` leaves them out when they were kept frozen).

``delta.json`` carries the plan (units, no indices), the method, the backbone (name, how to get
its weights, image size), whether it stores BatchNorm statistics (``norm_stats``), the
fingerprint of the base weights the delta relies on (see
:func:`sensitune.artifacts.merge.base_fingerprint`: every base tensor except the head, the
tensors the delta replaces in full and — only if the delta stores them — BatchNorm running
statistics), class names, the data
config, a manifest of every stored tensor (dtype, shape, part), the storage report, the
sensitune version and the format version. Reading uses safetensors and json only: no pickle,
so a delta cannot run code.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sensitune.artifacts import compact
# separators inside stored keys ("::" cannot occur in a torch parameter name)
from sensitune.artifacts.compact import BUFFER_PREFIX, LOWBIT_FIELDS, PLAN_PREFIX
from sensitune.artifacts.merge import base_fingerprint
from sensitune.artifacts.merge import norm_stats as _norm_stats
from sensitune.artifacts.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPES,
    READABLE_VERSIONS,
    WRITABLE_VERSIONS,
    META_FILE,
    TENSORS_FILE,
    AtomicDir,
    BaseMismatchError,
    DeltaError,
    dtype_name,
    index_bits,
    index_dtype,
    json_safe,
    read_json,
    tensor_nbytes,
    write_json_atomic,
)
from sensitune.state import LoadedDelta, data_config_of, find_state, source_of, state_of


# ----------------------------------------------------------------------------- plan glue
def _plan_to_record(plan) -> tuple[dict, dict[str, Tensor]]:
    """The plan as JSON (no indices) and its sparse indices keyed ``plan::<i>:<target>``."""
    from sensitune.planning.plan import index_key

    tensors = {}
    for i, u in enumerate(plan.units):
        if u.indices is not None:
            tensors[PLAN_PREFIX + index_key(i, u.target)] = u.indices.to(index_dtype(u.numel)).contiguous()
    return plan.to_json(), tensors


def _plan_from_record(record: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str):
    """Rebuild the Plan from delta.json's ``plan`` and the stored indices.

    Plan.from_json validates the JSON and each unit's index range first; the checks here are
    the ones it cannot make: the stored dtype, no repeats (Unit deduplicates) and the recorded nnz.
    """
    from sensitune.planning.plan import Plan, index_key

    try:
        plan = Plan.from_json(record, tensors, prefix=PLAN_PREFIX)
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaError(f"{where}: {META_FILE} holds an invalid plan ({exc})") from None
    for i, u in enumerate(plan.units):
        if u.indices is None:
            continue
        key = PLAN_PREFIX + index_key(i, u.target)
        idx = tensors[key]
        if idx.dtype not in INDEX_DTYPES:
            raise DeltaError(f"{where}: {key} has dtype {dtype_name(idx.dtype)}; indices must be an integer dtype")
        if idx.numel() != u.indices.numel():
            raise DeltaError(f"{where}: {key} has repeated indices")
        nnz = record["units"][i].get("nnz", idx.numel())
        if idx.numel() != nnz:
            raise DeltaError(f"{where}: {key} holds {idx.numel()} indices but the plan says nnz={nnz}")
    return plan


def quantised_params(plan) -> dict[str, int]:
    """name -> bits of every trained tensor stored as packed low-bit codes (each mode says which:
    LoRA A and B, adapter/AdaptFormer down and up weights, a k-bit head's weight; adapter biases
    stay float32 — as in Plan.nbytes)."""
    return {name: bits for u in plan.units for name, bits in u.spec.quantised(u).items()}


def _float_plan(plan):
    """The plan with every unit at bits=32: what a model rebuilt from stored codes runs.

    The stored codes dequantise to exactly the weight the quantised forward used; feeding that
    weight to a float layer reproduces the trained forward bit for bit (quantising it again
    would not: its mean and std differ from the latent weight's).
    """
    return plan.with_units([u.with_options(bits=32) if u.bits != 32 else u for u in plan.units])


# ----------------------------------------------------------------------------- the Delta value
@dataclass
class Delta:
    """A delta read from disk (or about to be written): its metadata and stored tensors."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    path: Path | None = None
    _plan: Any = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "delta"

    @property
    def plan(self):
        if self._plan is None:
            self._plan = _plan_from_record(self.meta["plan"], self.tensors, self.where)
        return self._plan

    @property
    def method(self) -> str:
        return self.meta.get("method") or self.meta["plan"]["method"]

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        n = self.meta.get("num_classes")
        if n is None:
            raise DeltaError(f"{self.where}: delta.json does not record num_classes")
        return int(n)

    @property
    def has_norm_stats(self) -> bool:
        """Whether the delta stores BatchNorm statistics, so its fingerprint leaves the base's out.

        Deltas written before delta.json recorded ``norm_stats`` used that rule whatever they stored.
        """
        return bool(self.meta.get("norm_stats", True))

    @property
    def storage(self) -> dict[str, Any]:
        return self.meta.get("storage", {})

    def params(self) -> dict[str, dict]:
        """Manifest entries of trained parameters, by parameter name (low-bit fields grouped)."""
        out: dict[str, dict] = {}
        for key, info in self.meta["tensors"].items():
            if "param" in info:
                out.setdefault(info["param"], {}).setdefault("keys", {})[info.get("field", "value")] = key
                out[info["param"]].update({k: v for k, v in info.items() if k in ("bits", "param_shape", "role")})
        return out

    def param_tensor(self, name: str) -> Tensor:
        """The float value of trained parameter ``name`` (dequantised if stored as codes)."""
        from sensitune.tuners.quant import unpack_quantized

        entry = self.params().get(name)
        if entry is None:
            raise DeltaError(f"{self.where}: no stored tensor for parameter {name!r}")
        keys = entry["keys"]
        if "value" in keys:
            return self.tensors[keys["value"]]
        stored = {f: self.tensors[keys[f]] for f in LOWBIT_FIELDS}
        stored["shape"] = torch.tensor(entry["param_shape"], dtype=torch.int64)
        stored["bits"] = torch.tensor([entry["bits"]], dtype=torch.int64)
        try:
            return unpack_quantized(stored, name=f"{self.where}: {name}")
        except (KeyError, TypeError, ValueError) as exc:
            raise DeltaError(f"{self.where}: stored codes of {name!r} are invalid: {exc}") from None


def resolve_delta_dir(path: str | os.PathLike) -> Path:
    """A delta folder, or a run folder holding one (``<run>/delta``), as a Path."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    if (p / "delta" / META_FILE).is_file():
        return p / "delta"
    if not p.exists():
        raise FileNotFoundError(f"delta folder {p} does not exist")
    raise FileNotFoundError(f"{p} holds no {META_FILE} (nor {p / 'delta' / META_FILE}): not a delta or run folder")


def read_delta(path: str | os.PathLike) -> Delta:
    """Read and check a delta folder: format, stored tensors against the plan (v2, v3) or the
    manifest (v1), dtypes, shapes, and that delta.json's claims agree with what is stored."""
    folder = resolve_delta_dir(path)
    where = folder / META_FILE
    meta = read_json(where)
    if meta.get("format") != FORMAT_NAME:
        raise DeltaError(f"{where}: not a sensitune delta (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DeltaError(f"{where}: delta format version {version!r} is not supported (this sensitune reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("packed",) if version >= 2 else ("plan", "tensors"):
        if key not in meta:
            raise DeltaError(f"{where}: missing {key!r}")
    if "base_fingerprint" not in meta:
        raise DeltaError(f"{where}: missing 'base_fingerprint'")
    tfile = folder / TENSORS_FILE
    if not tfile.is_file():
        raise FileNotFoundError(f"{tfile} is missing")
    try:
        stored = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltaError(f"{tfile}: not a readable safetensors file ({exc})") from None
    delta = _read_compact(meta, stored, folder, version) if version >= 2 else _read_v1(meta, stored, folder)
    _check_claims(delta)
    return delta


def _read_v1(meta: dict, tensors: dict[str, Tensor], folder: Path) -> Delta:
    tfile = folder / TENSORS_FILE
    manifest: dict[str, dict] = meta["tensors"]
    missing = sorted(set(manifest) - set(tensors))
    extra = sorted(set(tensors) - set(manifest))
    if missing:
        raise DeltaError(f"{tfile}: missing tensor(s) {missing[:5]} listed in {META_FILE}")
    if extra:
        raise DeltaError(f"{tfile}: unexpected tensor(s) {extra[:5]} not listed in {META_FILE}")
    for key, info in manifest.items():
        t = tensors[key]
        if dtype_name(t.dtype) != info.get("dtype"):
            raise DeltaError(f"{tfile}: tensor {key!r} has dtype {dtype_name(t.dtype)}, {META_FILE} says {info.get('dtype')}")
        if list(t.shape) != list(info.get("shape", [])):
            raise DeltaError(f"{tfile}: tensor {key!r} has shape {list(t.shape)}, {META_FILE} says {info.get('shape')}")
    return Delta(meta=meta, tensors=tensors, path=folder)


def _read_compact(meta: dict, groups: dict[str, Tensor], folder: Path, version: int) -> Delta:
    """Unpack the plan, cut the group tensors (format 2 or 3) into the v1 layout (tensors + manifest in ``meta``)."""
    where = str(folder / TENSORS_FILE)
    packed = compact.unpack_json(meta["packed"], str(folder / META_FILE))
    record = packed.get("plan") if isinstance(packed, dict) else None
    plan, tensors, manifest = compact.decode(
        groups, packed, lambda indices: _plan_from_record(record, indices, str(folder / META_FILE)), where,
        packed_indices=version >= 3)
    meta = {**meta, "plan": record, "tensors": manifest}
    return Delta(meta=meta, tensors=tensors, path=folder, _plan=plan)


def _check_claims(delta: Delta) -> None:
    """delta.json's own statements must agree with what it stores (a hand-edited file is refused)."""
    where = f"{delta.where}: {META_FILE}"
    stats = [k for k, info in delta.meta["tensors"].items() if info.get("part") == "norm_stats"]
    if stats and delta.meta.get("norm_stats") is False:
        raise DeltaError(f"{where} says norm_stats=false but the delta stores {len(stats)} BatchNorm statistics "
                         f"(e.g. {stats[0]!r}): its fingerprint would then include statistics it replaces")
    n = delta.meta.get("num_classes")
    if n is not None:
        plan = delta.plan
        heads = [(name, plan.tensors[name]) for name in plan.head if name in plan.tensors]
        if type(n) is not int or (heads and heads[0][1][0] != n):
            raise DeltaError(f"{where} says num_classes={n!r} but the head {heads[0][0]} has "
                             f"{heads[0][1][0]} outputs" if heads else f"{where}: num_classes={n!r} is not an integer")
        names = delta.meta.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != n):
            raise DeltaError(f"{where} lists {len(names) if isinstance(names, list) else names!r} class names for "
                             f"num_classes={n}")


# ----------------------------------------------------------------------------- storage report
def _minimum_bytes(info: Mapping[str, Any], t: Tensor) -> float:
    """Least bytes the information in one stored tensor needs (before per-file overheads)."""
    part = info["part"]
    if part == "sparse_indices":  # format 3 stores them packed: ``count`` indices in t's bytes
        return int(info.get("count", t.numel())) * index_bits(int(info["target_numel"])) / 8
    if part == "lowbit_codes":
        return math.prod(info["param_shape"]) * int(info["bits"]) / 8
    return float(tensor_nbytes(t))


def storage_report(manifest: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor],
                   file_bytes: int | None = None) -> dict[str, Any]:
    """Bytes by part, stored vs the theoretical minimum (values + index bits + packed codes)."""
    by_part: dict[str, dict[str, float]] = {}
    for key, info in manifest.items():
        t = tensors[key]
        row = by_part.setdefault(info["part"], {"tensors": 0, "stored_bytes": 0, "minimum_bytes": 0.0})
        row["tensors"] += 1
        row["stored_bytes"] += tensor_nbytes(t)
        row["minimum_bytes"] += _minimum_bytes(info, t)
    for row in by_part.values():
        row["minimum_bytes"] = math.ceil(row["minimum_bytes"])
    payload = sum(r["stored_bytes"] for r in by_part.values())
    minimum = sum(r["minimum_bytes"] for r in by_part.values())
    report: dict[str, Any] = {"by_part": by_part, "tensor_bytes": payload, "minimum_bytes": minimum}
    if file_bytes is not None:
        report["safetensors_bytes"] = file_bytes
        report["safetensors_header_bytes"] = file_bytes - payload
    return report


def format_storage(report: Mapping[str, Any]) -> str:
    """A small table of the storage report (what ``sensitune export`` prints)."""
    lines = [f"{'part':<16}{'tensors':>8}{'stored B':>12}{'minimum B':>12}"]
    for part, row in sorted(report["by_part"].items()):
        lines.append(f"{part:<16}{row['tensors']:>8}{row['stored_bytes']:>12,}{row['minimum_bytes']:>12,}")
    lines.append(f"{'tensors total':<24}{report['tensor_bytes']:>12,}{report['minimum_bytes']:>12,}")
    if "on_disk_bytes" in report:
        ratio = report["on_disk_bytes"] / max(1, report["minimum_bytes"])
        lines.append(f"on disk: {report['on_disk_bytes']:,} B (safetensors {report['safetensors_bytes']:,} incl. "
                     f"{report['safetensors_header_bytes']:,} header, json {report['json_bytes']:,}) = "
                     f"{ratio:.2f}x the minimum of {report['minimum_bytes']:,} B")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- save
def _model_plan(model: nn.Module, plan):
    from sensitune.tuners import applied_plan

    # a reloaded low-bit delta runs a float copy of its plan; the recorded original keeps the bits
    if plan is None:
        state = find_state(model)
        plan = state.delta.plan if state is not None and state.delta is not None else applied_plan(model)
    if plan is None:
        raise ValueError("save_delta needs the plan the model was tuned with: pass plan=... "
                         "(or tune the model with sensitune.apply_plan, which records it)")
    return plan


def _source(model: nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    """How to rebuild the base: backbone name, the ``pretrained`` argument, image size.

    The model's recorded source (``ModelState.source``, from create_backbone) and
    ``meta['backbone']`` describe the weights (``pretrained`` there is a description such as
    ``timm:...`` or a package file); the argument to pass back to create_backbone is derived
    from it: ``"none"``, the checkpoint path, or ``"auto"`` (packaged or downloadable weights).
    """
    src = {**source_of(model), **dict(meta.get("backbone") or {})}
    weights = str(src.get("weights", src.get("pretrained", "unknown")))
    if "pretrained_arg" in src:
        arg = src["pretrained_arg"]
    elif str(src.get("name", "")).startswith("hf:"):
        arg = "auto"  # Hugging Face backbones load their own weights (repo id or local dir in the name)
    elif weights == "none":
        arg = "none"
    elif Path(weights).is_absolute():
        arg = weights
    elif weights == "unknown":
        arg = None
    else:
        arg = "auto"
    img_size = src.get("img_size")
    if img_size is None:
        dcfg = data_config_of(model) or meta.get("data_config")
        img_size = int(dcfg["input_size"][-1]) if dcfg else None
    return {"name": src.get("requested") or src.get("name"), "timm_name": src.get("name"),
            "pretrained": arg, "weights": weights, "img_size": img_size}


class _Stored:
    """What a delta stores, in storage order: each tensor (CPU, contiguous) under its v1 key,
    with its manifest entry (dtype, shape, part and the facts that part needs)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.manifest: dict[str, dict[str, Any]] = {}

    def put(self, key: str, t: Tensor, **info: Any) -> None:
        t = t.detach().to("cpu").contiguous()
        self.tensors[key] = t
        self.manifest[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), **info}


def _store_indices(stored: _Stored, plan) -> None:
    """The sparse units' flat indices, in the narrowest integer dtype of each target."""
    from sensitune.planning.plan import index_key

    _, plan_tensors = _plan_to_record(plan)
    for i, u in enumerate(plan.units):
        if u.indices is not None:
            key = PLAN_PREFIX + index_key(i, u.target)
            stored.put(key, plan_tensors[key], part="sparse_indices", unit=i, target=u.target,
                       target_numel=math.prod(u.shape))


def _trained_parameter(model: nn.Module, name: str, plan) -> Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise ValueError(f"the model has no parameter {name!r} that the plan ({plan.method}) trains; "
                         f"was the plan applied to this model (sensitune.apply_plan)?") from None


def _store_lowbit(stored: _Stored, name: str, param: Tensor, bits: int, cached: tuple | None,
                  info: dict[str, Any]) -> None:
    """A k-bit weight as its packed codes and μ, σ; a reloaded weight left unchanged keeps the
    codes it was loaded from (packing its dequantised value again would not give them back)."""
    from sensitune.tuners.quant import pack_quantized

    if cached is not None and cached[1] == bits and torch.equal(cached[2], param.detach().cpu()):
        packed = cached[0]
    else:
        packed = pack_quantized(param.detach().to("cpu", torch.float32), bits)
    info = dict(info, bits=bits, param_shape=list(param.shape))
    stored.put(f"{name}::codes", packed["codes"], part="lowbit_codes", field="codes", **info)
    stored.put(f"{name}::mu", packed["mu"], part="lowbit_stats", field="mu", **info)
    stored.put(f"{name}::sigma", packed["sigma"], part="lowbit_stats", field="sigma", **info)


def _store_parameters(stored: _Stored, model: nn.Module, plan) -> None:
    """Every parameter the plan trains, in plan order: floats as they are, k-bit ones packed."""
    quantised = quantised_params(plan)
    state = find_state(model)
    cache = state.delta.packed if state is not None and state.delta is not None else {}
    roles = {name: role for name, role, _ in plan.parameters()}
    unit_of = {name: i for i, u in enumerate(plan.units) for name, _, _ in u.parameters()}
    for name, role in roles.items():
        param = _trained_parameter(model, name, plan)
        info = {"param": name, "role": role, "unit": unit_of[name]}
        if name in quantised:
            _store_lowbit(stored, name, param, quantised[name], cache.get(name), info)
        else:
            stored.put(name, param, part=plan.units[unit_of[name]].spec.part(role), **info)


def _record(model: nn.Module, plan, meta: Mapping[str, Any], norm_stats: bool, fingerprint: str) -> dict[str, Any]:
    """delta.json's plain facts (the packed plan and the storage report are added by the caller)."""
    from sensitune import __version__

    head_shapes = [plan.tensors[n] for n in plan.head if n in plan.tensors]
    num_classes = meta.get("num_classes") or (head_shapes[0][0] if head_shapes else None)
    class_names = meta.get("class_names")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"meta['class_names'] has {len(class_names)} names but the head has {num_classes} classes")
    known = {"class_names", "data_config", "backbone", "num_classes", "method", "norm_stats"}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sensitune_version": __version__,
        "method": meta.get("method") or plan.method,
        "backbone": _source(model, meta),
        "norm_stats": norm_stats,
        "base_fingerprint": fingerprint,
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "data_config": meta.get("data_config") or data_config_of(model),
        "trainable": {"with_head": plan.num_trainable(True), "without_head": plan.num_trainable(False)},
        "extra": {k: v for k, v in meta.items() if k not in known},
    }


def _write(out: Path, groups: dict[str, Tensor], record: dict[str, Any], stored: Mapping[str, tuple[dict, Tensor]]
           ) -> None:
    """Both files into ``out`` atomically; delta.json's storage report counts delta.json itself.

    ``stored``: each entry's manifest info and tensor as written (packed indices as their bytes).
    """
    with AtomicDir(out) as tmp:
        save_file(groups, str(tmp / TENSORS_FILE), metadata={"format": FORMAT_NAME})
        report = storage_report({k: info for k, (info, _) in stored.items()}, {k: t for k, (_, t) in stored.items()},
                                (tmp / TENSORS_FILE).stat().st_size)
        record["storage"] = report
        # the JSON records its own size: iterate until the number no longer changes its length
        for _ in range(4):
            # compact: it is part of the task's bytes on disk (pretty-print with `python -m json.tool`)
            write_json_atomic(tmp / META_FILE, json_safe(record), compact=True)
            size = (tmp / META_FILE).stat().st_size
            if report.get("json_bytes") == size:
                break
            report["json_bytes"] = size
            report["on_disk_bytes"] = size + report["safetensors_bytes"]


def save_delta(model: nn.Module, path: str | os.PathLike, *, plan=None, meta: Mapping[str, Any] | None = None,
               norm_stats: bool | None = None, format_version: int = FORMAT_VERSION) -> Path:
    """Write what ``plan`` trained in ``model`` to the folder ``path`` (atomically) and return it.

    ``plan``: the Plan applied to ``model`` (default: the one apply_plan recorded on it).
    ``meta``: optional facts to record — ``class_names``, ``data_config``, ``backbone`` (name,
    pretrained, img_size), and anything else JSON-able (kept under ``extra``).
    ``norm_stats``: store BatchNorm running statistics (default True; they belong to the task
    when training ran BatchNorm in train mode). Pass False if they were kept frozen.
    ``format_version``: 3 (default: sparse indices bit-packed) or 2 (indices in an integer
    dtype, for a reader older than format 3; same content, a few % larger for sparse methods).
    """
    if format_version not in WRITABLE_VERSIONS:
        raise ValueError(f"format_version={format_version!r}: save_delta writes {WRITABLE_VERSIONS}")
    plan = _model_plan(model, plan)
    meta = dict(meta or {})
    stored = _Stored()
    _store_indices(stored, plan)
    _store_parameters(stored, model, plan)
    norm_stats = bool(meta.get("norm_stats", True) if norm_stats is None else norm_stats)
    fingerprint = base_fingerprint(model, plan, delta_has_norm_stats=norm_stats)
    if norm_stats:
        for bname, buf in _norm_stats(model).items():
            stored.put(f"{BUFFER_PREFIX}{bname}", buf, part="norm_stats", buffer=bname)
    record = _record(model, plan, meta, norm_stats, fingerprint)
    record["format_version"] = format_version
    # compact layout: one tensor per part and dtype, the plan packed, (format 3) the indices
    # bit-packed; see artifacts/compact.py
    groups, packed, written = compact.encode(stored.manifest, stored.tensors, plan,
                                             packed_indices=format_version >= 3)
    record["packed"] = compact.pack_json(packed)
    out = Path(path)
    _write(out, groups, record, written)
    return out


# ----------------------------------------------------------------------------- load
def _prepare_base(base: nn.Module | str | None, delta: Delta) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from sensitune.models import create_backbone

    bb = delta.meta.get("backbone") or {}
    name = base or bb.get("name")
    pretrained = bb.get("pretrained")
    if not name or pretrained is None:
        raise DeltaError(f"{delta.where}: the delta does not record how to build its base model "
                         f"(backbone={bb}); pass the base model itself to load_delta")
    if pretrained == "none":
        warnings.warn(f"{delta.where}: the base was randomly initialised (pretrained='none'); a new random "
                      f"model will not match its fingerprint unless the same seed built it", stacklevel=3)
    return create_backbone(name, delta.num_classes, pretrained=pretrained, img_size=bb.get("img_size"))


def _fit_head(model: nn.Module, plan) -> None:
    """Give the base the delta's class count (timm ``reset_classifier``) if it differs."""
    params = dict(model.named_parameters())
    wrong = [n for n in plan.head if n in params and tuple(params[n].shape) != tuple(plan.tensors[n])]
    if not wrong:
        return
    num_classes = plan.tensors[wrong[0]][0]
    reset = getattr(model, "reset_classifier", None)
    if not callable(reset):
        raise DeltaError(f"the base model's head {wrong[0]} has shape {tuple(params[wrong[0]].shape)}, the delta's "
                         f"{tuple(plan.tensors[wrong[0]])}; build the base with {num_classes} classes")
    reset(num_classes)


def check_fingerprint(model: nn.Module, delta: Delta, *, force: bool = False) -> str:
    """Refuse (or with ``force`` warn about) a base whose weights differ from the delta's base."""
    have = base_fingerprint(model, delta.plan, delta_has_norm_stats=delta.has_norm_stats)
    want = delta.meta["base_fingerprint"]
    if have != want:
        bb = delta.meta.get("backbone") or {}
        msg = (f"{delta.where} was trained on different base weights: the delta's base fingerprint is "
               f"{want[:16]}…, the given model's is {have[:16]}… (delta backbone {bb.get('name')!r}, "
               f"weights {bb.get('weights')!r}). Load it onto the base it was trained on")
        if not force:
            raise BaseMismatchError(msg + ", or pass force=True (CLI: --force) to apply it anyway.", want=want,
                                    have=have)
        warnings.warn(msg + "; applying anyway because force=True: outputs may be meaningless.", stacklevel=3)
    return have


def load_delta(base_model_or_name: nn.Module | str | None, path: str | os.PathLike | Delta, *,
               force: bool = False) -> nn.Module:
    """The base model with the delta applied (in place if a model is given) and returned.

    ``base_model_or_name``: the base model, a backbone name, or None for the backbone the delta
    recorded (built with its recorded pretrained weights and image size). The base's weight
    fingerprint must match the delta's (``force=True`` overrides with a warning). Every stored
    tensor is checked against the plan and the model (missing or extra keys, shapes, index
    ranges, dtypes); an error names the key. Low-bit weights come back dequantised into float
    layers, giving bit-identical logits to the trained quantised model.
    """
    delta = path if isinstance(path, Delta) else read_delta(path)
    model = _prepare_base(base_model_or_name, delta)
    fingerprint = check_fingerprint(model, delta, force=force)
    return apply_delta(model, delta, fingerprint)


class _Rollback:
    """Put a model back exactly as it was if applying a delta fails half-way (all or nothing).

    Taken before anything changes: every module's attribute dict and its parameter, buffer,
    sub-module and hook dicts (shallow copies: references, O(modules)), the fields of the model's
    :class:`~sensitune.state.ModelState` (apply_plan writes into that object in place), every
    parameter's ``requires_grad``, and clones of the base tensors a delta writes into (the tensors
    it replaces, BatchNorm statistics). :meth:`restore` reinstates all of it, so the caller's model
    has the same modules, tensors (bit for bit), flags and hooks as before the call.
    """

    _DICTS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")

    def __init__(self, model: nn.Module, written: set[str]) -> None:
        self.modules = list(model.modules())
        self.dicts = [({k: v for k, v in m.__dict__.items()},
                       {k: copy.copy(m.__dict__[k]) for k in self._DICTS if k in m.__dict__}) for m in self.modules]
        self.state = find_state(model)
        self.state_fields = dict(vars(self.state)) if self.state is not None else {}
        self.grad = [(p, p.requires_grad) for p in model.parameters()]
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        self.data = [(tensors[n], tensors[n].detach().clone()) for n in sorted(written) if n in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for m, (attrs, dicts) in zip(self.modules, self.dicts):
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, d in dicts.items():
                live = m.__dict__[k]
                live.clear()
                live.update(d)
        if self.state is not None:
            vars(self.state).update(self.state_fields)
        for p, flag in self.grad:
            p.requires_grad_(flag)
        for t, saved in self.data:
            t.copy_(saved)


def apply_delta(model: nn.Module, delta: Delta, fingerprint: str) -> nn.Module:
    """Apply a read ``delta`` to a base whose fingerprint was already checked (``fingerprint``).

    All or nothing: when any stored tensor turns out not to fit (shape, dtype, a buffer the
    model lacks), the DeltaError leaves ``model`` exactly as it was given.
    """
    plan = delta.plan
    expected = {name for name, _, _ in plan.parameters()}
    stored = delta.params()
    missing = sorted(expected - set(stored))
    extra = sorted(set(stored) - expected)
    if missing:
        raise DeltaError(f"{delta.where}: missing trained tensor(s) for {missing[:5]} of the plan")
    if extra:
        raise DeltaError(f"{delta.where}: tensor(s) for {extra[:5]} that the plan does not train")
    quantised = quantised_params(plan)
    for name, entry in stored.items():
        bits = entry.get("bits")
        if (name in quantised) != ("value" not in entry["keys"]) or (bits is not None and bits != quantised.get(name)):
            raise DeltaError(f"{delta.where}: parameter {name!r} is stored "
                             f"{'as codes' if 'value' not in entry['keys'] else 'as floats'} but the plan says "
                             f"bits={quantised.get(name, 32)}")
    norm = {info.get("buffer", ""): key for key, info in delta.meta["tensors"].items() if info.get("part") == "norm_stats"}
    rollback = _Rollback(model, (expected & {n for n, _ in model.named_parameters()}) | set(norm))
    try:
        return _apply_checked(model, delta, plan, expected, stored, quantised, norm)
    except BaseException:
        rollback.restore()
        raise


def _fitted(value: Tensor, target: Tensor, delta: Delta, key: str, name: str) -> Tensor:
    """``value`` in ``target``'s shape: a compact (v2, v3) delta stores every tensor flat."""
    if tuple(value.shape) != tuple(target.shape):
        flat = int(delta.meta.get("format_version", 1)) >= 2 and value.dim() == 1
        if not (flat and value.numel() == target.numel()):
            raise DeltaError(f"{delta.where}: tensor {key!r} has shape {tuple(value.shape)} but the model's "
                             f"{name} is {tuple(target.shape)}")
        value = value.view(target.shape)
    return value


def _apply_checked(model: nn.Module, delta: Delta, plan, expected: set[str], stored: dict, quantised: dict[str, int],
                   norm: dict[str, str]) -> nn.Module:
    from sensitune.tuners import apply_plan

    _fit_head(model, plan)
    try:
        plan.check_model(model)
    except ValueError as exc:
        raise DeltaError(f"{delta.where}: {exc}") from None
    apply_plan(model, _float_plan(plan))
    params = dict(model.named_parameters())
    packed: dict[str, tuple[dict, int, Tensor]] = {}
    with torch.no_grad():
        for name in sorted(expected):
            target = params.get(name)
            if target is None:
                raise DeltaError(f"{delta.where}: apply_plan did not create parameter {name!r}")
            value = delta.param_tensor(name)
            value = _fitted(value, target, delta, next(iter(stored[name]["keys"].values())), name)
            if not torch.is_floating_point(value):
                raise DeltaError(f"{delta.where}: tensor for {name!r} has dtype {dtype_name(value.dtype)}, expected float")
            target.copy_(value.to(target.dtype))
            if name in quantised:
                keys = stored[name]["keys"]
                packed[name] = ({f: delta.tensors[keys[f]] for f in LOWBIT_FIELDS}, quantised[name],
                                target.detach().cpu().clone())
        buffers = dict(model.named_buffers())
        for bname, key in norm.items():
            buf = buffers.get(bname)
            if buf is None or buf.numel() != delta.tensors[key].numel():
                raise DeltaError(f"{delta.where}: tensor {key!r} does not fit a buffer of the model "
                                 f"({'no such buffer' if buf is None else f'shape {tuple(buf.shape)}'})")
            buf.copy_(_fitted(delta.tensors[key], buf, delta, key, bname).to(buf.dtype))
    state_of(model).delta = LoadedDelta(
        path=str(delta.path) if delta.path else None, method=delta.method, class_names=delta.class_names,
        data_config=delta.meta.get("data_config"), backbone=delta.meta.get("backbone"), plan=plan, packed=packed)
    return model


# ----------------------------------------------------------------------------- predict
@torch.no_grad()
def predict_topk(model: nn.Module, images: list, delta: Delta, *, k: int = 5,
                 batch_size: int = 16) -> list[list[tuple[int, str, float]]]:
    """Top-``k`` (class index, name, probability) of PIL images, preprocessed as the delta records."""
    from sensitune.data import build_transform

    dcfg = delta.meta.get("data_config")
    if not dcfg:
        raise DeltaError(f"{delta.where}: delta.json records no data_config; cannot preprocess images")
    transform = build_transform(dcfg, train=False)
    device = next(model.parameters()).device
    names = delta.class_names
    out: list[list[tuple[int, str, float]]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
        probs = model(batch).float().softmax(dim=-1)
        p, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)
        for pi, ii in zip(p.tolist(), idx.tolist()):
            out.append([(i, names[i] if i < len(names) else str(i), pv) for i, pv in zip(ii, pi)])
    return out
