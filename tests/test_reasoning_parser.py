"""The KAT reasoning/content split (katdata.reasoning), on synthetic text and deltas.

Every split point of every marker, both modes, truncated at every length, with and without the
leading ``<judge>\\n``, forced-mode prefixes; the streamed parts always join to the whole-text split.
The vLLM parser class over it is exercised against a real server in test_serve.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from katdata import template
from katdata.reasoning import StreamSplitter, answer_text, split
from katdata.template import FORCE_PREFIX, GENERATION_PREFIX, MARKERS

JUDGE = "A short question that needs a small calculation."
THINK = "2 apples plus 3 apples.\nThat is 5."
ANSWER = "There are 5 apples."
RESPONSES = {
    "on": template.render("on", JUDGE, ANSWER, THINK),
    "off": template.render("off", JUDGE, ANSWER),
}


def expected(full: str) -> tuple[str, str]:
    """(reasoning, content) of a complete rendered response, by its layout."""
    k = full.index("<answer>\n", full.index("</judge>")) + len("<answer>\n")
    return full[:k], full[k:]


def stream(text: str, cuts, prefix=GENERATION_PREFIX) -> tuple[str, str, StreamSplitter]:
    s = StreamSplitter(prefix)
    r = c = ""
    points = [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(points, points[1:]):
        dr, dc = s.feed(text[a:b])
        assert dr + dc == text[a:b]
        r, c = r + dr, c + dc
    return r, c, s


def case(mode: str, leading_judge: bool) -> tuple[str, str]:
    """(text, prefix): the whole response, or the part after the pre-filled ``<judge>\n``."""
    full = RESPONSES[mode]
    return (full, "") if leading_judge else (full[len(GENERATION_PREFIX):], GENERATION_PREFIX)


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("leading_judge", [True, False])
def test_whole_text_split_both_modes(mode, leading_judge):
    text, prefix = case(mode, leading_judge)
    parts = split(text, prefix)
    reasoning, content = expected(text)
    assert (parts.reasoning, parts.content, parts.mode, parts.ended) == (reasoning, content, mode, True)
    assert parts.reasoning + parts.content == text
    assert answer_text(parts.content) == ANSWER
    assert ("<think_on>" if mode == "on" else "<think_off>") in parts.reasoning  # the mode, readable


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("leading_judge", [True, False])
def test_every_split_point_of_every_marker(mode, leading_judge):
    text, prefix = case(mode, leading_judge)
    want = split(text, prefix)
    checked = 0
    for marker in MARKERS:
        start = text.find(marker)
        while start >= 0:
            end = start + len(marker) + (text[start + len(marker):].startswith("\n"))  # with its newline
            for cut in range(start, end + 1):
                r, c, s = stream(text, [cut], prefix)
                assert (r, c, s.mode) == (want.reasoning, want.content, mode), (marker, cut)
                checked += 1
            # the marker split at two points at once, and its last character fused with the newline
            for cut in range(start + 1, end):
                r, c, _ = stream(text, [start + 1, cut, end], prefix)
                assert (r, c) == (want.reasoning, want.content), (marker, cut)
            start = text.find(marker, start + 1)
    assert checked > 40
    r, c, _ = stream(text, range(len(text)), prefix)  # one character per delta
    assert (r, c) == (want.reasoning, want.content)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_truncated_at_every_length_is_reasoning_until_the_answer_opens(mode):
    text = RESPONSES[mode][len(GENERATION_PREFIX):]
    k = len(expected(text)[0])
    for n in range(len(text) + 1):
        part = text[:n]
        parts = split(part)
        if n < k:  # the opener is incomplete (or the character after <answer> has not come yet)
            assert (parts.reasoning, parts.content, parts.ended) == (part, "", False), n
        else:
            assert (parts.reasoning, parts.content, parts.ended) == (text[:k], text[k:n], True), n
        r, c, _ = stream(part, range(0, n, 3))
        assert (r, c) == (parts.reasoning, parts.content)
        mode_tag = "<think_on>" if mode == "on" else "<think_off>"
        assert parts.mode == (mode if mode_tag in part else None)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_forced_mode_prefix(mode):
    """A pre-fill that forces the mode: the completion continues after it."""
    full = RESPONSES[mode]
    prefix = f"{GENERATION_PREFIX}{JUDGE}\n</judge>\n\n{FORCE_PREFIX[mode]}"
    assert full.startswith(prefix)
    completion = full[len(prefix):]
    parts = split(completion, prefix)
    assert parts.mode == mode and parts.ended
    if mode == "off":  # the pre-fill opened the answer already: all content
        assert (parts.reasoning, parts.content) == ("", completion)
    else:
        assert parts.reasoning == THINK + "\n</think>\n<answer>\n"
        assert parts.content == completion[len(parts.reasoning):]
    r, c, _ = stream(completion, range(len(completion)), prefix)
    assert (r, c) == (parts.reasoning, parts.content)


def test_tolerated_layouts():
    # a blank line before <answer>, an opener without its newline
    blank = f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\nx\n</think>\n\n<answer>\n42\n</answer>"
    assert split(blank).content == "42\n</answer>"
    tight = f"{JUDGE}\n</judge>\n\n<think_off>\n<answer>42"
    assert (split(tight).content, split(tight[:-2]).ended) == ("42", False)
    # <answer> inside the think block does not open the answer; in the judge neither
    inside = f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\nwrite <answer>\nlater\n</think>\n<answer>\n42"
    assert split(inside).content == "42"
    early = "Use <answer>\n tags.\n</judge>\n\n<think_off>\n<answer>\n42"
    assert split(early).content == "42"
    # no mode tag: the first <answer> after the judge still opens the answer (the mode stays unknown)
    assert (split(f"{JUDGE}\n</judge>\n\n<answer>\n42").content, split(f"{JUDGE}\n</judge>\n<answer>\n42").mode) == ("42", None)
    # no markers at all (a model that ignores the format): all reasoning
    assert split("Just an answer.") == split("Just an answer.").__class__("Just an answer.", "", None, False)
    # the prefix is not part of the result
    assert split("", GENERATION_PREFIX).reasoning == ""
    assert answer_text("42\n</answer>\n") == "42" and answer_text("42") == "42"


def test_import_katdata_reasoning_loads_no_vllm():
    code = "import sys, katdata, katdata.reasoning; print(any(m.split('.')[0] in ('vllm', 'torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
