"""What a tuning mode is: one :class:`Mode` object that knows everything about one way of tuning.

A plan unit names a mode (``unit.mode``); every stage asks the mode's spec instead of branching
on its name: the planner and the Plan (its typed options, what it may target, what it clashes
with, how many parameters and bytes it costs), :func:`sensitune.apply_plan` (how it attaches to
a Linear / Conv2d / vector / fused-qkv slice / block), merging (how it folds into the base
weights, or that it cannot), the delta (which trained tensors are stored as low-bit codes, the
storage part of each role), the task bank (what it replaces in the base) and the PEFT export
(a LoRA factor, a module saved whole, or a refusal with its reason). A new way of tuning is one
new module under :mod:`sensitune.tuners.modes` that calls :func:`register`; a name that was
never registered raises everywhere (:func:`get_mode`).

The modes receive units and modules, and import nothing from the planners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from sensitune.tuners.plan import Unit

#: what a unit of a mode names as its ``target``
Site = Literal["parameter", "matrix", "block", "module"]
#: how a mode reaches a PEFT export: as a LoRA factor, as a whole module (modules_to_save), or not
PeftKind = Literal["lora", "module", "refuse"]


@dataclass(frozen=True)
class Option:
    """One typed option of a mode (``rank``, ``bits``, ...): its type, default and valid values.

    ``default=REQUIRED`` makes the option mandatory; ``check`` returns an error text or None;
    ``omit_default``: the option is left out of a unit's JSON while it has its default value.
    """

    name: str
    type: type
    default: Any
    doc: str = ""
    check: Callable[[Any], str | None] | None = None
    omit_default: bool = False

    def parse(self, value: Any, where: str) -> Any:
        """``value`` as this option's type, or a ValueError naming the unit and the option."""
        if value is REQUIRED:
            raise ValueError(f"{where}: option {self.name!r} is required ({self.doc})")
        if isinstance(value, bool) and self.type is not bool:
            raise ValueError(f"{where}: option {self.name}={value!r} must be {self.type.__name__}, not bool")
        try:
            typed = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: option {self.name}={value!r} is not a valid {self.type.__name__}") from None
        if self.type is int and typed != value:
            raise ValueError(f"{where}: option {self.name}={value!r} must be an integer")
        problem = self.check(typed) if self.check else None
        if problem:
            raise ValueError(f"{where}: option {self.name}={value!r} {problem}")
        return typed


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

