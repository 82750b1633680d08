"""Assembly's per-record work, cheaper: the rendered response checked without building a `Parsed` per
record, and the bulk loops run without the cyclic garbage collector (`gc_paused`).

`render_checked` renders with `template.render` (its refusals and messages unchanged) and then checks the
response exactly: every template marker occurs as often as the layout itself holds it (so no field holds
one), every field is non-blank, and the text is the layout of kat-format.md section 2. A response that
passes is one `template.parse` gives the same fields back from: the markers hold no newline and every
field stands between newlines, so the parser's first marker of each kind is the layout's own and each
block's content is the field. The marker counts are taken at once where the response holds no "<" but
the layout's own (one per marker): then no field holds one. A response that does not pass goes to
`template.parse`, which names what is wrong, as the assemble stage always reported it ("render check
failed: ...").
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from typing import Iterator, Optional

from katdata import template
from katdata.template import (ANSWER_CLOSE, ANSWER_OPEN, JUDGE_CLOSE, JUDGE_OPEN, MARKERS, THINK_CLOSE, THINK_OFF,
                              THINK_ON, THINK_OPEN)

log = logging.getLogger(__name__)

# how often each marker occurs in the layout of each mode
_COUNTS = {mode: tuple((m, 1 if m in (JUDGE_OPEN, JUDGE_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
                        or (m == THINK_ON and mode == "on") or (m == THINK_OFF and mode == "off")
                        or (m in (THINK_OPEN, THINK_CLOSE) and mode == "on") else 0) for m in MARKERS)
           for mode in ("on", "off")}
# how many "<" the layout of each mode holds (one per marker)
_LTS = {mode: sum(n * m.count("<") for m, n in counts) for mode, counts in _COUNTS.items()}


def layout(mode: str, judge: str, answer: str, think: Optional[str]) -> str:
    """The KAT response of these fields, as kat-format.md section 2 lays it out."""
    head = f"{JUDGE_OPEN}\n{judge}\n{JUDGE_CLOSE}\n\n"
    if mode == "off":
        return f"{head}{THINK_OFF}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"
    return f"{head}{THINK_ON}\n{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"


def round_trips(response: str, mode: str, judge: str, answer: str, think: Optional[str]) -> bool:
    """True when ``template.parse(response)`` gives exactly these fields back, cleanly (see the module doc)."""
    counts = _COUNTS.get(mode)
    if counts is None or type(judge) is not str or type(answer) is not str:
        return False
    if (think is None) != (mode == "off") or (think is not None and type(think) is not str):
        return False
    if not (judge.strip() and answer.strip() and (think is None or think.strip())):
        return False
    if response.count("<") != _LTS[mode]:  # a "<" in a field: each marker counted (none may stand in a field)
        for marker, n in counts:
            if response.count(marker) != n:
                return False
    # else the layout's own markers are the response's every "<", so no field holds a marker
    return response == layout(mode, judge, answer, think)


def render_checked(mode: str, judge: str, answer: str, think: Optional[str] = None) -> str:
    """``template.render``, checked to parse back to the same fields; raises template.TemplateError."""
    response = template.render(mode, judge, answer, think)
    if round_trips(response, mode, judge, answer, think):
        return response
    back = template.parse(response)  # the parser says what is wrong
    same = back.ok and (back.mode, back.judge, back.answer, back.think) == (mode, judge, answer, think)
    if not same or template.render(back.mode, back.judge, back.answer, back.think) != response:
        raise template.TemplateError(f"render check failed: {back.errors or 'fields differ after parsing'}")
    return response


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a bulk loop: its rows hold no reference cycles (reference counting
    frees them), and each full collection walks every object of the process (pyarrow, datasets, pydantic), which
    cost export and assemble a tenth of their time. Back to how it was afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
