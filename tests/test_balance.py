"""No silent mode collapse: label shares against assembled and exported shares, on real-shaped run folders.

The run folders are what a weak model leaves behind (real GSM8K and FanOutQA queries, the real rule
prior, the real vote and assemble stages); the pipeline test runs assemble -> export for real.
"""

import hashlib
import json
from importlib import resources

import pytest
import yaml

from katdata.assemble import AssembleConfig, run
from katdata.balance import counts
from katdata.errors import InputError, KatdataError
from katdata.judge import JudgeRow
from katdata.records import Attempt, KatRecord
from katdata.runfiles import RowWriter, read_rows


def _write(path, rows):
    with RowWriter(path) as w:
        w.write_all(rows)


def _weak_model_run(run_dir, n=4):
    """A run folder as a weak model leaves it: real GSM8K and FanOutQA queries, tags from the real rule
    prior, votes from the real vote over samples where no GSM8K sample is right (so the tagger prior
    labels them think-on) and the FanOutQA think-off samples give the reference answer; rationales
    from the tags writer; recipe.yaml of the quickstart's engines."""
    from katdata import sources
    from katdata.judge import tags_rationale
    from katdata.recipe import Recipe, dump_recipe
    from katdata.tag import TagConfig, combine, rule_tags
    from katdata.vote import VoteConfig, vote

    math, facts = sources.load("gsm8k", n, seed=1), sources.load("fanoutqa-hop", n, seed=1)
    facts = [q for q in facts if q.reference.strip()]
    queries = math + facts
    tcfg = TagConfig()
    tags = {q.id: combine(q, rule_tags(q, tcfg), None, None, tcfg) for q in queries}
    samples = []
    for q in queries:
        for i in range(2):
            right = q in facts
            samples += [Attempt(id=q.id, index=i, mode="on", text="", think="I think.", answer="7", correct=False,
                                answer_class="7", completion_tokens=40),
                        Attempt(id=q.id, index=i, mode="off", text="", answer=q.reference if right else "7",
                                correct=right, answer_class="ref" if right else "7", completion_tokens=9, ok=True)]
    vcfg = VoteConfig(n=2, none_correct="prior", explore_share=0.0)
    votes = [vote(q.id, [a for a in samples if a.id == q.id], vcfg, tags[q.id]) for q in queries]
    judges = [JudgeRow(id=v.id, mode=v.label, ok=True,
                       rationale=tags_rationale(tags[v.id].task_type, tags[v.id].domain, v.label)) for v in votes]
    for name, rows in (("queries", queries), ("tags", tags.values()), ("samples", samples), ("votes", votes),
                       ("judges", judges)):
        _write(run_dir / f"{name}.jsonl", rows)
    recipe = Recipe.model_validate({"engines": {"default": {"backend": "transformers", "model": "embedded"}},
                                    "judge": {"writer": "tags"}})
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), "utf-8")
    return math, facts, votes


def test_mode_collapse_stops_with_counts_reasons_and_remedies(tmp_path):
    math, facts, votes = _weak_model_run(tmp_path)
    labels = {v.id: (v.label, v.label_source) for v in votes}
    assert {labels[q.id] for q in math} == {("on", "prior")} and {labels[q.id] for q in facts} == {("off", "vote")}
    with pytest.raises(KatdataError) as err:
        run(AssembleConfig(), tmp_path)
    msg = str(err.value)
    assert f"the vote labelled {len(math)} queries think-on, assembly kept 0" in msg
    assert f"assemble: no think-on content (solver_then_vote) {len(math)}" in msg
    labels_from = msg[msg.index("labels from:"):].split(")")[0]
    assert f"{len(math)} tagger prior" in labels_from and f"{len(facts)} vote" in labels_from
    assert "solve.solver_engine" in msg and "`solution` column" in msg and "assemble.accept_imbalance=true" in msg
    assert not (tmp_path / "export").exists()
    # the same run, accepted: the stats say so, the records say who labelled them and where content came from
    stats = run(AssembleConfig(accept_imbalance=True), tmp_path)
    assert stats["labels"] == {"on": len(math), "off": len(facts)}
    assert stats["records_by_mode"] == {"on": 0, "off": len(facts)} and "think-on" in stats["imbalance_accepted"]
    recs = list(read_rows(tmp_path / "records.jsonl", KatRecord))
    assert {(r.mode, r.label_source, r.content_source) for r in recs} == {("off", "vote", "sample")}


