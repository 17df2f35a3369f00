"""The kit's input errors: each names the file and, where there is one, the 1-based line or row."""

from __future__ import annotations

import os


class KinretInputError(ValueError):
    """Bad input: a malformed list, a missing or corrupt image, a wrong row count, an unknown family, a bad option
    or config value. Command-line entry points turn it (and only it) into one line and exit code 2."""

    def __init__(self, path: str | os.PathLike | None, message: str, line: int | None = None):
        self.path = None if path is None else str(path)
        self.message = message
        self.line = line
        where = self.path or ""
        if line is not None:
            where += f", line {line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)
