"""The Plan and its units, as the planners produce them (defined in :mod:`sensitune.tuners.plan`).

Planning imports the tuners (the Plan is the tuners' input language, each unit's mode is a
spec in :mod:`sensitune.tuners.modes`); the tuners never import planning.
"""
from sensitune.tuners.plan import FORMAT_VERSION, ROLES, Plan, Unit, index_key, model_shapes


def __getattr__(name: str):
    from sensitune.tuners import plan as _plan

    if name in ("MODES", "STRUCTURED"):
        return getattr(_plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT_VERSION", "ROLES", "Plan", "Unit", "index_key", "model_shapes"]
