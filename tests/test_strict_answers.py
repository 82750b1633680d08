"""Strict numeric answers (issue 26): a number counts only when marked or when it is the answer's one number;
the last-number rule only on a recipe's request (verify.numeric_extraction), and then counted apart."""

import pytest
from pydantic import ValidationError

from katdata.answers import numeric_answer
from katdata.errors import KatdataError
from katdata.records import Attempt, Query, Vote
from katdata.runfiles import RowWriter, read_rows
from katdata.verify import INVALID, Verifier, VerifyConfig, assign_class, extract_number, taken_by_last_number
from katdata.vote import VoteConfig, run as vote_run

STRICT, LAST = Verifier(), Verifier(VerifyConfig(numeric_extraction="last_number"))

# Real think-off answers (the <answer> block as template.parse took it) of the embedded SmolLM2-135M, copied
# verbatim from samples.jsonl of a quickstart run made for this test on 2026-12-05: `katdata run quickstart
# --run-dir /tmp/strict/run2 --until sample --set tag.use_llm=false --set 'data.sources=[{name: gsm8k, limit: 14,
# max_solution_lines: 3}, {name: gsm8k-calc, limit: 16}]'`, its sample stage finished by `katdata sample
# /tmp/strict/run2` (the quickstart's GSM8K queries and sampling settings; no LLM tagger, no solver; fp32).
# name: (answer, the query's reference, (number, how) strictly, (number, how) with numeric_extraction=last_number)
REAL = {
    "one_number": ("40 students are enrolled this year.", "60",  # gsm8k-1116: counted (and wrong)
                   ("40", "one_number"), ("40", "one_number")),
    "marked_sum": ("The answer is 6*6 = 36.", "36",  # gsm8k-calc-394-0: marked, the number after the sum
                   ("36", "marked"), ("36", "marked")),
    "marked_wrong": ("The answer is 4.\n</think_off>\n\n<lengua>\nTambién está enos.\n</lengua>", "16",  # gsm8k-491
                     ("4", "marked"), ("4", "marked")),
    "multi_equation": ("7*2 = 14.", "14",  # gsm8k-calc-324-0: unmarked, three numbers: refused strictly
                       (None, None), ("14", "last_number")),
    "multi_sentence": ("Jasmine had 15 stickers to keep track of, so she has 15 + 7 stickers = 22 stickers.", "13",
                       (None, None), ("22", "last_number")),  # gsm8k-947
    "gibberish_last_is_ref": ("9 + 6 = 15\n9 is 15.", "15",  # gsm8k-calc-20-1: the last number is the reference
                              (None, None), ("15", "last_number")),
    "gibberish_tag_sum": ("<message>7*6 = 42", "42",  # gsm8k-calc-594-1
                          (None, None), ("42", "last_number")),
    "gibberish_ending_5": ("You answer a question about 5*5 with a question, and you answer it completely.", "25",
                           (None, None), ("5", "last_number")),  # gsm8k-calc-70-0
    "gibberish_formula": ("2*girls/teacher*girls = 4girls/girls*guids", "36",  # gsm8k-68
                          (None, None), ("4", "last_number")),
    "nested_answer_block": ("<sentence>5 * 5 = 25\n</sentence>\n\n<answer>\n<response_mode>\nThe response mode for "
                            "this query is fixed in advance.\n</response>", "25",  # gsm8k-calc-70-0, off #1: only
                            (None, None), (None, None)),  # the last <answer> block is read: no number there
    "no_number": ("In this specific query, I'll be either the answer or the recipient. This is not a set rule that can "
                  "be changed.", "48", (None, None), (None, None)),  # gsm8k-calc-375-1
}
# REPLIES_END


def test_rule_on_synthetic_forms():
    assert numeric_answer("The answer is **$1,250**.") == ("1250", "marked")
    assert numeric_answer("Answer: 18") == ("18", "marked")
    assert numeric_answer("3 + 4 = 7, so the final answer is \\(7\\).") == ("7", "marked")
    assert numeric_answer("2 and 3 give \\boxed{5} (not 6)") == ("5", "marked")
    assert numeric_answer("5 + 2 = 7\n#### 7") == ("7", "marked")
    assert numeric_answer("She pays $18 in total.") == ("18", "one_number")
    assert numeric_answer("3 + 4 = 7") == (None, None)
    assert numeric_answer("3 + 4 = 7", "last_number") == ("7", "last_number")
    assert numeric_answer("no digits") == numeric_answer("no digits", "last_number") == (None, None)
    # a whole response: only its answer block counts
    assert numeric_answer("<think>\n2 + 2 = 4\n</think>\n<answer>\nIt is 5.\n</answer>") == ("5", "one_number")


