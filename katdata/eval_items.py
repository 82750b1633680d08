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


def verdict(verifier, item: Item, answer: Optional[str]) -> Optional[bool]:
    """An answer's verdict; no answer is wrong when there is a reference, and has no verdict without one."""
    if answer is not None:
        return verifier.correct(item.kind, answer, item.reference, item)
    return False if item.reference is not None else None
