"""Export a task delta in three forms: our delta folder, Hugging Face PEFT, or a merged model.

* ``delta``: a copy of the delta folder (``delta.safetensors`` + ``delta.json``).
* ``peft``: the LoRA part in PEFT's adapter layout (see :mod:`.peft_export`), plus the head and
  any module trained whole as ``modules_to_save``. What PEFT cannot express — sparse entries,
  sequential adapters, AdaptFormer, tuning of a module that also carries a LoRA, root-level
  tensors (``pos_embed``) — is refused by default with the list of those units;
  ``partial=True`` writes the expressible part and returns what was left out (the exported
  model then differs from ours). k-bit LoRA factors go out dequantised (float32): PEFT has no
  packed codes, the logits stay the same.
* ``merged``: ``model.safetensors`` holding the plain model with the delta folded in (see
  :func:`merge`) and ``config.json`` (timm name, classes, image size, preprocessing) — loadable
  with timm alone; :func:`load_merged` does it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sensitune.artifacts.delta import Delta, load_delta, read_delta
from sensitune.artifacts.format import META_FILE, TENSORS_FILE, AtomicDir, json_safe, read_json, write_json_atomic
from sensitune.artifacts.merge import merge, norm_stats
from sensitune.artifacts.peft_export import LoraFactor, build_peft_adapter, write_peft_adapter
from sensitune.tuners.host import tuning_of

MERGED_WEIGHTS = "model.safetensors"
MERGED_CONFIG = "config.json"
MERGED_FORMAT = "sensitune-merged"


@dataclass
class ExportResult:
    """Where an export went, its bytes on disk, and what it could not carry."""

    out: Path
    format: str
    bytes_on_disk: int
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- delta
def export_delta(delta: Delta, out: str | os.PathLike) -> ExportResult:
    """Copy the (already checked) delta folder to ``out`` atomically."""
    if delta.path is None:
        raise ValueError("export_delta needs a delta read from disk")
    with AtomicDir(out) as tmp:
        for name in (TENSORS_FILE, META_FILE):
            shutil.copyfile(delta.path / name, tmp / name)
    return ExportResult(Path(out), "delta", _folder_bytes(Path(out)))


# ----------------------------------------------------------------------------- merged
def export_merged(model: nn.Module, delta: Delta, out: str | os.PathLike) -> ExportResult:
    """Write the merged plain model (safetensors) and a small config beside it."""
    plain = merge(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in plain.state_dict().items()}
    bb = delta.meta.get("backbone") or {}
    config = {
        "format": MERGED_FORMAT, "format_version": 1,
        "timm_name": bb.get("timm_name") or bb.get("name"), "backbone": bb,
        "num_classes": delta.num_classes, "class_names": delta.class_names,
        "img_size": bb.get("img_size"), "data_config": delta.meta.get("data_config"),
        "method": delta.method, "source_delta": str(delta.path) if delta.path else None,
    }
    with AtomicDir(out) as tmp:
        save_file(state, str(tmp / MERGED_WEIGHTS), metadata={"format": MERGED_FORMAT})
        write_json_atomic(tmp / MERGED_CONFIG, json_safe(config))
    return ExportResult(Path(out), "merged", _folder_bytes(Path(out)))


def load_merged(folder: str | os.PathLike) -> nn.Module:
    """A plain timm model from a ``merged`` export (timm + safetensors only; strict keys)."""
    import timm

    folder = Path(folder)
    config = read_json(folder / MERGED_CONFIG)
    if config.get("format") != MERGED_FORMAT:
        raise ValueError(f"{folder / MERGED_CONFIG}: not a sensitune merged export")
    name = config["timm_name"]
    if name is None or str(name).startswith("hf:"):
        raise ValueError(f"{folder}: load_merged rebuilds timm models only (backbone {name!r})")
    kwargs: dict[str, Any] = {"num_classes": config["num_classes"], "pretrained": False}
    model = None
    if config.get("img_size"):
        try:  # ViT-style models are built for their image size (position embeddings)
            model = timm.create_model(name, img_size=config["img_size"], **kwargs)
        except TypeError:  # CNNs take any size and have no such argument
            model = None
    if model is None:
        model = timm.create_model(name, **kwargs)
    state = load_file(str(folder / MERGED_WEIGHTS))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- peft
def _suffix_clash(names: list[str], target: str, dot: bool) -> list[str]:
    """Other modules with tensors that PEFT would also match for ``target`` (it matches by suffix).

    ``names`` lists only modules holding parameters or buffers: PEFT wrapping a stateless one
    (an Identity) changes nothing.
    """
    suffix = f".{target}" if dot else target
    return [n for n in names if n != target and n.endswith(suffix)]


def _label(u) -> str:
    return f"{u.mode}:{u.target}" + (f"[{u.slice}]" if u.slice else "")


def _tensor_owners(modules: dict[str, nn.Module]) -> list[str]:
    """Modules holding parameters or buffers of their own: the only ones PEFT's suffix match affects."""
    return [n for n, m in modules.items()
            if n and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))]


