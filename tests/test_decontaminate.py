"""Decontamination against the packaged benchmarks (real GSM8K, AIME 2025, HumanEval, FanOutQA texts) and files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from katdata import decontaminate as dc
from katdata import sources
from katdata.errors import InputError
from katdata.inputs import FieldMap
from katdata.records import Query

ROOT = Path(__file__).resolve().parent.parent
UNRELATED = [
    "Write a haiku about the sea at dawn, with the word 'salt' in its second line.",
    "What is the capital of Australia?",
    "Explain the difference between a list and a tuple in Python, with one example of each.",
    "A farmer plants 12 rows of 7 apple trees and sells the apples of every third tree at the county fair. "
    "How many trees does he sell from?",
    "Summarise the plot of Hamlet in three sentences for a ten-year-old reader.",
]


@pytest.fixture(scope="module")
def gsm8k():
    return sources.load("gsm8k")


@pytest.fixture(scope="module")
def packaged():
    """Indexes of all four packaged benchmarks, built once."""
    cfg = dc.DecontaminateConfig()
    return cfg, dc.build_indexes(cfg)


def q(text, qid="q"):
    return Query(id=qid, query=text)


def check(text, indexes, cfg):
    return dc.match_text(text, indexes, cfg)


def test_words_normalise_case_unicode_punctuation_and_keep_math_signs():
    assert dc.words("  Ｗhat is the CAPITAL\tof  “France”?!  ") == ["what", "is", "the", "capital", "of", "france"]
    assert dc.words("Don’t pay $18.50, pay 18.50 — (well-known)") == ["don't", "pay", "18.50", "pay", "18.50",
                                                                       "well-known"]
    assert dc.words("What is 9*2?") != dc.words("What is 9+2?") != dc.words("What is 9-2?")
    assert dc.words("... --- !!!") == ["---"]  # math signs survive, other punctuation-only words vanish
    assert dc.ngrams(["a", "b", "c"], 2) == ["a b", "b c"] and dc.ngrams(["a"], 2) == []


def test_packaged_benchmarks_cover_every_packaged_source_once():
    owners = {s: [b.name for b in dc.PACKAGED.values() if s in b.indexed + b.derived] for s in sources.TABLE}
    assert all(len(v) == 1 for v in owners.values()), owners
    assert dc.benchmark_of("gsm8k-calc") == "gsm8k" and dc.benchmark_of("fanoutqa-hop") == "fanoutqa"
    assert dc.benchmark_of("my_file.jsonl") is None
    assert dc.DecontaminateConfig().benchmarks == ["gsm8k", "aime2025", "humaneval", "fanoutqa"]


def test_the_gsm8k_index_holds_the_full_test_set_not_a_sample(packaged, gsm8k):
    _, indexes = packaged
    stats = {idx.name: idx.items for idx in indexes}
    assert stats["gsm8k"] == len(gsm8k) == 1319
    assert stats["aime2025"] == 30 and stats["humaneval"] == 164 and stats["fanoutqa"] > 2000


def test_gsm8k_question_caught_by_exact_match_despite_case_space_and_punctuation(packaged, gsm8k):
    cfg, indexes = packaged
    item = gsm8k[100]
    variant = "  " + item.query.upper().replace(" ", "   ").rstrip("?.") + " !"
    m = check(variant, indexes, cfg)
    assert (m.benchmark, m.item_id, m.kind, m.overlap) == ("gsm8k", "gsm8k-100", "exact", 1.0)


def test_gsm8k_question_with_a_changed_last_number_caught_by_ngram_overlap(packaged, gsm8k):
    cfg, indexes = packaged
    for item in gsm8k[:200]:
        ws = item.query.split()
        last = max(i for i, w in enumerate(ws) if any(c.isdigit() for c in w))
        if last < len(ws) - 12 or len(ws) < 30:  # a number near the end of a long enough question
            continue
        ws[last] = "7777"
        m = check(" ".join(ws), indexes, cfg)
        assert m is not None and m.kind == "ngram" and m.benchmark == "gsm8k", item.query
        assert m.item_id == item.id and cfg.threshold <= m.overlap < 1.0
        assert m.matched < m.total == len(dc.words(" ".join(ws))) - 7
        break
    else:
        pytest.fail("no GSM8K question with a number near its end")


def test_a_benchmark_item_inside_a_short_instruction_is_caught(packaged, gsm8k):
    cfg, indexes = packaged
    m = check("Solve step by step and put the final answer in a box: " + gsm8k[5].query, indexes, cfg)
    assert m.kind == "ngram" and m.item_id == "gsm8k-5" and m.overlap > 0.7


def test_unrelated_queries_are_kept(packaged):
    cfg, indexes = packaged
    found = list(dc.find_overlaps([q(t, f"u{i}") for i, t in enumerate(UNRELATED)], indexes, cfg))
    assert found == []


def test_a_stock_phrase_alone_is_kept_by_default_and_caught_by_the_any_match_rule(packaged):
    """AIME's "m/n where m and n are relatively prime positive integers" is in countless training problems."""
    cfg, indexes = packaged
    text = ("A bag holds 4 red and 6 blue marbles. Two are drawn at random. The probability that both are red "
            "is m/n, where m and n are relatively prime positive integers. Find m+n.")
    assert check(text, indexes, cfg) is None
    any_match = dc.DecontaminateConfig(threshold=0)
    m = check(text, indexes, any_match)
    assert m.benchmark == "aime2025" and m.kind == "ngram" and 0 < m.overlap < 0.5 and m.matched >= 1


