"""Tuners: the Plan, the registry of tuning modes, and apply_plan (sparse deltas, LoRA, adapters,
AdaptFormer, SSF, k-bit weights). See :mod:`sensitune.tuners.modes` for how a mode is defined."""
from sensitune.tuners.apply import applied_plan, apply_plan, merge, trainable_parameters, unmerge
from sensitune.tuners.modes import get_mode, register, registered

__all__ = ["applied_plan", "apply_plan", "get_mode", "merge", "register", "registered", "trainable_parameters",
           "unmerge"]