def test_reference_fallback_keeps_the_mode_and_records_its_provenance(tmp_path):
    math, facts, _ = _weak_model_run(tmp_path)
    from katdata.provenance import RunInfo

    stats = run(AssembleConfig(reference_fallback=True), tmp_path, info=RunInfo(yaml.safe_load((tmp_path / "recipe.yaml").read_text())))  # as the pipeline
    assert stats["records_by_mode"] == {"on": len(math), "off": len(facts)} and "imbalance_accepted" not in stats
    assert stats["label_sources"] == {"prior": len(math), "vote": len(facts)}
    assert stats["content_sources"] == {"reference": len(math), "sample": len(facts)}
    recs = {r.id: r for r in read_rows(tmp_path / "records.jsonl", KatRecord)}
    on = recs[math[0].id]
    assert (on.label_source, on.content_source, on.provenance["agents"]) == ("prior", "reference", [])
    # a rule-prior label and a reference text: no model wrote this record, only the judge table's prompt shaped it
    tags_yaml = resources.files("katdata").joinpath("prompts", "judge_tags.yaml").read_bytes()
    assert on.provenance["prompts"] == {"judge_tags.yaml": hashlib.sha256(tags_yaml).hexdigest()[:12]}
    assert on.provenance["models"] == {}
    off = recs[facts[0].id]
    assert off.provenance["agents"] == ["sampler"] and off.provenance["engines"] == {"sampler": "default (transformers)"}
    assert off.provenance["models"]["sampler"].startswith("SmolLM2-135M-Instruct")
    assert set(off.provenance["prompts"]) == {"judge_neutral.txt", "judge_tags.yaml"}




def _recipe(**assemble):
    from katdata.recipe import Recipe

    return Recipe.model_validate({"name": "weak", "engines": {"default": {"backend": "transformers", "model": "embedded"}},
                                  "judge": {"writer": "tags"}, "assemble": assemble, "export": {"plot": False}})


def test_pipeline_stops_before_export_then_exports_when_the_imbalance_is_accepted(tmp_path):
    from katdata import pipeline

    math, facts, _ = _weak_model_run(tmp_path)
    with pytest.raises(KatdataError, match=f"labelled {len(math)} queries think-on, assembly kept 0"):
        pipeline.run(_recipe(), tmp_path, start="assemble")
    assert not (tmp_path / "export").exists()
    summary = tmp_path / "summary.json"  # the stage is not marked done: a rerun checks again
    assert not summary.is_file() or not json.loads(summary.read_text())["stages"].get("assemble", {}).get("done")

    data = pipeline.run(_recipe(accept_imbalance=True), tmp_path, start="assemble")
    assert data["stages"]["assemble"]["labels"] == {"on": len(math), "off": len(facts)}
    assert data["stages"]["export"]["on"] == 0
    card = (tmp_path / "export" / "README.md").read_text("utf-8")
    stats = card[card.index("## Counts"):]
    # the statistics open with who labelled, where the content came from, labels next to exported shares
    assert stats.index(f"Labels of the exported records: {len(facts)} vote.") < stats.index("Mode shares") \
        < stats.index("| split")
    assert f"Their content: {len(facts)} model sample." in stats
    vote_stage = stats[stats.index("All labels of the vote stage:"):].split("\n")[0]
    assert f"{len(math)} tagger prior" in vote_stage and f"{len(facts)} vote" in vote_stage
    assert f"think-on {len(math)} labelled (50%) -> 0 exported (0%)" in stats
    assert f"think-off {len(facts)} labelled (50%) -> {len(facts)} exported (100%)" in stats
    assert "**Imbalance accepted** (assemble.accept_imbalance: true): assemble: mode collapse" in stats


