"""Secrets never reach logs, reprs, run folders or cards: the one place that decides what is secret.

A key is secret when its last word names a credential (``api_key``, ``token``, ``password``,
``secret``, ``credentials``); ``max_tokens`` or ``api_key_env`` (the *name* of an environment
variable) are settings, not secrets, and are kept.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

MASK = "<redacted>"
_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:api_?key|apikey|token|access_token|password|passwd|secret|credentials?)$",
                         re.IGNORECASE)


_URL_PASSWORD = re.compile(r"(\w+://[^/\s:@]*:)[^/\s@]+@")  # the password of https://user:PASSWORD@host


def is_secret_key(key: Any) -> bool:
    """True for keys that hold a credential (``api_key``, ``hf_token``), not for ``max_tokens``."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts and lists, nested) with the non-empty values of secret keys masked."""
    if isinstance(obj, dict):
        return {k: (MASK if v not in (None, "") and is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "@" in obj:
        return _URL_PASSWORD.sub(r"\1" + MASK + "@", obj)
    return obj


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret value (of 4 characters or more) masked."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, MASK)
    return text
