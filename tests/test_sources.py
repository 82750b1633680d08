"""Packaged real data: the one-step sums built from GSM8K's calculator notes, and the other sources' ids."""

import re

import pytest

from katdata import sources
from katdata.errors import KatdataError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.mark.parametrize("name,digits", [("gsm8k-calc", 1), ("gsm8k-calc2", 2)])
def test_calc_queries_are_one_correct_step_from_a_gsm8k_note(name, digits):
    rows = sources.load(name)
    assert len(rows) > 100
    assert len({q.query for q in rows}) == len(rows), "each expression once"
    for q in rows:
        m = re.fullmatch(r"What is (\d+)([-+*/])(\d+)\?", q.query)
        assert m, q.query
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert max(len(m.group(1)), len(m.group(3))) == digits == q.meta["digits"]
        result = int(q.reference)
        assert (a == b * result) if op == "/" else OPS[op](a, b) == result, q
        assert q.kind == "numeric" and q.source == name
        # the note comes from the GSM8K problem the id names
        i, _ = q.id.removeprefix("gsm8k-calc-").split("-")
        assert q.meta["gsm8k_id"] == f"gsm8k-{i}"


def test_calc_ids_are_unique_across_both_sets_and_sources():
    one, two = sources.load("gsm8k-calc"), sources.load("gsm8k-calc2")
    ids = [q.id for q in one + two]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {q.id for q in sources.load("gsm8k")}


def test_calc_note_in_a_real_solution_becomes_a_query():
    first = sources.load("gsm8k")[0]  # "... <<16-3-4=9>> ... <<9*2=18>> ... #### 18"
    notes = re.findall(r"<<([^=]+)=", first.meta["solution"])
    calc = {q.query for q in sources.load("gsm8k-calc") if q.meta["gsm8k_id"] == first.id}
    singles = {f"What is {n}?" for n in notes if re.fullmatch(r"\d[-+*/]\d", n)}
    assert singles and singles <= calc


def test_seeded_sample_is_stable_and_sized():
    a, b = sources.load("gsm8k-calc", 10, seed=3), sources.load("gsm8k-calc", 10, seed=3)
    assert [q.id for q in a] == [q.id for q in b] and len(a) == 10
    assert [q.id for q in a] != [q.id for q in sources.load("gsm8k-calc", 10, seed=4)]


def test_unknown_source_names_the_known_ones():
    with pytest.raises(KatdataError, match="gsm8k-calc"):
        sources.load("gsm8k-cal")


def test_one_step_sums_get_a_think_off_prior_and_word_problems_keep_theirs():
    from katdata.tag import TagConfig, rule_tags

    cfg = TagConfig()
    for q in sources.load("gsm8k-calc", 20, seed=0) + sources.load("gsm8k-calc2", 20, seed=0):
        assert rule_tags(q, cfg)["p_reasoning"] < 0.5, q.query
    problems = sources.load("gsm8k", 40, seed=0)
    assert sum(rule_tags(q, cfg)["p_reasoning"] >= 0.5 for q in problems) >= 30


def test_max_solution_lines_keeps_short_worked_solutions_and_is_refused_elsewhere(tmp_path):
    """GSM8K problems solved in at most N lines (sampled after the filter, so the sample keeps its size); a
    source without worked solutions refuses the key at recipe load, naming it."""
    from katdata.recipe import load_recipe

    everything = sources.load("gsm8k")
    short = sources.load("gsm8k", max_solution_lines=3)
    assert 0 < len(short) < len(everything)
    assert {sources.solution_lines(q) for q in short} == {2, 3}
    assert any(sources.solution_lines(q) > 3 for q in everything)
    picked = sources.load("gsm8k", 14, seed=0, max_solution_lines=3)
    assert len(picked) == 14 and all(sources.solution_lines(q) <= 3 for q in picked)
    with pytest.raises(KatdataError, match="no worked solutions"):
        sources.load("fanoutqa-hop", max_solution_lines=3)
    path = tmp_path / "r.yaml"
    path.write_text("name: s\ndata:\n  sources:\n    - name: gsm8k-calc\n      max_solution_lines: 3\n", "utf-8")
    with pytest.raises(KatdataError, match=r"r.yaml:4: data.sources.0: .*max_solution_lines applies to sources with "
                                           r"worked solutions \(gsm8k\), not 'gsm8k-calc'"):
        load_recipe(path)
