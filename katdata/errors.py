"""The errors katdata raises on purpose; the CLI prints them without a traceback."""

from __future__ import annotations

import importlib


class KatdataError(Exception):
    """A problem the user can fix: bad input, a bad recipe, a missing extra, a server down."""


class InputError(KatdataError):
    """Bad input data, named by file, line and field."""

    def __init__(self, path, message: str, line: int | None = None, field: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "") + (f" field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


def require(module: str, extra: str):
    """Import a heavy optional module, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise KatdataError(
            f"'{module}' is not installed ({exc}); install the '{extra}' extra: pip install 'katdata[{extra}]'"
        ) from exc
