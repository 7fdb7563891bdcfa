"""The registry of tuning modes: one :class:`~sensitune.tuners.modes.base.Mode` per ``unit.mode``.

Built in: ``full``, ``head``, ``sparse``, ``lora``, ``adapter``, ``adaptformer``, ``ssf`` (one
module each in this package). ``register(MyMode())`` adds one; :func:`get_mode` is the only way
to look one up, and an unknown name raises a ValueError listing the registered modes.
"""
from __future__ import annotations

from sensitune.tuners.modes.base import REQUIRED, Mode, Option

_REGISTRY: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add ``mode`` to the registry (its ``name`` must be new) and return it."""
    if not isinstance(mode, Mode):
        raise TypeError(f"register expects a Mode instance, got {type(mode).__name__}")
    name = getattr(mode, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(mode).__name__} has no name")
    if name in _REGISTRY:
        raise ValueError(f"a tuning mode called {name!r} is already registered ({type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = mode
    return mode


def unregister(name: str) -> None:
    """Remove a mode (tests that register a throwaway mode clean up with this)."""
    _REGISTRY.pop(name, None)


def get_mode(name: str) -> Mode:
    """The registered spec of mode ``name``; an unknown name raises ValueError."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tuning mode {name!r}; registered modes: {', '.join(_REGISTRY)}") from None


def registered() -> tuple[str, ...]:
    """Names of every registered mode, in registration order."""
    return tuple(_REGISTRY)


def added_modules() -> tuple[str, ...]:
    """Attributes that modes add to tuned modules (``lora``, ``adapter``, ``adaptformer``, ``ssf``)."""
    return tuple(m.added_module for m in _REGISTRY.values() if m.added_module)


def _register_builtins() -> None:
    from sensitune.tuners.modes.adapter import Adapter
    from sensitune.tuners.modes.adaptformer import AdaptFormer
    from sensitune.tuners.modes.full import Full
    from sensitune.tuners.modes.head import Head
    from sensitune.tuners.modes.lora import Lora
    from sensitune.tuners.modes.sparse import Sparse
    from sensitune.tuners.modes.ssf import ScaleShift

    # merge folds in this order: sparse values, then LoRA, then a k-bit head, then SSF (which
    # scales what the others produced)
    for mode in (Full(), Head(), Sparse(), Lora(), Adapter(), AdaptFormer(), ScaleShift()):
        register(mode)


_register_builtins()

__all__ = ["REQUIRED", "Mode", "Option", "added_modules", "get_mode", "register", "registered", "unregister"]
