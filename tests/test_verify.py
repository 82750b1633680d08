"""Verifiers: normalisation, numbers, Math-Verify in worker processes (and their failures), code,
the LLM grader's replies."""

import os
import time

import pytest

from katdata import sources
from katdata.backends.scripted import ScriptedBackend
from katdata.errors import KatdataError
from katdata.records import Query
from katdata.sandbox import SandboxConfig
from katdata.verify import (INVALID, MathPool, Verifier, VerifyConfig, VerifyError, assign_class, canonical_number,
                            extract_code, extract_number, grader_prompt, normalize, normalize_choice, parse_verdict)


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
    assert normalize_choice("A, because it is the largest") == "a"


@pytest.mark.parametrize("answer,ref,want", [
    ("A and C", "A", False), ("A, B", "A", False), ("B or D", "B", False), ("The answer is A and C.", "C", False),
    ("(A) and (C)", "C, A", True), ("A, B and D", "A, B, D", True), ("A and C", "A, C, D", False),
    ("Answer: B", "b", True), ("B) the second one", "B", True)])
def test_choice_answers_listing_several_options_are_wrong(answer, ref, want):
    assert Verifier().correct("choice", answer, ref) is want


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
        with pytest.raises(VerifyError, match="verify timeout"):
            pool.call(time.sleep, 20)
        assert pool.timeouts == 1
        assert pool.call(abs, -3) == 3  # a fresh pool after the kill
    finally:
        pool.close()


def test_math_pool_worker_crash_and_failure_are_errors_not_verdicts():
    pool = MathPool(workers=1, timeout_s=2.0)
    try:
        with pytest.raises(VerifyError, match="verify timeout"):
            pool.call(os._exit, 3)  # the worker dies: its job never answers
        with pytest.raises(VerifyError, match="verify error: .*ZeroDivisionError"):
            pool.call(divmod, 1, 0)
        assert pool.timeouts == 1 and pool.errors == 1
        assert pool.call(abs, -3) == 3
    finally:
        pool.close()


def test_math_verify_timeout_is_no_verdict_not_wrong():
    """Real Math-Verify workers with a tiny timeout: every call fails, and that is not a wrong answer."""
    v = Verifier(VerifyConfig(math_workers=1, math_timeout_s=1e-6))
    with pytest.raises(VerifyError, match="verify timeout"):
        v.check("math", "The answer is $\\frac{1}{2}$", "0.5")
    assert v.correct("math", "The answer is $\\frac{1}{2}$", "0.5") is None


def test_code_verdicts_run_in_the_sandbox():
    q = sources.load("humaneval")[2]
    v = Verifier()
    good = "```python\n" + q.meta["prompt"] + q.meta["canonical_solution"] + "```"
    assert v.correct("code", good, q.reference, q) is True
    assert v.correct("code", "```python\ndef " + q.meta["entry_point"] + "(*a):\n    return 0\n```", q.reference, q) is False
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"
    assert v.code_isolation([q]) == "bwrap"  # isolated: there is no unisolated fallback by default


def test_code_check_whose_sandbox_cannot_start_is_no_verdict():
    """A sandbox that could not start (the program does not fit its tmpfs) ran nothing: no verdict, not wrong."""
    q = sources.load("humaneval")[2]
    v = Verifier(sandbox=SandboxConfig(tmp_size_mb=1))
    good = "```python\n" + q.meta["prompt"] + q.meta["canonical_solution"] + "# " + "x" * (2 << 20) + "\n```"
    with pytest.raises(VerifyError, match="verify error: sandbox setup failed"):
        v.check("code", good, q.reference, q)
    assert v.correct("code", good, q.reference, q) is None
    assert Verifier().correct("code", good, q.reference, q) is True  # the control: it passes where it fits


def test_llm_grader_reply_parsing_and_prompt():
    seen = []

    def script(req, i):
        seen.append(req.messages[-1]["content"])
        return "INCORRECT" if "Lyon" in req.messages[-1]["content"] else "CORRECT."

    v = Verifier(grader=ScriptedBackend(script=script))
    q = Query(id="a", query="Capital of France?", reference="Paris", kind="open")
    assert v.correct("open", "It is Paris.", "Paris", q) is True
    assert v.correct("open", "Lyon", "Paris", q) is False
    assert "Capital of France?" in seen[0] and "Paris" in seen[0]
    assert seen[0].startswith(grader_prompt(VerifyConfig()).split("{")[0])
    assert Verifier().correct("open", "x", "y") is None  # no grader engine: no verdict


