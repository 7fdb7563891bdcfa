"""Typed keyword options read off a function's signature, and the check that refuses bad ones.

The planner and scorer registries (:mod:`sensitune.planning.registry`,
:mod:`sensitune.scoring.registry`) declare their options by reading them once from the
function's signature, so an option's name and type live in one place: the function itself.
A call is checked by name and by type *before* it is made, and the error lists the valid
names (never parsed out of a TypeError). Imports nothing heavy: ``sensitune --help`` uses it.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from typing import Any, Callable, Collection, Generic, Iterable, Mapping, TypeVar, Union

T = TypeVar("T")


def declared_options(fn: Callable, skip: Collection[str] = (), forwards: Callable | None = None,
                     forwards_skip: Collection[str] = ()) -> dict[str, Any] | None:
    """``{name: type hint}`` of ``fn``'s options minus ``skip``; None when they cannot be listed
    (``fn`` takes ``**kw`` and ``forwards`` does not say where they go). With ``forwards``, the
    options of the function ``fn`` hands its ``**kw`` on to are added (``fn``'s own win)."""
    own, var_kw = _parameters(fn, skip)
    if forwards is None:
        return None if var_kw else own
    more = declared_options(forwards, set(skip) | set(forwards_skip))
    return None if more is None else {**more, **own}


def _parameters(fn: Callable, skip: Collection[str]) -> tuple[dict[str, Any], bool]:
    # the annotations as written (eval_str resolves string ones): typing.get_type_hints on
    # Python 3.10 turns ``x: T = None`` into ``T | None``, so the options read differently there
    params: dict[str, Any] = {}
    var_kw = False
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and p.name not in skip:
            params[p.name] = Any if p.annotation is p.empty else p.annotation
    return params, var_kw


def hint_name(hint: Any) -> str:
    """``int``, ``str | None``, ``any``: a type hint as the error messages write it."""
    if hint is Any:
        return "any"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(hint_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def value_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits type hint ``hint`` (int/float/bool/str/None and unions of them;
    any other hint is left to the function itself)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(value_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'rank'?)`` for the closest valid name (case first), or ``""``."""
    valid = list(valid)
    close = ([v for v in valid if v.lower() == str(name).lower()]
             or difflib.get_close_matches(str(name), valid, n=1))
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_call_options(who: str, what: str, declared: dict[str, Any] | None, given: Mapping[str, Any]) -> None:
    """Raise ValueError for an option ``declared`` lacks or a value of the wrong type, listing
    the valid names (with types). ``declared=None`` (not listable) checks nothing."""
    if declared is None:
        return
    listing = ", ".join(f"{k} ({hint_name(h)})" for k, h in declared.items())
    for key, value in given.items():
        if key not in declared:
            raise ValueError(f"{who}: unknown option {key!r}{did_you_mean(key, declared)}; the {what} takes: "
                             f"{listing or 'no options'}")
        if not value_matches(value, declared[key]):
            raise ValueError(f"{who}: option {key}={value!r} has the wrong type: the {what} expects "
                             f"{hint_name(declared[key])}")


class Registry(dict[str, T], Generic[T]):
    """Entries by name (the planners, the scorers): a name registered twice is a programming
    error, and an unknown name is a ValueError listing the registered ones with a did-you-mean.

    ``package`` is imported before a lookup: its modules register their entries on import, and
    importing it lazily keeps the registry module free of a circular import.
    """

    def __init__(self, kind: str, unknown: str, package: str) -> None:
        super().__init__()
        self.kind, self.unknown, self.package = kind, unknown, package

    def add(self, entry: T) -> T:
        name = entry.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        importlib.import_module(self.package)
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.unknown} {name!r}{did_you_mean(str(name), self)}; choose one of "
                             f"{', '.join(self)}") from None
