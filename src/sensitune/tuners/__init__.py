"""Tuners: apply a Plan to a model (sparse deltas, LoRA, adapters, AdaptFormer, k-bit weights)."""
from sensitune.tuners.apply import applied_plan, apply_plan, merge, trainable_parameters, unmerge

__all__ = ["applied_plan", "apply_plan", "merge", "trainable_parameters", "unmerge"]
