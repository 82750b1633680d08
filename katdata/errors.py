"""The errors katdata raises on purpose, and how the CLI turns any error into one line and an exit code.

Exit codes (the same for the same class of error in every subcommand):

    0   success
    1   a check found invalid data (`template parse` / `template validate`)
    2   bad usage, recipe, --set argument, input file or environment variable (KatdataError, InputError)
    3   run folder or file system: a stage's input is missing, a file stands where a folder should (RunFolderError, OSError)
    4   engine, model, server or optional package (EngineError)
    70  an unexpected internal error (a bug): one line, rerun with --debug for the traceback
    130 interrupted
"""

from __future__ import annotations

import importlib
import os
import sys

EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_RUN_FOLDER, EXIT_ENGINE, EXIT_INTERNAL = 1, 2, 3, 4, 70

EXIT_CODES_HELP = ("exit codes: 0 ok; 1 a check found invalid data (template parse/validate); 2 bad usage, recipe, "
                   "--set, input file or environment variable; 3 run folder or file system; 4 engine, model, server "
                   "or missing extra; 70 internal error (a bug); 130 interrupted. --debug or KATDATA_DEBUG=1 shows "
                   "the traceback.")


class KatdataError(Exception):
    """A problem the user can fix: bad input, a bad recipe, a bad command line."""

    exit_code = EXIT_USAGE


class InputError(KatdataError):
    """Bad input data, named by file, line and field."""

    def __init__(self, path, message: str, line: int | None = None, field: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "") + (f" field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


class RunFolderError(KatdataError):
    """The run folder is not as a command needs it: missing, a file, or without an earlier stage's output."""

    exit_code = EXIT_RUN_FOLDER


class EngineError(KatdataError):
    """An engine, model, server or optional package cannot be used."""

    exit_code = EXIT_ENGINE


def require(module: str, extra: str):
    """Import a heavy optional module, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"'{module}' is not installed ({exc}); install the '{extra}' extra: pip install 'katdata[{extra}]'"
        ) from exc


def one_line(text) -> str:
    """``text`` (or an exception's message) on one line: its non-blank lines, stripped, joined by spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _filename(name) -> str:
    if name is None:
        return ""
    return os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for any exception, by class; never a traceback."""
    if isinstance(exc, KatdataError):
        return exc.exit_code, one_line(exc)
    module = type(exc).__module__.split(".")[0]
    if module == "pydantic" and hasattr(exc, "errors"):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        return EXIT_USAGE, f"invalid {getattr(exc, 'title', 'settings')}: " + "; ".join(parts)
    if module == "yaml":
        return EXIT_USAGE, "not valid YAML: " + one_line(exc)
    if isinstance(exc, UnicodeError):
        return EXIT_USAGE, f"not UTF-8 text ({exc})"
    if isinstance(exc, OSError):
        where = _filename(exc.filename)  # a str, Path, bytes or file descriptor: never added to a str as it is
        where += f" -> {_filename(exc.filename2)}" if exc.filename2 is not None else ""
        return EXIT_RUN_FOLDER, f"{where}: {exc.strerror or exc}" if where else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError):
        return EXIT_ENGINE, f"a package is missing or broken: {one_line(exc)}"
    if module == "jinja2":
        return EXIT_ENGINE, f"chat template error: {one_line(exc)}"
    return EXIT_INTERNAL, (f"internal error {type(exc).__name__}: {one_line(exc)[:500]} "
                           "(a bug in katdata; rerun with --debug for the traceback and report it)")


def report(exc: BaseException, prog: str = "katdata") -> int:
    """Print ``exc`` as one line on stderr; return its class's exit code."""
    code, line = describe(exc)
    print(f"{prog}: error: {line}", file=sys.stderr)
    return code

