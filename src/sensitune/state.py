"""What sensitune records on a model: one :class:`ModelState` in one attribute.

Every stage that learns something about a model keeps it here instead of in an ad-hoc
attribute of its own: :func:`sensitune.models.create_backbone` records which weights it loaded
and how to preprocess for them, :func:`sensitune.tuners.apply_plan` the plan it applied,
:func:`sensitune.artifacts.load_delta` where the delta came from. One dataclass means one place
to read what a model carries, one thing that ``copy.deepcopy`` of a whole model carries along
(its fields are plain values, tensors and a Plan), and one thing to
clear when :func:`sensitune.artifacts.merge` turns a tuned model into a plain one.

The state lives in the model's ``__dict__`` (``nn.Module.__setattr__`` keeps a non-tensor
value there), never in its ``state_dict``: it is bookkeeping, not weights. What each tuned
*module* carries (its sparse geometry, quantised widths, merged flag) stays on that module —
see :class:`sensitune.tuners.host.Tuning`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:  # Plan lives in tuners, which imports this module
    from sensitune.tuners.plan import Plan

#: the one attribute of a model that holds its :class:`ModelState`
STATE_ATTR = "_sensitune_state"


@dataclass
class LoadedDelta:
    """Where the tuning of a model loaded by :func:`~sensitune.artifacts.load_delta` came from.

    ``plan`` is the plan as the delta stores it (with its bit widths); the model runs its float
    copy (:attr:`ModelState.plan`), so saving the model again records the original.
    ``packed`` keeps the stored low-bit codes (parameter -> (codes/μ/σ, bits, the dequantised
    weight written into the model)): an unchanged weight is saved with its original codes, bit
    for bit, rather than quantised a second time.
    """

    path: str | None
    method: str
    class_names: list[str]
    data_config: dict[str, Any] | None
    backbone: dict[str, Any] | None
    plan: Plan
    packed: dict[str, tuple[dict[str, Tensor], int, Tensor]] = field(default_factory=dict)


@dataclass
class ModelState:
    """Everything sensitune knows about one model (each field None until a stage sets it).

    * ``source``: which weights built it (create_backbone: name, requested name, pretrained
      weights, class count, head) — recorded in scores, plans and deltas so they can be reproduced;
    * ``data_config``: the preprocessing of those weights (input_size, mean, std, …);
    * ``plan``: the plan :func:`~sensitune.tuners.apply_plan` applied (a model takes one);
    * ``delta``: the delta :func:`~sensitune.artifacts.load_delta` applied, if any.
    """

    source: dict[str, Any] | None = None
    data_config: dict[str, Any] | None = None
    plan: Plan | None = None
    delta: LoadedDelta | None = None

    def forget_tuning(self) -> None:
        """Drop what belongs to the tuning (plan, loaded delta); keep what describes the base."""
        self.plan = None
        self.delta = None


def find_state(model: nn.Module) -> ModelState | None:
    """The model's state, or None for a model sensitune has not touched (a plain timm model)."""
    st = model.__dict__.get(STATE_ATTR)
    return st if isinstance(st, ModelState) else None


def state_of(model: nn.Module) -> ModelState:
    """The model's state, created empty on first use (for a stage that records something)."""
    st = find_state(model)
    if st is None:
        st = ModelState()
        model.__dict__[STATE_ATTR] = st
    return st


def source_of(model: nn.Module) -> dict[str, Any]:
    """A copy of the recorded source of the model's weights ({} when none was recorded)."""
    st = find_state(model)
    return dict(st.source) if st is not None and st.source else {}


def data_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The recorded preprocessing of the model's weights (None when none was recorded)."""
    st = find_state(model)
    return st.data_config if st is not None else None