def test_a_query_shorter_than_n_is_caught_by_exact_match_only(tmp_path, packaged, gsm8k):
    cfg, indexes = packaged
    (tmp_path / "capitals.jsonl").write_text(json.dumps({"id": "c1", "query": "What is the capital of France?"}) + "\n")
    short = dc.DecontaminateConfig(benchmarks=[], files=[{"path": str(tmp_path / "capitals.jsonl")}])
    idx = dc.build_indexes(short)
    assert check("what is the capital of france", idx, short).kind == "exact"
    assert check("What is the capital of France today?", idx, short) is None  # 7 words: no n-gram test
    seven = " ".join(gsm8k[0].query.split()[:7])  # the first 7 words of a GSM8K question
    assert len(dc.words(seven)) < cfg.ngram and check(seven, indexes, cfg) is None
    eight = " ".join(gsm8k[0].query.split()[:8])  # 8 words: one 8-gram, found
    assert check(eight, indexes, cfg).kind == "ngram"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_user_file_benchmark_in_jsonl_and_csv(tmp_path, fmt):
    items = [{"pid": "e1", "problem": "Tom has three boxes with eleven pencils in each box and gives away nine "
              "pencils to his sister. How many pencils does Tom keep?"},
             {"pid": "e2", "problem": "Name the largest moon of Saturn."}]
    path = tmp_path / f"evalset.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
    else:
        path.write_text("pid,problem\n" + "".join(f'{r["pid"]},"{r["problem"]}"\n' for r in items))
    fields = {"id": "pid", "query": "problem"}
    cfg = dc.DecontaminateConfig(benchmarks=[], files=[{"path": str(path), "fields": fields}])
    assert cfg.files[0].fields == FieldMap(id="pid", query="problem") and cfg.files[0].label == "evalset"
    indexes = dc.build_indexes(cfg)
    queries = [q("Tom has three boxes with eleven pencils in each box and gives away five pencils to his sister. "
                 "How many pencils does Tom keep?", "a"), q("name the largest moon of saturn", "b"),
               q("Name the largest moon of Jupiter.", "c")]
    found = {qq.id: m for qq, m in dc.find_overlaps(queries, indexes, cfg)}
    assert set(found) == {"a", "b"}
    assert (found["a"].benchmark, found["a"].item_id, found["a"].kind) == ("evalset", "e1", "ngram")
    assert (found["b"].item_id, found["b"].kind) == ("e2", "exact")
    named = dc.DecontaminateConfig(benchmarks=[], files=[{"path": str(path), "name": "held-out", "fields": fields}])
    assert dc.build_indexes(named)[0].name == "held-out"