BITS = (1, 2, 4, 8, 32)


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def unit_interval(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def valid_bits(v: Any) -> str | None:
    return None if v in BITS else f"is not one of {', '.join(map(str, BITS))}"


def finite(v: Any) -> str | None:
    return None if math.isfinite(v) else "must be finite"


RANK = Option("rank", int, REQUIRED, "bottleneck / low-rank width r", positive)
WEIGHT_BITS = Option("bits", int, 32, "width of the new weight matrices (32 = float)", valid_bits)
SCALE = Option("scale", float, 1.0, "multiplier s of the module's output", finite)
DROPOUT = Option("dropout", float, 0.0, "dropout inside the module (training only)", unit_interval)
DROP_PATH = Option("drop_path", float, 0.0, "drop-path on the module's output (training only)", unit_interval)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of one weight matrix on disk: float32 values, or packed codes + μ, σ (float32)."""
    return 4 * numel if bits == 32 else math.ceil(numel * bits / 8) + 8


def owner(target: str) -> str:
    """The module that owns parameter ``target`` ("" for a root-level tensor)."""
    return target.rsplit(".", 1)[0] if "." in target else ""


class Mode:
    """The spec of one tuning mode. Subclasses set the class attributes and override the hooks.

    Class attributes:
      ``name``            the ``unit.mode`` string;
      ``options``         the typed options a unit of this mode takes (others are refused);
      ``site``            what ``unit.target`` names: a ``parameter`` (any tensor), a ``matrix``
                          (a Linear/Conv2d weight), a ``block`` or a ``module``;
      ``sliceable``       may act on a q/k/v row slice of a fused matrix;
      ``indexed``         carries flat indices (sparse);
      ``replaces_base``   trains a base tensor itself: the delta carries it, fingerprints skip it;
      ``mergeable``       :func:`sensitune.artifacts.merge` can fold it into the base weights;
      ``structured``      counts as a structured module in :meth:`Plan.mix`;
      ``added_module``    the attribute (a module) apply_plan adds to the owning module, if any;
      ``clashes``         modes that cannot share this unit's target;
      ``peft``            how a PEFT export carries it, and ``peft_refusal`` why not when it cannot.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    site: ClassVar[Site] = "parameter"
    sliceable: ClassVar[bool] = False
    indexed: ClassVar[bool] = False
    replaces_base: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True
    structured: ClassVar[bool] = False
    added_module: ClassVar[str | None] = None
    clashes: ClassVar[frozenset[str]] = frozenset()
    peft: ClassVar[PeftKind] = "refuse"
    peft_refusal: ClassVar[str] = ""
    #: storage part (delta report) of each role this mode's parameters have
    parts: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ options and checks
    def option_map(self) -> dict[str, Option]:
        return {o.name: o for o in self.options}

    def parse_options(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """Every option of this mode, typed and checked; an option the mode does not take raises."""
        known = self.option_map()
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise ValueError(f"{where}: mode {self.name!r} takes no option {unknown[0]!r} (its options: {valid})")
        return {name: opt.parse(given.get(name, opt.default), where) for name, opt in known.items()}

    def check(self, unit: "Unit") -> None:
        """Mode-specific checks of a unit, beyond its options (raise ValueError)."""

    def check_target(self, unit: "Unit", tensors: dict[str, tuple[int, ...]]) -> None:
        """The unit's target exists in the planned model with the unit's shape."""
        if unit.target not in tensors:
            raise ValueError(f"plan unit names {unit.target!r}, which is not a parameter of the planned model")
        if tensors[unit.target] != unit.shape:
            raise ValueError(f"plan unit {unit.target!r} has shape {unit.shape}, model tensor is {tensors[unit.target]}")

    def clash(self, unit: "Unit", other: "Unit") -> bool:
        """Whether ``unit`` and ``other`` (same target or module) cannot both be in one plan."""
        return other.target == unit.target and other.mode in self.clashes

    # ------------------------------------------------------------------ geometry and cost
    def module(self, unit: "Unit") -> str:
        """The module that apply_plan changes for this unit."""
        return unit.target if self.site in ("block", "module") else owner(unit.target)

    def matrix_shape(self, unit: "Unit") -> tuple[int, int]:
        """(d_out, d_in) the unit acts on (slice rows only, conv kernel flattened)."""
        rows = unit.shape[0] if len(unit.shape) > 1 else 1
        cols = math.prod(unit.shape) // max(1, rows)
        if unit.slice_rows is not None:
            rows = unit.slice_rows[1] - unit.slice_rows[0]
        return (rows, cols)

    def parameters(self, unit: "Unit") -> list[tuple[str, str, int]]:
        """(name after apply_plan, role, numel) of every trainable tensor this unit owns."""
        raise NotImplementedError

    def quantised(self, unit: "Unit") -> dict[str, int]:
        """name -> bits of this unit's trained tensors that are stored as packed low-bit codes."""
        return {}

    def nbytes(self, unit: "Unit") -> int:
        """Estimated bytes on disk of what this unit trains (float32 values, packed codes, indices)."""
        q = self.quantised(unit)
        return sum(packed_nbytes(n, q[name]) if name in q else 4 * n for name, _, n in self.parameters(unit))

    # ------------------------------------------------------------------ model side
    def attach(self, module: nn.Module, unit: "Unit") -> None:
        """Change ``module`` (the unit's :meth:`module`) so that the unit trains."""
        raise NotImplementedError

    def fold(self, module: nn.Module, state: Any) -> None:
        """Fold this mode's trained values on ``module`` into its base tensors (tuners.merge)."""

    def root_tensor(self, shell: nn.Module, unit: "Unit") -> Tensor | None:
        """For a unit on a root-level tensor: the tensor a task bank swaps in (None: cannot)."""
        return None

    def part(self, role: str) -> str:
        """The storage-report part of a trained tensor with ``role``."""
        return self.parts.get(role, role)

    # ------------------------------------------------------------------ examples
    def examples(self, model: nn.Module) -> list["Unit"]:
        """A few small units of this mode for ``model`` (a ViT or a CNN), covering its variants.

        The test matrix (tests/tuners/test_modes.py) runs every registered mode through attach,
        count, bytes, merge, save/load and export with these, so a new mode must provide them.
        """
        raise NotImplementedError(f"mode {self.name!r} provides no example units")


def tensor_infos(model: nn.Module, kind: str, layer: str | None = None):
    """The model's tunable tensors of ``kind`` (and ``layer``), in model order (for examples)."""
    from sensitune.models import tunable_tensors

    return [i for i in tunable_tensors(model) if i.kind == kind and (layer is None or i.layer == layer)]
