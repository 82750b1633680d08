"""Verifiers: normalisation, numbers, Math-Verify in worker processes, code, judge replies."""

import time

import pytest

from katdata import sources
from katdata.backends.scripted import ScriptedBackend
from katdata.records import Query
from katdata.verify import (INVALID, MathPool, Verifier, VerifyConfig, assign_class, canonical_number,
                            extract_code, extract_number, normalize, normalize_choice, parse_verdict)


@pytest.mark.parametrize("text,want", [("016", "16"), ("16", "16"), ("1,000", "1000"), ("2.50", "2.5"),
                                       ("3.0", "3"), ("-7", "-7"), ("$18", "18"), ("abc", None)])
def test_canonical_number(text, want):
    assert canonical_number(text) == want


@pytest.mark.parametrize("text,want", [
    ("The answer is 16.", "16"), ("She pays $1,250 in total", "1250"), ("so 3 + 4 = 7\n#### 7", "7"),
    ("\\boxed{042} then 9", "42"), ("no digits here", None), (None, None)])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_normalize_folds_case_space_punctuation_and_leading_zeros():
    assert normalize("  The   Eiffel Tower! ") == normalize("eiffel tower") == "eiffel tower"
    assert normalize("016") == normalize("16.") == "16"
    assert normalize("Left") != normalize("Right")
    assert normalize("   ") is None


def test_choice_letters():
    assert normalize_choice("(B)") == normalize_choice("b) the second") == normalize_choice("Answer: B") == "b"


def test_numeric_verdicts_against_gsm8k_reference():
    v = Verifier()
    q = sources.load("gsm8k", limit=1, seed=3)[0]
    ref = q.reference
    assert v.correct("numeric", f"So the total is {ref}.", q.meta["solution"], q) is True
    assert v.correct("numeric", f"So the total is {int(ref) + 1}.", q.meta["solution"], q) is False
    assert v.correct("numeric", "0" + ref, ref) is True
    assert v.correct("numeric", None, ref) is False
    assert v.correct("numeric", "16", None) is None


def test_exact_verdicts():
    v = Verifier()
    assert v.correct("exact", "left.", "Left") is True
    assert v.correct("exact", "Right", "Left") is False


def test_math_through_math_verify_in_workers():
    v = Verifier(VerifyConfig(math_workers=1, math_timeout_s=30))
    assert v.correct("math", "The answer is $\\frac{1}{2}$", "0.5") is True
    assert v.correct("math", "$\\boxed{016}$", "16") is True
    assert v.correct("math", "$x = 3$", "4") is False
    a, b = v.key("math", "$\\frac{2}{4}$"), v.key("math", "0.5")
    seen: list[str] = []
    assert assign_class("math", a, seen, v) == assign_class("math", b, seen, v)
    assert assign_class("math", None, seen, v) == INVALID


def test_math_pool_timeout_kills_and_recovers():
    pool = MathPool(workers=1, timeout_s=0.5)
    try:
        t0 = time.monotonic()
        assert pool.call(time.sleep, 20) is None
        assert pool.timeouts == 1 and time.monotonic() - t0 < 10
        assert pool.call(abs, -3) == 3  # a fresh pool after the kill
    finally:
        pool.close()


def test_code_verdicts_run_in_the_sandbox():
    q = sources.load("humaneval")[2]
    v = Verifier()
    good = "```python\n" + q.meta["prompt"] + q.meta["canonical_solution"] + "```"
    assert v.correct("code", good, q.reference, q) is True
    assert v.correct("code", "```python\ndef " + q.meta["entry_point"] + "(*a):\n    return 0\n```", q.reference, q) is False
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"


def test_llm_judge_reply_parsing_and_prompt():
    seen = []

    def script(req, i):
        seen.append(req.messages[-1]["content"])
        return "INCORRECT" if "Lyon" in req.messages[-1]["content"] else "CORRECT."

    v = Verifier(judge=ScriptedBackend(script=script))
    q = Query(id="a", query="Capital of France?", reference="Paris", kind="open")
    assert v.correct("open", "It is Paris.", "Paris", q) is True
    assert v.correct("open", "Lyon", "Paris", q) is False
    assert "Capital of France?" in seen[0] and "Paris" in seen[0]
    assert parse_verdict("Incorrect, because") is False and parse_verdict("hmm") is None
    assert Verifier().correct("open", "x", "y") is None  # no judge engine: no verdict


def test_exact_contains_whole_words_only():
    v = Verifier()
    assert v.correct("exact", "Mark Mulder bats left-handed, so: Left.", "Left") is True
    assert v.correct("exact", "He was born in Cleft Valley", "Left") is False
    assert Verifier(VerifyConfig(exact_contains=False)).correct("exact", "He bats left", "Left") is False