@pytest.mark.parametrize("reply,want", [
    ("CORRECT", True), ("Correct.", True), ("yes", True), ("Yes, it matches.", True), ("right", True),
    ("INCORRECT", False), ("Incorrect, because", False), ("Not correct.", False), ("not correct", False),
    ("wrong", False), ("No.", False), ("No, it is wrong", False), ("NOT RIGHT", False),
    ("hmm", None), ("", None), ("Not wrong", None), ("The candidate", None)])
def test_grader_verdict_parser(reply, want):
    assert parse_verdict(reply) is want


def test_exact_contains_whole_words_only():
    v = Verifier()
    assert v.correct("exact", "Mark Mulder bats left-handed, so: Left.", "Left") is True
    assert v.correct("exact", "He was born in Cleft Valley", "Left") is False
    assert Verifier(VerifyConfig(exact_contains=False)).correct("exact", "He bats left", "Left") is False


# -- failed verifications in the stages: counted apart from wrong answers, and a stop past the share

HALF = "$\\frac{1}{2}$"
MATH_Q = Query(id="m1", query="What is one half as a fraction?", reference="0.5", kind="math")


def _queries(tmp_path):
    from katdata.runfiles import RowWriter

    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all([MATH_Q])


def _tiny_timeout(share: float) -> VerifyConfig:
    return VerifyConfig(math_workers=1, math_timeout_s=1e-6, max_error_share=share)


def test_sample_stage_counts_verify_errors_and_stops_past_the_share(tmp_path):
    from katdata import sample
    from katdata.records import Attempt
    from katdata.runfiles import read_rows

    _queries(tmp_path)
    backend = ScriptedBackend(script=lambda req, i: f"x\n</think>\n<answer>\n{HALF}\n</answer>"
                              if req.prefix.endswith("<think>\n") else f"{HALF}\n</answer>")
    cfg = sample.SampleConfig(n=1, rounds=[], verify=_tiny_timeout(0.2))
    with pytest.raises(KatdataError, match=r"sample: (\d+) of \1 answer verifications failed.*max_error_share = 0.2"):
        sample.run(cfg, tmp_path, lambda name: backend)
    out = tmp_path / "samples.jsonl"
    assert not out.exists() or not list(read_rows(out, Attempt))  # the failing round was not written

    cfg = sample.SampleConfig(n=1, rounds=[], verify=_tiny_timeout(1.0))
    stats = sample.run(cfg, tmp_path, lambda name: backend)
    rows = list(read_rows(out, Attempt))
    assert stats["verify_errors"] == 2 == len(rows) and stats["no_answer"] == 0
    assert all(a.correct is None and a.reason.startswith("verify timeout") for a in rows)


def test_solve_stage_counts_verify_errors_apart_from_mismatches(tmp_path):
    from katdata import solve
    from katdata.records import Attempt
    from katdata.runfiles import read_rows

    _queries(tmp_path)

    def script(req, i):
        text = req.messages[0]["content"]
        if text.startswith("You are the critic"):
            return " 9\nVerdict: accept\nReason: fine"
        return f"Half of one is {HALF}.\nFinal answer: {HALF}"

    backend = ScriptedBackend(script=script)
    with pytest.raises(KatdataError, match="solve: 1 of 1 answer verifications failed"):
        solve.run(solve.SolveConfig(rounds=0, verify=_tiny_timeout(0.2)), tmp_path, lambda name: backend)
    stats = solve.run(solve.SolveConfig(rounds=0, verify=_tiny_timeout(1.0)), tmp_path, lambda name: backend)
    [row] = list(read_rows(tmp_path / "solve.jsonl", Attempt))
    assert row.correct is None and row.reason.startswith("verify_error: verify timeout")
    assert stats["verify_errors"] == 1 and stats["accepted"] == 0 and "reference_mismatch" not in stats["rejects"]
