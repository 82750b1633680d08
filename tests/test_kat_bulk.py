"""Assembly's cheaper per-record work (katdata.kat_bulk) against the parser and pydantic it stands in for."""

from __future__ import annotations

import random


from katdata import kat_bulk, template

PIECES = ["a", "x y", " ", "\n", "\n\n", "\t", "é", "<", ">", "/", "judge", "think", "answer", "_on", "_off",
          *template.MARKERS, "<judge", "</answer", "think>", "<|im_end|>", "<|endoftext|>", "16", "\\", '"']


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))


def _old_check(mode, judge, answer, think):
    """The assemble stage's check before kat_bulk: render, parse back, compare, render again."""
    response = template.render(mode, judge, answer, think)
    back = template.parse(response)
    same = back.ok and (back.mode, back.judge, back.answer, back.think) == (mode, judge, answer, think)
    if not same or template.render(back.mode, back.judge, back.answer, back.think) != response:
        raise template.TemplateError(f"render check failed: {back.errors or 'fields differ after parsing'}")
    return response


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except template.TemplateError as exc:
        return "error", str(exc)


def test_render_checked_agrees_with_render_and_parse():
    rng = random.Random(29)
    n_ok = 0
    for _ in range(20000):
        mode = rng.choice(["on", "off"])
        judge, answer = _text(rng), _text(rng)
        think = _text(rng) if mode == "on" else (None if rng.random() < 0.9 else _text(rng))
        want = _outcome(_old_check, mode, judge, answer, think)
        assert _outcome(kat_bulk.render_checked, mode, judge, answer, think) == want
        n_ok += want[0] == "ok"
        if want[0] == "ok":
            assert kat_bulk.round_trips(want[1], mode, judge, answer, think)
            parsed = template.parse(want[1])
            fields = (parsed.mode, parsed.judge, parsed.answer, parsed.think)
            assert parsed.ok and fields == (mode, judge, answer, think)
    assert n_ok > 1000  # the random fields rendered often enough to test the check


def test_round_trips_refuses_what_the_parser_would_not_give_back():
    good = template.render("on", "needs steps", "16", "8 + 8")
    assert kat_bulk.round_trips(good, "on", "needs steps", "16", "8 + 8")
    assert not kat_bulk.round_trips(good + " ", "on", "needs steps", "16", "8 + 8")
    assert not kat_bulk.round_trips(good, "off", "needs steps", "16", "8 + 8")
    assert not kat_bulk.round_trips(good.replace("8 + 8", "8 <answer> 8"), "on", "needs steps", "16", "8 <answer> 8")
    assert not kat_bulk.round_trips(template.render("off", " j", "a"), "off", " j", "a ", None)


def test_gc_paused_restores_the_collector():
    import gc

    assert gc.isenabled()
    with kat_bulk.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with kat_bulk.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
