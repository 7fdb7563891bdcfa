"""The one error type for bad task data, so callers can catch it and users see where it is."""
from __future__ import annotations

from pathlib import Path


class TaskDataError(ValueError):
    """Bad task data: names the file (and line or key) and says what is wrong.

    A ``ValueError`` so the CLI prints it as a user-facing message without a traceback.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | str | None = None):
        self.file = Path(file) if file is not None else None
        self.line = line
        where = ""
        if file is not None:
            where = f"{file}"
            if line is not None:
                where += f":{line}" if isinstance(line, int) else f" [{line}]"
            where += ": "
        super().__init__(where + message)