def _lora_factors(plan, modules: dict[str, nn.Module], names: list[str], left_out: list[str],
                  notes: list[str]) -> list[LoraFactor]:
    """Each LoRA unit as PEFT's factors (k-bit ones dequantised), or a left-out line saying why not."""
    from sensitune.tuners.lora import quantized

    factors: list[LoraFactor] = []
    for u in plan.units:
        if u.spec.peft != "lora":
            continue
        mod = modules[u.module]
        lora = mod.lora[u.key]
        if _suffix_clash(names, u.module, dot=True):
            left_out.append(f"{_label(u)} (PEFT would also match {_suffix_clash(names, u.module, True)[:2]})")
            continue
        if isinstance(mod, nn.Conv2d) and (type(mod).__name__ == "Conv2dSame" and mod.kernel_size != (1, 1)):
            left_out.append(f"{_label(u)} (TF-'same'-padded {mod.kernel_size} conv: PEFT pads differently)")
            continue
        A = quantized(lora.A, lora.bits).detach()
        B = quantized(lora.B, lora.bits).detach()
        if lora.bits < 32:
            notes.append(f"{_label(u)}: {lora.bits}-bit factors exported as their dequantised float32 weights")
        kernel = tuple(mod.weight.shape) if isinstance(mod, nn.Conv2d) else None
        factors.append(LoraFactor(u.module, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), scale=lora.scale,
                                  rows=u.slice_rows, out_features=u.shape[0], kernel=kernel, dropout=u.dropout))
        if u.drop_path:
            notes.append(f"{_label(u)}: drop-path on the LoRA output has no PEFT equivalent (training only)")
    return factors


def _modules_to_save(model: nn.Module, plan, names: list[str], left_out: list[str]) -> set[str]:
    """Modules PEFT must save whole: what each mode carries as a module, BatchNorm statistics, the head."""
    from sensitune.models import find_head

    to_save: set[str] = set()
    blocked = {u.module for u in plan.units if u.spec.peft == "lora"} | {u.module for u in plan.units if u.spec.indexed}

    def save_whole(owner: str, what: str) -> None:
        # PEFT matches modules_to_save by name suffix ("bn1" also matches "blocks.0.0.bn1"): every
        # module it will match is saved too, with its current values, so the match is harmless
        # unless one of them carries a LoRA or sparse delta.
        group = [owner] + _suffix_clash(names, owner, dot=False)
        clash = [n for n in group if n in blocked]
        if not owner:
            left_out.append(f"{what} (a root-level tensor: PEFT saves whole modules only)")
        elif clash:
            left_out.append(f"{what} (module {clash[0]} also carries a LoRA or sparse delta)")
        else:
            to_save.update(group)

    head = find_head(model)
    for u in plan.units:
        kind = u.spec.peft  # each mode says how PEFT carries it (lora: _lora_factors), or why it cannot
        if kind == "refuse":
            left_out.append(f"{_label(u)} ({u.spec.peft_refusal or 'no PEFT equivalent'})")
        elif kind == "module":
            save_whole(u.module, _label(u))
    for buf in norm_stats(model):
        save_whole(buf.rsplit(".", 1)[0] if "." in buf else "", f"norm_stats:{buf}")
    if head and any(u.mode == "head" for u in plan.units):
        save_whole(head, f"head:{head}")
    return to_save


