"""The one error type for bad task data, so callers can catch it and users see where it is."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


class TaskDataError(ValueError):
    """Bad task data: names the file (and line or key) and says what is wrong.

    A ``ValueError`` so the CLI prints it as a user-facing message without a traceback.
    Several problems found in one pass are raised together (:meth:`combine`): ``problems``
    holds each one, ``file``/``line`` are the first one's, so a user fixes them all at once.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | str | None = None):
        self.file = Path(file) if file is not None else None
        self.line = line
        self.problems: list[TaskDataError] = [self]
        where = ""
        if file is not None:
            where = f"{file}"
            if line is not None:
                where += f":{line}" if isinstance(line, int) else f" [{line}]"
            where += ": "
        super().__init__(where + message)

    @classmethod
    def combine(cls, problems: Iterable["TaskDataError"], what: str) -> "TaskDataError":
        """One error listing every problem (each with its file and line); ``what`` names the
        data they were found in (e.g. ``split train800 of task dtd``)."""
        seen: set[str] = set()
        flat = []
        for p in (p for e in problems for p in e.problems):  # a task-wide problem found by two splits once
            if str(p) not in seen:
                seen.add(str(p))
                flat.append(p)
        if not flat:
            raise ValueError("combine() needs at least one problem")
        if len(flat) == 1:
            return flat[0]
        err = cls(f"{len(flat)} problems in {what}:\n" + "\n".join(f"  {p}" for p in flat))
        err.file, err.line, err.problems = flat[0].file, flat[0].line, flat
        return err
