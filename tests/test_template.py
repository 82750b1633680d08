"""The KAT response template: byte-exact render, tolerant parse, every error code."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from katdata.template import ERRORS, MARKERS, TemplateError, history_answer, parse, render

OFF = "<judge>\nRecall only.\n</judge>\n\n<think_off>\n<answer>\nParis\n</answer>"
ON = "<judge>\nNeeds steps.\n</judge>\n\n<think_on>\n<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>"


def test_render_is_byte_exact():
    assert render("off", "Recall only.", "Paris") == OFF
    assert render("on", "Needs steps.", "4", think="2+2=4") == ON


@pytest.mark.parametrize("kwargs, msg", [
    (dict(mode="on", judge="j", answer="a"), "think"),
    (dict(mode="off", judge="j", answer="a", think="t"), "no think"),
    (dict(mode="maybe", judge="j", answer="a"), "mode"),
    (dict(mode="off", judge=" ", answer="a"), "judge is empty"),
    (dict(mode="off", judge="j", answer="<answer>"), "marker"),
])
def test_render_refuses_bad_content(kwargs, msg):
    with pytest.raises(TemplateError, match=msg):
        render(**kwargs)


@pytest.mark.parametrize("text", [
    ON,
    ON[len("<judge>\n"):],  # raw completion after the pre-filled "<judge>\n"
    ON + "<|im_end|>",
    ON + "<|im_end|>\n<|endoftext|>  \n",
    ON.replace("</think>\n<answer>", "</think>\n\n<answer>"),  # blank line before <answer>
])
def test_parse_accepts_what_models_emit(text):
    p = parse(text)
    assert p.ok and p.errors == []
    assert (p.mode, p.judge, p.think, p.answer) == ("on", "Needs steps.", "2+2=4", "4")


CASES = {
    "missing_judge": "just an answer",
    "unclosed_judge": "<judge>\nthe rationale goes on",
    "empty_judge": "<judge>\n \n</judge>\n\n<think_off>\n<answer>\nA\n</answer>",
    "text_before_judge": "Sure! " + OFF,
    "no_mode_tag": "<judge>\nx\n</judge>\n\n<answer>\nA\n</answer>",
    "two_mode_tags": OFF.replace("<think_off>", "<think_off>\n<think_on>"),
    "text_before_mode": OFF.replace("<think_off>", "so <think_off>"),
    "think_in_off_mode": OFF.replace("<answer>", "<think>\nhm\n</think>\n<answer>"),
    "missing_think": ON.replace("<think>\n2+2=4\n</think>\n", ""),
    "unclosed_think": ON.split("</think>")[0],
    "empty_think": ON.replace("2+2=4", " "),
    "text_before_answer": ON.replace("</think>\n", "</think>\nso\n"),
    "missing_answer": OFF.split("<answer>")[0],
    "unclosed_answer": OFF.replace("\n</answer>", ""),
    "empty_answer": OFF.replace("Paris", ""),
    "text_after_answer": OFF + "\nAnything else?",
    "nested_marker": OFF.replace("Paris", "Paris <judge>"),  # render refuses this text, so parse does too
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_error_code(code):
    p = parse(CASES[code])
    assert code in p.errors and not p.ok


def test_every_error_code_is_tested():
    assert set(ERRORS) - {"truncated"} == set(CASES)


def test_truncation():
    assert parse(ON, finish_reason="length").truncated
    assert "truncated" in parse(ON, finish_reason="length").errors
    cut = parse(ON[:-20])  # ends inside the open <answer> block
    assert cut.truncated and cut.mode == "on" and cut.think == "2+2=4"
    assert parse(ON.split("</think>")[0]).truncated
    assert not parse(OFF).truncated
    # ending right after the mode tag is ending inside the open mode block
    assert parse(OFF.split("<answer>")[0]).truncated
    # a response that stopped after its think block, with no answer, is malformed but complete
    no_answer = parse(ON.split("<answer>")[0] + "That is all.")
    assert not no_answer.truncated and "missing_answer" in no_answer.errors


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(
    lambda s: s.strip() and not any(m in s for m in MARKERS) and "<|im_end|>" not in s and "<|endoftext|>" not in s
)


@settings(max_examples=300, deadline=None)
@given(judge=text, answer=text, think=st.one_of(st.none(), text))
def test_parse_inverts_render(judge, answer, think):
    mode = "off" if think is None else "on"
    p = parse(render(mode, judge, answer, think))
    assert p.ok, p.errors
    assert (p.mode, p.judge, p.think, p.answer) == (mode, judge, think, answer)


def test_history_answer_fallbacks():
    assert history_answer(ON) == "4"
    assert history_answer(OFF) == "Paris"
    assert history_answer("<judge>\nx\n</judge>\n\n<think_off>\n\nParis") == "Paris"
    assert history_answer("<think>\nsteps\n</think>\n\n42") == "42"
    assert history_answer("plain reply") == "plain reply"