def _saved_values(modules: dict[str, nn.Module], to_save: set[str], notes: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The own tensors of each module to save, k-bit weights dequantised."""
    from sensitune.tuners.lora import quantized

    saved: dict[str, dict[str, torch.Tensor]] = {}
    for owner in sorted(to_save):
        mod = modules[owner]
        st = tuning_of(mod)
        values: dict[str, torch.Tensor] = {}
        for pname, p in mod.state_dict().items():
            if "." in pname:  # only the module's own tensors; PEFT saves them by module
                continue
            if st is not None and pname in st.bits:
                p = quantized(p, st.bits[pname])
                notes.append(f"{owner}.{pname}: {st.bits[pname]}-bit weight exported dequantised")
            values[pname] = p.detach()
        saved[owner] = values
    return saved


def peft_parts(model: nn.Module, plan) -> tuple[list[LoraFactor], dict[str, dict[str, torch.Tensor]], list[str], list[str]]:
    """(LoRA factors, modules_to_save, left-out units, notes) of a tuned model for PEFT.

    ``model`` is the tuned model (e.g. from :func:`load_delta`). k-bit factors and heads are
    taken as their dequantised float weights.
    """
    modules = dict(model.named_modules())
    names = _tensor_owners(modules)
    left_out: list[str] = []
    notes: list[str] = []
    factors = _lora_factors(plan, modules, names, left_out, notes)
    to_save = _modules_to_save(model, plan, names, left_out)
    return factors, _saved_values(modules, to_save, notes), left_out, notes


def export_peft(model: nn.Module, delta: Delta, out: str | os.PathLike, *, partial: bool = False) -> ExportResult:
    """Write the PEFT adapter folder for a tuned model; refuse if parts are inexpressible."""
    plan = delta.plan
    factors, saved, left_out, notes = peft_parts(model, plan)
    if left_out and not partial:
        raise ValueError(
            f"PEFT cannot express {len(left_out)} part(s) of this {delta.method} delta: "
            f"{'; '.join(left_out[:6])}{'; …' if len(left_out) > 6 else ''}. "
            f"Use --format delta (exact) or merged, or --partial to export only the LoRA/head part "
            f"(the exported model will then differ from the trained one).")
    if not factors:
        raise ValueError(f"this {delta.method} delta has no LoRA unit, and PEFT's LoRA format needs at least one "
                         f"target module; use --format merged (a plain model) or --format delta")
    bb = delta.meta.get("backbone") or {}
    export = build_peft_adapter(factors, saved, base_model_name=bb.get("name"), left_out=left_out)
    extra = {"source_delta": str(delta.path) if delta.path else None, "method": delta.method,
             "backbone": bb, "class_names": delta.class_names, "notes": notes}
    write_peft_adapter(export, out, extra_meta=extra)
    return ExportResult(Path(out), "peft", _folder_bytes(Path(out)), left_out=left_out, notes=notes)


# ----------------------------------------------------------------------------- dispatcher
FORMATS = ("delta", "peft", "merged")


def export(delta_dir: str | os.PathLike, out: str | os.PathLike, fmt: str, *, partial: bool = False,
           force: bool = False, base: nn.Module | None = None) -> ExportResult:
    """Export the delta in ``delta_dir`` as ``fmt`` (one of :data:`FORMATS`) into ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    delta = read_delta(delta_dir)
    out = Path(out)
    if delta.path is not None and out.resolve() == delta.path.resolve():
        raise ValueError(f"--out {out} is the delta folder itself; choose another folder")
    if fmt == "delta":
        delta.plan  # parse the plan: a tampered delta fails here, not at its user's
        return export_delta(delta, out)
    model = load_delta(base, delta, force=force).eval()
    if fmt == "merged":
        return export_merged(model, delta, out)
    return export_peft(model, delta, out, partial=partial)