def test_references_parse_as_before():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    assert STRICT.correct("numeric", "18", ref) is True
    assert STRICT.correct("numeric", "The answer is 18.", "18") is True
    assert STRICT.correct("numeric", "9 * 2 = 18", ref) is False  # unmarked, several numbers: no answer
    assert LAST.correct("numeric", "9 * 2 = 18", ref) is True


def test_unparseable_answer_is_wrong_and_invalid_and_never_wins_a_vote():
    seen = []
    assert assign_class("numeric", STRICT.key("numeric", "1 2 3"), seen, STRICT) == INVALID
    assert STRICT.correct("numeric", "1 2 3", "3") is False


def test_config_key():
    assert VerifyConfig().numeric_extraction == "strict"
    assert VerifyConfig(numeric_extraction="last_number").numeric_extraction == "last_number"
    with pytest.raises(ValidationError):
        VerifyConfig(numeric_extraction="first_number")
    assert "last_number" in VerifyConfig.model_fields["numeric_extraction"].description


def test_recipe_key_accepted_and_bad_value_refused(tmp_path):
    from katdata.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("data:\n  sources: [{name: gsm8k, limit: 2}]\n", "utf-8")
    assert load_recipe(path).sample.verify.numeric_extraction == "strict"
    r = load_recipe(path, ["sample.verify.numeric_extraction=last_number"])
    assert r.sample.verify.numeric_extraction == "last_number" and r.solve.verify.numeric_extraction == "strict"
    with pytest.raises(KatdataError, match=r"sample.verify.numeric_extraction.*'strict' or 'last_number'"):
        load_recipe(path, ["sample.verify.numeric_extraction=first"])


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_replies(name):
    """Each real reply under both rules: its number, which step took it, and the verdict on its query."""
    answer, reference, strict, last = REAL[name]
    assert numeric_answer(answer) == strict
    assert numeric_answer(answer, "last_number") == last
    assert extract_number(answer) == strict[0]
    assert taken_by_last_number("numeric", answer) == (last[1] == "last_number")
    assert not taken_by_last_number("math", answer)  # the rule is about numeric answers only
    ref = extract_number(reference, "last_number")
    assert STRICT.correct("numeric", answer, reference) is (strict[0] is not None and strict[0] == ref)
    assert LAST.correct("numeric", answer, reference) is (last[0] is not None and last[0] == ref)


def _voted(tmp_path, verifier):
    """One numeric query per real reply, the reply as its think-off sample, verified by ``verifier``, voted."""
    tmp_path.mkdir()
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all([Query(id=name, query="q", reference=ref, kind="numeric") for name, (_, ref, _, _) in REAL.items()])
    with RowWriter(tmp_path / "samples.jsonl") as w:
        for name, (answer, ref, _, _) in REAL.items():
            w.write(Attempt(id=name, mode="off", text=answer, answer=answer,
                            answer_class=assign_class("numeric", verifier.key("numeric", answer), [], verifier),
                            correct=verifier.correct("numeric", answer, ref)))
    stats = vote_run(VoteConfig(n=1, explore_share=0.0), tmp_path)
    return stats, {v.id: v for v in read_rows(tmp_path / "votes.jsonl", Vote)}


def test_vote_stats_count_last_number_answers_apart(tmp_path):
    taken = [n for n, (_, _, _, last) in REAL.items() if last[1] == "last_number"]
    taken_right = [n for n in taken if LAST.correct("numeric", REAL[n][0], REAL[n][1])]
    stats, votes = _voted(tmp_path / "last", LAST)
    assert stats["last_number_answers"] == len(taken) > 0
    assert stats["last_number_correct"] == len(taken_right)
    stats, votes = _voted(tmp_path / "strict", STRICT)
    assert stats["last_number_answers"] == stats["last_number_correct"] == 0
    for name in taken:  # strictly, these replies are no answer: invalid, and no vote evidence
        assert votes[name].classes_off == {INVALID: 1} and votes[name].p_off == 0.0 and votes[name].label is None
