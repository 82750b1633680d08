"""The number of a ``numeric`` answer: strict, or by the last-number rule (``sample.verify.numeric_extraction``).

The rule, in order (the first that applies decides):

1. the KAT answer block: when the text holds ``<answer>`` (a whole response), only what follows the last
   ``<answer>`` up to ``</answer>`` is read (answers already taken out by ``template.parse`` hold no tag);
2. marked: the number right after the last ``####``; else the one number inside the last ``\\boxed{...}``;
   else the number right after the last "answer is" / "answer:" / "answer =" (case-insensitive, "final"
   allowed: "The final answer is $18.", "Answer: 18", "The answer is 6*6 = 36."; spaces, ``$``, ``**``, ``\\(``
   may stand between); a marked number followed by an operator ("The answer is 6*6") is not marked;
3. the one number: the text holds exactly one number ("18 dollars", "$1,250");
4. otherwise no number (None): the answer is invalid, never correct, and its class never wins a vote.

``last_number`` (a recipe's choice, not the default) adds step 5: the last number of the text (after the
last ``####``, inside the last ``\\boxed{}``, as the verifier did before strict answers). Answers taken
only by that step are reported as such (``how == "last_number"``), so they can be counted apart.

References (GSM8K ``#### N`` solutions) are trusted text and always read with the last-number rule.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple, Optional

Extraction = Literal["strict", "last_number"]
How = Literal["marked", "one_number", "last_number"]

NUM = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_BLOCK = re.compile(r"<answer>(?!.*<answer>)(.*?)(?:</answer>|$)", re.S)
_FILLER = r"(?:[\s$*]|\\[(\[])*"  # may stand between a marker and its number: spaces, "$", bold "**", "\\(", "\\["
_END = r"(?![\d,.]*\d)(?!\s*[-+*/×÷^]\s*[\d(])"  # the whole number, and no operator after it ("6*6" is no answer)
_HASHES = re.compile(rf"####{_FILLER}({NUM.pattern}){_END}")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SUM = r"(?:[-+*/×÷^()\d.,\s]+=)?"  # "the answer is 6*6 = 36": the number after the worked sum
_ANSWER_IS = re.compile(rf"\banswer(?:\s+is\s*:?|\s*[:=]){_FILLER}{_SUM}{_FILLER}({NUM.pattern}){_END}", re.I)


class NumericAnswer(NamedTuple):
    number: Optional[str]  # canonical form ("16", "2.5"), None when the text gives no answer number
    how: Optional[How]     # which step took it; None with no number


def canonical_number(text: str) -> Optional[str]:
    """'016' -> '16', '1,000' -> '1000', '2.50' -> '2.5', '3.0' -> '3'; None when not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def answer_block(text: str) -> str:
    """The inside of the last ``<answer>`` block when the text holds one (unclosed: up to the end), else the text."""
    m = _ANSWER_BLOCK.search(text)
    return m.group(1) if m else text


def _one(text: str) -> Optional[str]:
    nums = NUM.findall(text)
    return canonical_number(nums[0]) if len(nums) == 1 else None


def _marked(text: str) -> Optional[str]:
    """The number of the last ``#### N``, else of the last ``\\boxed{N}``, else of the last "answer is N"."""
    for marker in (_HASHES, _BOXED, _ANSWER_IS):
        found = marker.findall(text)
        number = (_one if marker is _BOXED else canonical_number)(found[-1]) if found else None
        if number is not None:
            return number
    return None


def last_number(text: Optional[str]) -> Optional[str]:
    """The rule before strict answers: after the last ``####``, else inside the last ``\\boxed{}``, the last number."""
    if not text:
        return None
    if "####" in text:
        text = text.split("####")[-1]
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    nums = NUM.findall(text)
    return canonical_number(nums[-1]) if nums else None


def numeric_answer(text: Optional[str], rule: Extraction = "strict") -> NumericAnswer:
    """The answer number of ``text`` and the step that took it (see the module's docstring)."""
    if not text:
        return NumericAnswer(None, None)
    text = answer_block(text)
    for how, step in (("marked", _marked), ("one_number", _one)):
        number = step(text)
        if number is not None:
            return NumericAnswer(number, how)
    if rule == "last_number":
        number = last_number(text)
        if number is not None:
            return NumericAnswer(number, "last_number")
    return NumericAnswer(None, None)
