"""The KAT response template: render it byte-exact, parse it tolerantly.

The layout (kat-format.md section 2)::

    <judge>\\n{rationale}\\n</judge>\\n\\n<think_off>\\n<answer>\\n{answer}\\n</answer>
    <judge>\\n{rationale}\\n</judge>\\n\\n<think_on>\\n<think>\\n{cot}\\n</think>\\n<answer>\\n{answer}\\n</answer>

`parse` accepts what models really emit: the text with or without the leading
``<judge>\\n`` (the generation prompt pre-fills it), a trailing end-of-turn token,
trailing whitespace, and one newline or a blank line before ``<answer>``.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

JUDGE_OPEN, JUDGE_CLOSE = "<judge>", "</judge>"
THINK_ON, THINK_OFF = "<think_on>", "<think_off>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MARKERS = (JUDGE_OPEN, JUDGE_CLOSE, THINK_ON, THINK_OFF, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
STOP_STRINGS = list(END_TOKENS)

# What the generation prompt pre-fills, and the prefixes that force a mode.
GENERATION_PREFIX = JUDGE_OPEN + "\n"
FORCE_PREFIX = {
    "on": f"{THINK_ON}\n{THINK_OPEN}\n",
    "off": f"{THINK_OFF}\n{ANSWER_OPEN}\n",
}

Mode = Literal["on", "off"]

# Every error code parse() can report, with what it means.
ERRORS = {
    "missing_judge": "no </judge> closes a judge rationale",
    "unclosed_judge": "<judge> opened and never closed",
    "empty_judge": "the judge rationale is blank",
    "text_before_judge": "text stands before <judge>",
    "no_mode_tag": "neither <think_on> nor <think_off> follows the judge",
    "two_mode_tags": "more than one mode tag",
    "text_before_mode": "text stands between </judge> and the mode tag",
    "think_in_off_mode": "a <think> block in think-off mode",
    "missing_think": "think-on mode without a <think> block",
    "unclosed_think": "<think> opened and never closed",
    "empty_think": "the <think> block is blank",
    "text_before_answer": "text stands between the mode block and <answer>",
    "missing_answer": "no <answer> block",
    "unclosed_answer": "<answer> opened and never closed",
    "empty_answer": "the answer is blank",
    "text_after_answer": "text stands after </answer>",
    "nested_marker": "a judge, think or answer text holds a template marker (render refuses such text)",
    "truncated": "the response was cut off (finish_reason=length, or it ends inside an open block)",
}


class Parsed(BaseModel):
    """One parsed response. ``ok`` is true when ``errors`` is empty."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    mode: Optional[Mode] = None
    judge: Optional[str] = None
    think: Optional[str] = None
    answer: Optional[str] = None
    truncated: bool = False
    errors: list[str] = Field(default_factory=list)


class TemplateError(ValueError):
    """Content that cannot be rendered into the template."""


def render(mode: Mode, judge: str, answer: str, think: Optional[str] = None) -> str:
    """Render one KAT response, byte-exact. Think-on needs ``think``; think-off forbids it."""
    if mode not in ("on", "off"):
        raise TemplateError(f"mode must be 'on' or 'off', got {mode!r}")
    if mode == "on" and not (think and think.strip()):
        raise TemplateError("think-on mode needs a non-empty think text")
    if mode == "off" and think is not None:
        raise TemplateError("think-off mode takes no think text")
    fields = {"judge": judge, "answer": answer} | ({"think": think} if think is not None else {})
    for name, value in fields.items():
        if not value or not value.strip():
            raise TemplateError(f"{name} is empty")
        marker = "<" in value and next((m for m in MARKERS if m in value), None)  # every marker starts with "<"
        if marker:
            raise TemplateError(f"{name} contains the marker {marker}")
    head = f"{JUDGE_OPEN}\n{judge}\n{JUDGE_CLOSE}\n\n"
    tail = f"{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"
    if mode == "off":
        return f"{head}{THINK_OFF}\n{tail}"
    return f"{head}{THINK_ON}\n{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{tail}"


def _strip_end(text: str) -> str:
    """Drop trailing whitespace and end-of-turn tokens, in any order."""
    while True:
        stripped = text.rstrip()
        for token in END_TOKENS:
            if stripped.endswith(token):
                stripped = stripped[: -len(token)]
        if stripped == text:
            return text
        text = stripped


