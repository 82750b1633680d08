"""The one loader of katdata's prompt files (``katdata/prompts/``), and their content hashes.

Stage configs name prompts by file name (``grade_open.txt``, ``judge_tags.yaml``); a name that is
not there is an error listing the files that are.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from katdata.errors import KatdataError


def _folder():
    return resources.files("katdata").joinpath("prompts")


def names() -> list[str]:
    """The prompt files shipped with katdata."""
    return sorted(p.name for p in _folder().iterdir() if p.is_file() and not p.name.startswith((".", "_")))


@functools.lru_cache(maxsize=None)
def _bytes(name: str) -> bytes:
    path = _folder().joinpath(name)
    if not name or "/" in name or "\\" in name or not path.is_file():
        raise KatdataError(f"prompt file '{name}' is not in katdata/prompts (have: {', '.join(names())})")
    return path.read_bytes()


def read_prompt(name: str) -> str:
    """The text of the prompt file ``name`` (a file name under katdata/prompts)."""
    return _bytes(name).decode("utf-8")


def prompt_hash(name: str) -> str:
    """sha256 (hex) of the prompt file's bytes, for provenance."""
    return hashlib.sha256(_bytes(name)).hexdigest()
