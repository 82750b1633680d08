"""What eval asks a model: an item (a query with its reference and tags) and the assistant prefix of a setting
(auto: the model writes the judge; on / off: a tags-written judge and the mode prefix are pre-filled)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from katdata.template import FORCE_PREFIX, GENERATION_PREFIX


@dataclasses.dataclass
class Item:
    id: str
    messages: list[dict]
    label: Optional[str]
    difficulty: Optional[int]
    domain: str
    task_type: str
    kind: Optional[str]
    reference: Optional[str]
    query: str = ""  # the user's query text (the open-answer verifier reads it)
    meta: dict = dataclasses.field(default_factory=dict)  # "prompt": what a code answer completes (HumanEval)


def prefix(setting: str, item: Item) -> str:
    """What the assistant turn is pre-filled with: ``<judge>\n``, or a whole judge and the mode prefix."""
    from katdata.judge import tags_rationale

    if setting == "auto":
        return GENERATION_PREFIX
    judge = tags_rationale(item.task_type, item.domain, setting)
    return f"{GENERATION_PREFIX}{judge}\n</judge>\n\n{FORCE_PREFIX[setting]}"


def verdict(verifier, item: Item, answer: Optional[str], key: Optional[str] = None) -> Optional[bool]:
    """An answer's verdict; no answer is wrong when there is a reference, and has no verdict without one (``key``:
    the answer's class key, when the caller has worked it out already)."""
    if answer is not None:
        return verifier.correct(item.kind, answer, item.reference, item, key)
    return False if item.reference is not None else None


def counted_tokens(tokens: int, prompt_tokens: Optional[int], auto_prompt_tokens: Optional[int]) -> int:
    """A forced reply's tokens counted over the same span as auto's: forced prompts pre-fill the judge and the mode
    line that auto writes itself, so the reply counts what its prompt holds beyond auto's on the same query."""
    return tokens + max(0, (prompt_tokens or 0) - (auto_prompt_tokens or 0))


def rate(rows: list[dict], test) -> Optional[float]:
    """The share of ``rows`` passing ``test``, to 4 places (None without rows)."""
    return round(sum(1 for r in rows if test(r)) / len(rows), 4) if rows else None


def accuracy(rows: list[dict]) -> Optional[float]:
    """The share of the rows with a verdict that are correct."""
    return rate([r for r in rows if r["correct"] is not None], lambda r: r["correct"])


def mean(xs: list) -> Optional[float]:
    """The mean to 1 place (None when empty)."""
    return round(sum(xs) / len(xs), 1) if xs else None