def _inner(text: str) -> str:
    """Block content without the one newline the template puts on each side."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text


def _block(text: str, start: int, close: str, errors: list[str], name: str) -> tuple[Optional[str], int]:
    """Content from ``start`` up to ``close``; records ``unclosed_<name>`` and returns (content, end)."""
    end = text.find(close, start)
    if end < 0:
        errors.append(f"unclosed_{name}")
        return _inner(text[start:] + "\n") if text[start:].strip() else None, len(text)
    return _inner(text[start:end]), end + len(close)


def parse(text: str, finish_reason: Optional[str] = None) -> Parsed:
    """Parse a KAT response (full, or a raw completion after the pre-filled ``<judge>\\n``)."""
    errors: list[str] = []
    out: dict = {}
    text = _strip_end(text)
    open_at_end = False

    # 1. The judge. Without an opening tag, the text is a completion after the pre-fill.
    jo = text.find(JUDGE_OPEN)
    jc = text.find(JUDGE_CLOSE)
    if jo >= 0 and (jc < 0 or jo < jc):
        if text[:jo].strip():
            errors.append("text_before_judge")
        start = jo + len(JUDGE_OPEN)
    elif jc >= 0:
        start = 0
    else:
        start = -1
    if start < 0:
        errors.append("missing_judge")
        rest = text
    else:
        judge, pos = _block(text, start, JUDGE_CLOSE, errors, "judge")
        open_at_end = "unclosed_judge" in errors
        out["judge"] = judge
        if judge is None or not judge.strip():
            errors.append("empty_judge")
        rest = text[pos:]

    # 2. The mode tag.
    n_on, n_off = rest.count(THINK_ON), rest.count(THINK_OFF)
    if n_on + n_off > 1:
        errors.append("two_mode_tags")
    if n_on + n_off == 0:
        if not open_at_end:
            errors.append("no_mode_tag")
        return _finish(out, errors, finish_reason, open_at_end)
    tag = THINK_ON if (n_off == 0 or (n_on and rest.find(THINK_ON) < rest.find(THINK_OFF))) else THINK_OFF
    at = rest.find(tag)
    if rest[:at].strip():
        errors.append("text_before_mode")
    out["mode"] = "on" if tag == THINK_ON else "off"
    rest = rest[at + len(tag):]

    # 3. The think block.
    to = rest.find(THINK_OPEN)
    if out["mode"] == "off":
        if to >= 0 or THINK_CLOSE in rest:
            errors.append("think_in_off_mode")
    elif to < 0:
        errors.append("missing_think")
    else:
        if rest[:to].strip():
            errors.append("text_before_answer")
        think, pos = _block(rest, to + len(THINK_OPEN), THINK_CLOSE, errors, "think")
        out["think"] = think
        if think is None or not think.strip():
            errors.append("empty_think")
        if "unclosed_think" in errors:
            return _finish(out, errors, finish_reason, True)
        rest = rest[pos:]

    # 4. The answer.
    ao = rest.find(ANSWER_OPEN)
    if ao < 0:
        errors.append("missing_answer")
        return _finish(out, errors, finish_reason, not rest.strip())
    if rest[:ao].strip() and "think_in_off_mode" not in errors:
        errors.append("text_before_answer")
    answer, pos = _block(rest, ao + len(ANSWER_OPEN), ANSWER_CLOSE, errors, "answer")
    out["answer"] = answer
    if answer is None or not answer.strip():
        errors.append("empty_answer")
    if rest[pos:].strip():
        errors.append("text_after_answer")
    return _finish(out, errors, finish_reason, "unclosed_answer" in errors)


def _finish(out: dict, errors: list[str], finish_reason: Optional[str], open_at_end: bool) -> Parsed:
    if any(m in (out.get(k) or "") for k in ("judge", "think", "answer") for m in MARKERS):
        errors.append("nested_marker")
    truncated = finish_reason == "length" or open_at_end
    if truncated:
        errors.append("truncated")
    errors = list(dict.fromkeys(errors))
    return Parsed(ok=not errors, truncated=truncated, errors=errors, **out)


_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN + "\n") + r"(.*?)" + re.escape("\n" + ANSWER_CLOSE), re.S)


def history_answer(content: str) -> str:
    """What an earlier assistant turn is reduced to in the chat history (kat-format.md section 3).

    The text between the last ``<answer>\\n`` and the following ``\\n</answer>``; without those
    tags, the text after ``<think_off>`` (leading newlines stripped), then after ``</think>``; without
    any marker, the whole text. Every case ends by stripping leading newlines (``"\\nHello"`` -> ``Hello``).
    """
    if ANSWER_OPEN + "\n" in content:
        tail = content.split(ANSWER_OPEN + "\n")[-1]
        if "\n" + ANSWER_CLOSE in tail:
            return tail.split("\n" + ANSWER_CLOSE)[0].lstrip("\n")
    if THINK_OFF in content:
        content = content.split(THINK_OFF)[-1].lstrip("\n")
    if THINK_CLOSE in content:
        content = content.split(THINK_CLOSE)[-1]
    return content.lstrip("\n")
