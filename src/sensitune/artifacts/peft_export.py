"""Export the LoRA part of a tuned model to Hugging Face PEFT's adapter layout.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as peft 0.21
writes them for a timm model, so ``PeftModel.from_pretrained(timm_model, folder)`` rebuilds it:
keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and, for
``modules_to_save`` (the head, whole tuned modules), ``base_model.model.<module>.<param>``.

Scaling. PEFT multiplies ``B·A`` by ``lora_alpha / r``. Each target module gets its own rank in
``rank_pattern`` and ``alpha = s·r`` in ``alpha_pattern`` so that PEFT's scaling equals our scale
``s`` (SPT-LoRA: s = 1, no α/r factor).

Fused ``qkv``. Our LoRA may sit on row slices (q, k, v) of timm's fused ``qkv`` Linear, each
slice with its own rank r_s and scale s_s. That is *exactly* one PEFT LoRA on ``qkv`` with rank
Σ r_s: A stacks the slices' A matrices, and B is block-structured: rows of slice s use only the
columns of slice s's rank (B_s, times s_s when the scales differ — then alpha = rank so PEFT's
scaling is 1), every other block is zero. The product B·A is then the per-slice ΔW stacked by
rows, i.e. the same weight change.

What PEFT cannot express — sparse entries, sequential adapters, AdaptFormer, and full or bias
tuning of a module that also carries a LoRA — is listed by :func:`inexpressible`; the exporter
refuses or, with ``partial=True``, writes the expressible part and says what was left out.
Low-bit LoRA factors are exported as their dequantised float weights (PEFT has no k-bit codes),
so the logits are the same but the file is float32-sized.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from sensitune.artifacts.format import AtomicDir, json_safe, write_json_atomic

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: our own notes on the export (source run, what was left out); peft ignores unknown files
EXPORT_NOTES_FILE = "sensitune_export.json"
PREFIX = "base_model.model."


@dataclass
class LoraFactor:
    """One low-rank weight change ΔW[rows] = scale · B @ A on module ``module``.

    ``A``: (r, in·kh·kw) and ``B``: (rows, r) as float tensors (dequantised if low-bit);
    ``rows`` is the (start, stop) row slice of a fused matrix, or None for the whole matrix;
    ``kernel``: the weight's shape (out, in, kh, kw) for a Conv2d, None for a Linear.
    """

    module: str
    A: Tensor
    B: Tensor
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    out_features: int | None = None
    kernel: tuple[int, ...] | None = None
    dropout: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class PeftExport:
    """What :func:`build_peft_adapter` produced: the config, the tensors and what it left out."""

    config: dict
    tensors: dict[str, Tensor]
    left_out: list[str] = field(default_factory=list)


def _combine(module: str, factors: list[LoraFactor]) -> tuple[Tensor, Tensor, int, float]:
    """(A, B, r, alpha) of one PEFT LoRA on ``module`` equal to the sum of ``factors``."""
    whole = [f for f in factors if f.rows is None]
    if whole and len(factors) > 1:
        raise ValueError(f"{module}: a LoRA on the whole matrix cannot be combined with other LoRAs on it")
    if whole:
        f = whole[0]
        return f.A, f.B, f.rank, f.scale * f.rank
    out = factors[0].out_features
    if out is None:
        raise ValueError(f"{module}: row-slice LoRA needs out_features")
    spans = sorted((f.rows for f in factors))  # type: ignore[arg-type]
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"{module}: LoRA row slices overlap ({a0}:{a1} and {b0}:...)")
    rank = sum(f.rank for f in factors)
    same_scale = len({f.scale for f in factors}) == 1
    A = torch.cat([f.A for f in factors], dim=0)
    B = factors[0].B.new_zeros((out, rank))
    col = 0
    for f in factors:
        r0, r1 = f.rows  # type: ignore[misc]
        block = f.B if same_scale else f.B * f.scale
        B[r0:r1, col : col + f.rank] = block
        col += f.rank
    alpha = factors[0].scale * rank if same_scale else float(rank)
    return A, B, rank, alpha


def _as_peft_shapes(A: Tensor, B: Tensor, kernel: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """PEFT's Conv2d LoRA: A is a conv (r, in, kh, kw), B a 1×1 conv (out, r, 1, 1)."""
    if kernel is None:
        return A, B
    _, cin, *k = kernel
    return A.reshape(A.shape[0], cin, *k), B.reshape(B.shape[0], B.shape[1], *([1] * len(k)))


