"""Checks shared by the commands that use a trained delta (not a command: the name starts with ``_``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sensitune.cli import CLIError


def refuse_non_finite_delta(delta: Any, folder: Path) -> None:
    """Refuse a delta whose stored tensors hold a NaN or an infinity.

    Why: such a delta comes from a run that diverged; its predictions, exports and merged models
    would be meaningless, and nothing downstream would say so.
    """
    import torch

    bad = [name for name, t in delta.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CLIError(f"{folder}: the delta holds non-finite weights ({len(bad)} of {len(delta.tensors)} tensors, "
                       f"e.g. {bad[0]}): its run diverged; train it again with a lower lr")