def test_a_missing_or_bad_benchmark_file_is_an_input_error(tmp_path):
    cfg = dc.DecontaminateConfig(benchmarks=[], files=[{"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(InputError, match=r"decontaminate.files\[0\].path"):
        dc.build_indexes(cfg)
    (tmp_path / "bad.csv").write_text("question\nx\n")
    cfg = dc.DecontaminateConfig(benchmarks=[], files=[{"path": str(tmp_path / "bad.csv")}])
    with pytest.raises(InputError, match="no column 'query'"):
        dc.build_indexes(cfg)


def _stage_files(tmp_path, gsm8k):
    """A queries.jsonl with odd but valid formatting: two benchmark hits among clean rows."""
    lines = [
        '{"id": "k1",   "query": "Write a haiku about the sea at dawn.", "meta": {"x": "é ✓"}}\n',
        json.dumps({"id": "d1", "query": gsm8k[3].query, "source": "gsm8k"}) + "\n",
        "\n",
        json.dumps({"id": "k2", "query": "Ｗhat is 9*2?", "kind": "numeric", "reference": "18"},
                   ensure_ascii=False) + "\n",
        json.dumps({"id": "d2", "query": gsm8k[7].query.rsplit(" ", 1)[0] + " 12345?"}) + "\n",
        '{"id":"k3","query":"Name a prime number larger than 100."}',  # no newline at the end
    ]
    src = tmp_path / "queries.jsonl"
    src.write_bytes("".join(lines).encode("utf-8"))
    return src, lines


def test_run_writes_kept_rows_byte_identical_dropped_rows_and_stats(tmp_path, packaged, gsm8k):
    cfg, indexes = packaged
    src, lines = _stage_files(tmp_path, gsm8k)
    kept, dropped = tmp_path / "kept.jsonl", tmp_path / "contaminated.jsonl"
    stats = dc.run(cfg, src, kept, dropped, indexes)
    assert kept.read_bytes() == (lines[0] + lines[3] + lines[5] + "\n").encode("utf-8")
    rows = [json.loads(line) for line in dropped.read_text("utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["d1", "d2"]
    assert set(rows[0]) == {"id", "query", "benchmark", "item_id", "kind", "overlap", "ngrams_matched", "ngrams"}
    n = len(dc.words(gsm8k[3].query)) - 7
    assert rows[0] == {"id": "d1", "query": gsm8k[3].query, "benchmark": "gsm8k", "item_id": "gsm8k-3",
                       "kind": "exact", "overlap": 1.0, "ngrams_matched": n, "ngrams": n}
    assert rows[1]["kind"] == "ngram" and rows[1]["item_id"] == "gsm8k-7" and 0.5 <= rows[1]["overlap"] < 1
    assert 0 < rows[1]["ngrams_matched"] < rows[1]["ngrams"]
    assert stats["queries_in"] == 5 and stats["kept"] == 3 and stats["dropped"] == 2
    assert stats["dropped_by_benchmark"] == {"gsm8k": 2, "aime2025": 0, "humaneval": 0, "fanoutqa": 0}
    assert stats["dropped_by_kind"] == {"exact": 1, "ngram": 1}
    assert stats["benchmarks"]["gsm8k"]["items"] == 1319 and stats["ngram"] == 8 and stats["threshold"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contaminated.jsonl", "kept.jsonl", "queries.jsonl"]


def test_run_on_a_broken_row_names_the_line_and_leaves_earlier_outputs_alone(tmp_path, packaged):
    cfg, indexes = packaged
    src, kept, dropped = tmp_path / "queries.jsonl", tmp_path / "kept.jsonl", tmp_path / "contaminated.jsonl"
    kept.write_text("before\n")
    src.write_text('{"id": "a", "query": "fine"}\n{"id": "b", "quer": "typo"}\n')
    with pytest.raises(InputError, match=r"queries.jsonl:2 field 'query'"):
        dc.run(cfg, src, kept, dropped, indexes)
    assert kept.read_text() == "before\n" and not dropped.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "queries.jsonl"]


def test_empty_lists_mean_off_and_every_query_is_kept(tmp_path, gsm8k):
    off = dc.DecontaminateConfig(benchmarks=[])
    assert not off.active and dc.DecontaminateConfig().active
    src = tmp_path / "queries.jsonl"
    src.write_text(json.dumps({"id": "a", "query": gsm8k[0].query}) + "\n")
    stats = dc.run(off, src, tmp_path / "kept.jsonl", tmp_path / "contaminated.jsonl")
    assert stats["kept"] == 1 and stats["dropped"] == 0 and stats["benchmarks"] == {}
    assert (tmp_path / "kept.jsonl").read_bytes() == src.read_bytes()
    assert (tmp_path / "contaminated.jsonl").read_text() == ""


def test_config_is_strict_and_names_are_distinct(tmp_path):
    with pytest.raises(ValidationError, match="extra"):
        dc.DecontaminateConfig(ngrams=8)
    with pytest.raises(ValidationError):
        dc.DecontaminateConfig(benchmarks=["gsm8k-calc"])  # a source, not a benchmark name
    with pytest.raises(ValidationError, match="listed twice"):
        dc.DecontaminateConfig(benchmarks=["gsm8k", "gsm8k"])
    with pytest.raises(ValidationError, match="is taken"):
        dc.DecontaminateConfig(files=[{"path": "x/gsm8k.jsonl"}])
    with pytest.raises(ValidationError, match="is taken"):
        dc.DecontaminateConfig(benchmarks=[], files=[{"path": "a/e.jsonl"}, {"path": "b/e.csv"}])
    with pytest.raises(ValidationError):
        dc.DecontaminateConfig(threshold=1.5)
    with pytest.raises(ValidationError, match="extra"):
        dc.FileBenchmark(path="e.jsonl", field={"query": "q"})
    for model in (dc.DecontaminateConfig, dc.FileBenchmark):
        assert all(f.description for f in model.model_fields.values()), model
    other_n = dc.DecontaminateConfig(benchmarks=["aime2025"], ngram=5)
    with pytest.raises(ValueError, match="ngram=8"):
        list(dc.find_overlaps([q("x")], dc.build_indexes(other_n), dc.DecontaminateConfig()))


def _quickstart():
    for rel in ("katdata/recipes/quickstart.yaml", "recipes/quickstart.yaml"):
        if (ROOT / rel).is_file():
            return yaml.safe_load((ROOT / rel).read_text("utf-8"))
    pytest.fail("no quickstart recipe found")


def test_the_quickstart_trains_on_gsm8k_test_so_decontaminating_against_gsm8k_would_drop_them_all(packaged):
    """Why the quickstart must leave gsm8k (and fanoutqa) out of a decontaminate list: its queries are theirs."""
    cfg, indexes = packaged
    recipe = _quickstart()
    specs = {s["name"]: s for s in recipe["data"]["sources"]}
    assert "gsm8k" in specs
    loaded = {name: sources.load(name, s.get("limit"), seed=recipe.get("seed", 0),
                                 max_solution_lines=s.get("max_solution_lines")) for name, s in specs.items()}
    found = {qq.id: m for qq, m in dc.find_overlaps([x for qs in loaded.values() for x in qs], indexes, cfg)}
    for x in loaded["gsm8k"]:
        assert found[x.id].benchmark == "gsm8k" and found[x.id].kind == "exact" and found[x.id].item_id == x.id
    for x in loaded.get("fanoutqa-hop", []):
        assert found[x.id].benchmark == "fanoutqa"
    for x in loaded.get("gsm8k-calc", []):  # derived sums ("What is 9*2?"): not benchmark items, kept
        assert x.id not in found
    assert dc.derived_sources(cfg, specs) == [s for s in specs if s in ("gsm8k-calc", "gsm8k-calc2")]


def test_importing_the_module_loads_no_heavy_package():
    code = ("import sys, katdata.decontaminate; heavy = [m for m in ('torch', 'transformers', 'datasets', 'vllm') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