def pattern_key(module: str) -> str:
    r"""The ``rank_pattern``/``alpha_pattern`` key that PEFT resolves to exactly ``module``.

    PEFT takes the first key ``k`` with ``re.match(rf"(.*\.)?({k})$", name)`` since 0.15 and with
    ``re.match(rf".*\.{k}$", name)`` before, else the module's own name, and looks that up. The
    old rule needs a dot before the key, so the plain escaped name ``blocks\.0\.attn\.qkv``
    never matched there and PEFT 0.14 built the module at the default rank and alpha (a size
    error, or silently another scale). This key is the last name component behind a
    look-behind pinning everything before it: both rules accept it, for no other module. A
    top-level module (no dot) keeps its plain name, which the old rule finds only by the
    own-name fallback; both rules would also take it for any ``x.<name>``, so its key must come
    after every dotted one (:func:`pattern_order`).
    """
    head, dot, last = module.rpartition(".")
    if not dot:
        return module
    return f"(?<=^{re.escape(head)}\\.){re.escape(last)}"


def pattern_order(modules: Iterable[str]) -> list[str]:
    """``modules`` in the order their pattern keys are written: top-level names last, so that a
    dotted module's own key is found before a top-level key that also matches its name."""
    return sorted(modules, key=lambda m: "." not in m)


def build_peft_adapter(
    factors: list[LoraFactor],
    modules_to_save: dict[str, dict[str, Tensor]],
    *,
    base_model_name: str | None = None,
    left_out: list[str] | None = None,
) -> PeftExport:
    """PEFT's LoRA config and state dict for ``factors`` plus whole ``modules_to_save``.

    ``modules_to_save`` maps a module name to its full parameter dict (the head; a Linear whose
    bias was tuned, ...): PEFT restores the whole module from it.
    """
    by_module: dict[str, list[LoraFactor]] = {}
    for f in factors:
        by_module.setdefault(f.module, []).append(f)
    clash = sorted(set(by_module) & set(modules_to_save))
    if clash:
        raise ValueError(f"modules {clash} carry a LoRA and are also saved whole; PEFT cannot do both")
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module in pattern_order(by_module):
        group = by_module[module]
        A, B, rank, alpha = _combine(module, group)
        A, B = _as_peft_shapes(A, B, group[0].kernel)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.detach().to(torch.float32).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.detach().to(torch.float32).contiguous()
        rank_pattern[pattern_key(module)] = rank
        alpha_pattern[pattern_key(module)] = alpha
    for module, params in modules_to_save.items():
        for pname, value in params.items():
            tensors[f"{PREFIX}{module}.{pname}"] = value.detach().to(torch.float32).contiguous()
    ranks = list(rank_pattern.values())
    default_r = max(set(ranks), key=ranks.count) if ranks else 8
    dropouts = [f.dropout for f in factors]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "r": default_r,
        "lora_alpha": float(default_r),
        "lora_dropout": max(dropouts) if dropouts else 0.0,
        "target_modules": sorted(by_module),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": sorted(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return PeftExport(config=config, tensors=tensors, left_out=list(left_out or []))


def write_peft_adapter(export: PeftExport, out: str | Path, extra_meta: dict | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out`` atomically."""
    metadata = {"format": "pt", "exported_by": "sensitune"}
    with AtomicDir(out) as tmp:
        save_file(export.tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata=metadata)
        write_json_atomic(tmp / PEFT_CONFIG_FILE, export.config)
        notes = {"left_out": export.left_out, **(extra_meta or {})}
        write_json_atomic(tmp / EXPORT_NOTES_FILE, json_safe(notes))
    return Path(out)


def lora_nbytes(factors: list[LoraFactor]) -> int:
    """float32 bytes of the factors as PEFT stores them (zero blocks of fused qkv included)."""
    total = 0
    by_module: dict[str, list[LoraFactor]] = {}
    for f in factors:
        by_module.setdefault(f.module, []).append(f)
    for module, group in by_module.items():
        A, B, _, _ = _combine(module, group)
        total += 4 * (A.numel() + B.numel())
    return total

