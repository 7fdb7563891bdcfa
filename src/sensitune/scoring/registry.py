"""The scorers, registered by name: what :func:`sensitune.scoring.score` can be asked for.

A :class:`Scorer` is a function ``fn(model, [data,] **options) -> ScoreMap`` plus whether it
needs data and its typed options, read once from the function's signature (and from the
function it forwards ``**kw`` to, as ``fisher`` does to ``sensitivity``). Options are checked
by name and type before the call; the error lists the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sensitune.options import Registry, check_call_options, declared_options

if TYPE_CHECKING:  # pragma: no cover
    from sensitune.scoring.scoremap import ScoreMap

#: arguments the caller passes itself (``method`` is the name a forwarding scorer records)
CALLER_ARGS = frozenset({"model", "data", "method"})


@dataclass(frozen=True)
class Scorer:
    """One registered scorer: ``fn``; ``needs_data`` (``fn(model, data, ...)``, else ``fn(model, ...)``);
    ``forwards``: the function ``fn`` hands its ``**kw`` to; ``options`` read from the signatures."""

    name: str
    fn: Callable[..., "ScoreMap"]
    needs_data: bool = True
    forwards: Callable[..., "ScoreMap"] | None = None
    options: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        declared = declared_options(self.fn, CALLER_ARGS, self.forwards)
        if declared is None:
            raise ValueError(f"scorer {self.name!r}: its options cannot be read off its signature (**kw without "
                             f"forwards=...)")
        object.__setattr__(self, "options", declared)

    def check(self, options: Mapping[str, Any], who: str | None = None) -> None:
        """Refuse an option this scorer does not take, or a value of the wrong type (listing the valid ones)."""
        check_call_options(who or f"{self.name} scoring", f"scorer {self.name}", self.options, options)

    def __call__(self, model: Any, data: Any, **options: Any) -> "ScoreMap":
        """The scores, after checking the options and that data is given when needed."""
        self.check(options)
        if not self.needs_data:
            return self.fn(model, **options)
        if data is None:
            raise ValueError(f"{self.name} scoring needs data (a Dataset or DataLoader of (image, label))")
        return self.fn(model, data, **options)


#: the scorer modules register on import of :mod:`sensitune.scoring`
SCORERS: Registry[Scorer] = Registry("scorer", "scoring method", "sensitune.scoring")


def register(scorer: Scorer) -> Scorer:
    """Add ``scorer`` under its name; a name registered twice is a programming error."""
    return SCORERS.add(scorer)


def get_scorer(name: str) -> Scorer:
    """The scorer called ``name``; an unknown name lists the registered ones and the closest."""
    return SCORERS.lookup(name)