def test_a_mode_the_vote_kept_small_is_stopped_by_min_share_not_by_loss():
    from katdata.balance import problems

    c = {"labels": {"on": 1, "off": 19}, "records_by_mode": {"on": 1, "off": 19}, "lost": {}}
    found = problems(c, max_loss=0.5, min_share=0.1)
    assert list(found) == ["on"] and "think-on is 5% of the 20 records, under assemble.min_mode_share 0.1" in found["on"]
    assert "lost" not in found["on"]
    assert problems(c, max_loss=0.5, min_share=0.05) == {}
    # a mode the vote never chose is no collapse
    assert problems({"labels": {"on": 0, "off": 5}, "records_by_mode": {"on": 0, "off": 5}, "lost": {}}, 0.5, 0.1) == {}


COLLAPSE_RECIPE = """\
name: collapse
seed: 0
data:
  sources:
    - {name: aime2025, limit: 3}       # answers only: no worked solution to fall back on
    - {name: fanoutqa-hop, limit: 3}
engines:
  default: {backend: transformers, model: embedded, batch_size: 12}
tag: {use_llm: false}
solve: {rounds: 0, max_tokens: 32, critic_max_tokens: 8}
sample: {n: 2, rounds: [2], max_tokens_on: 32, max_tokens_off: 16, top_p: 1.0}
vote: {n: 2, none_correct: prior}
judge: {writer: tags}
assemble: {reference_fallback: true}
export: {plot: false}
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_run_with_the_embedded_model_stops_before_export(tmp_path):
    """AIME 2025 problems and FanOutQA facts through the embedded 135M model: the prior labels the AIME
    problems think-on, nothing can write their think-on content, so the run stops before export (exit 2)."""
    import os
    import subprocess
    import sys

    recipe, run_dir = tmp_path / "collapse.yaml", tmp_path / "run"
    recipe.write_text(COLLAPSE_RECIPE, "utf-8")
    cmd = [sys.executable, "-m", "katdata", "run", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "mode collapse" in proc.stderr and "queries think-on, assembly kept 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "export").exists()
    votes = [json.loads(line) for line in (run_dir / "votes.jsonl").read_text().splitlines()]
    aime = [v for v in votes if v["id"].startswith("aime")]
    assert all(v["label_source"] in ("prior", "vote", "exploration") for v in votes)
    assert any(v["label"] == "on" for v in aime)
    # accepting the imbalance lets it through, and the card says so
    assert "--from assemble --set assemble.accept_imbalance=true" in " ".join(proc.stderr.split())
    proc = subprocess.run(cmd + ["--from", "assemble", "--set", "assemble.accept_imbalance=true"], env=dict(os.environ),
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imbalance accepted" in " ".join(proc.stdout.split())
    assert "**Imbalance accepted**" in (run_dir / "export" / "README.md").read_text("utf-8")


def test_counts_read_only_their_fields_and_refuse_what_they_refused(tmp_path):
    """balance.counts reads the fields it counts (a record's long texts skipped) with the same counts as whole rows
    give, NaN included; a line that is not UTF-8, even inside a field it skips, is still one clear error."""
    votes = [{"id": f"q{i}", "label": m, "label_source": s, "reason": "r"} for i, (m, s) in
             enumerate([("on", "vote"), ("off", None), (None, None), ("off", "prior")])]
    (tmp_path / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
    records = [{"id": "q0", "mode": "on", "label_source": "vote", "response": "é" * 50, "provenance": {"x": 1}},
               {"id": "q3", "mode": "off", "content_source": None, "provenance": {"content_source": "solver"},
                "score": float("nan")}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "rejects.jsonl").write_text(json.dumps({"id": "q1", "stage": "judge", "reason": "too long: 9"}) + "\n")
    c = counts(tmp_path)
    assert c["labels"] == {"on": 1, "off": 2} and c["records_by_mode"] == {"on": 1, "off": 1}
    assert c["vote_label_sources"] == {"vote": 1, "-": 1, "prior": 1} and c["label_sources"] == {"vote": 1, "-": 1}
    assert c["content_sources"] == {"-": 1, "solver": 1} and c["lost"] == {"off": {"judge: too long": 1}}
    with open(tmp_path / "records.jsonl", "ab") as f:
        f.write(b'{"id": "q9", "mode": "on", "response": "\xff"}\n')
    with pytest.raises(InputError, match=r"records.jsonl:3: broken JSON"):
        counts(tmp_path)
