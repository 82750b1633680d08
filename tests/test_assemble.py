"""Assembly: byte-exact records from votes, judges, samples and solver traces; rejects with reasons."""

from katdata import template
from katdata.assemble import AssembleConfig, run
from katdata.judge import JudgeRow
from katdata.records import Attempt, KatRecord, Query, Vote
from katdata.runfiles import RowWriter, read_rows
from katdata.provenance import RunInfo

import json

import yaml


def _write(path, rows):
    with RowWriter(path) as w:
        w.write_all(rows)


def _setup(tmp_path):
    qs = [Query(id=i, query=f"question {i}?", reference="16", kind="numeric") for i in ("off", "on", "drop", "nojudge", "bad")]
    _write(tmp_path / "queries.jsonl", qs)
    samples = [
        Attempt(id="off", index=0, mode="off", text="", answer="The answer is 16.", correct=True, answer_class="16"),
        Attempt(id="on", index=1, mode="on", text="", think="8 + 8 = 16", answer="16", correct=True, answer_class="16"),
        Attempt(id="bad", index=0, mode="off", text="", answer="16 </answer> <think>", correct=True, answer_class="16"),
    ]
    _write(tmp_path / "samples.jsonl", samples)
    _write(tmp_path / "solve.jsonl", [
        Attempt(id="on", index=0, source="solver", mode="on", text="", think="solver: 8 doubled is 16", answer="16", score=9),
        Attempt(id="on", index=1, source="solver", mode="on", text="", think="rejected", answer="15", reason="critic: 3")])
    votes = [Vote(id="off", label="off", reason="r", chosen_index=0, chosen_source="vote"),
             Vote(id="on", label="on", reason="r", chosen_index=1, chosen_source="vote"),
             Vote(id="drop", label=None, reason="no correct sample (reference); dropped"),
             Vote(id="nojudge", label="off", reason="r", chosen_index=0),
             Vote(id="bad", label="off", reason="r", chosen_index=0)]
    _write(tmp_path / "votes.jsonl", votes)
    _write(tmp_path / "judges.jsonl", [
        JudgeRow(id=i, mode=m, rationale=f"The request {i} is simple.", ok=True) for i, m in (("off", "off"), ("on", "on"), ("bad", "off"))
    ] + [JudgeRow(id="nojudge", mode="off", ok=False, reason="rationale rejected after 2 tries: empty rationale")])


def test_records_are_byte_exact_and_rejects_have_reasons(tmp_path):
    _setup(tmp_path)
    stats = run(AssembleConfig(think_source="solver_then_vote", accept_imbalance=True), tmp_path)
    recs = {r.id: r for r in read_rows(tmp_path / "records.jsonl", KatRecord)}
    assert set(recs) == {"off", "on"} and stats["rows_out"] == 2
    # think-off lost 2 of its 3 labels (judge, render): accepted here, and said so in the stats
    assert "think-off" in stats["imbalance_accepted"] and stats["records_by_mode"] == {"on": 1, "off": 1}
    off = recs["off"]
    assert off.response == "<judge>\nThe request off is simple.\n</judge>\n\n<think_off>\n<answer>\nThe answer is 16.\n</answer>"
    assert recs["on"].think == "solver: 8 doubled is 16" and recs["on"].content_source == "solver"
    assert recs["off"].content_source == "sample" and {r.label_source for r in recs.values()} == {"vote"}
    for r in recs.values():
        p = template.parse(r.response)
        assert p.ok and (p.mode, p.judge, p.answer, p.think) == (r.mode, r.judge, r.answer, r.think)
    rejects = {r["id"]: r for r in map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())}
    assert rejects["drop"]["stage"] == "vote" and "dropped" in rejects["drop"]["reason"]
    assert rejects["nojudge"]["stage"] == "judge" and "empty rationale" in rejects["nojudge"]["reason"]
    assert rejects["bad"]["stage"] == "assemble" and "marker" in rejects["bad"]["reason"]
    # rerun: nothing duplicated
    run(AssembleConfig(accept_imbalance=True), tmp_path)
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 3


def test_think_from_vote_samples_when_configured(tmp_path):
    _setup(tmp_path)
    run(AssembleConfig(think_source="vote", accept_imbalance=True), tmp_path)
    recs = {r.id: r for r in read_rows(tmp_path / "records.jsonl", KatRecord)}
    assert recs["on"].think == "8 + 8 = 16" and recs["on"].content_source == "sample"
    assert recs["on"].provenance["agents"] == ["sampler"]


def test_reference_fallback_uses_the_worked_solution_as_teacher():
    from katdata import sources
    from katdata.assemble import content

    q = sources.load("gsm8k")[0]  # real GSM8K: a worked solution with <<calc>> notes, ending "#### 18"
    vote_on = Vote(id=q.id, label="on", reason="no correct sample; tagger prior")
    cfg = AssembleConfig(reference_fallback=True)
    pick, src = content(vote_on, [], [], cfg, q)
    assert src == "reference" and pick.answer == "18"
    assert "<<" not in pick.think and "####" not in pick.think and "eggs" in pick.think
    pick, src = content(Vote(id=q.id, label="off", reason="prior"), [], [], cfg, q)
    assert src == "reference" and pick.answer == "18" and pick.think is None
    # without the option, no verified sample means no record
    assert content(vote_on, [], [], AssembleConfig(), q)[0] is None
    # open queries have no checkable reference to teach with
    open_q = Query(id="o", query="Why?", reference='{"a": 1}', kind="open")
    assert content(Vote(id="o", label="off", reason="prior"), [], [], cfg, open_q)[0] is None


# ---------------------------------------------------------------- provenance and mode collapse

def test_solver_content_names_the_agent_roles_and_their_models(tmp_path):
    from katdata.records import Segment

    _setup(tmp_path)
    (tmp_path / "solve.jsonl").unlink()
    _write(tmp_path / "solve.jsonl", [
        Attempt(id="on", index=0, source="solver", mode="on", text="", think="8 doubled is 16", answer="16", score=9,
                segments=[Segment(role=r, model="embedded", text="t") for r in ("solver", "thinker", "critic")])])
    (tmp_path / "recipe.yaml").write_text("engines:\n  default: {backend: transformers}\n  big: {backend: openai, "
                                          "model: Qwen/Qwen3-32B}\nsolve: {thinker_engine: big}\n", "utf-8")
    run(AssembleConfig(accept_imbalance=True), tmp_path, info=RunInfo(yaml.safe_load((tmp_path / "recipe.yaml").read_text())))
    on = {r.id: r for r in read_rows(tmp_path / "records.jsonl", KatRecord)}["on"]
    assert on.content_source == "solver" and on.provenance["agents"] == ["solver", "thinker", "critic"]
    assert on.provenance["models"]["thinker"] == "Qwen/Qwen3-32B"  # a server's model id, as served
    assert on.provenance["engines"]["thinker"] == "big (openai)"
    assert {"solver.txt", "thinker.txt", "critic.txt", "judge_rationale.txt", "rationale_check.txt"} <= set(on.provenance["prompts"])


def test_model_fingerprint_follows_config_and_weight_files(tmp_path):
    from katdata.provenance import folder_fingerprint, model_identity

    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = folder_fingerprint(tmp_path)
    assert len(first) == 12 and model_identity(str(tmp_path)) == f"{tmp_path.name}@{first}"
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert folder_fingerprint(tmp_path) != first
    (tmp_path / "config.json").unlink()
    assert folder_fingerprint(tmp_path) is None


def test_record_writer_writes_row_writers_bytes(tmp_path, monkeypatch):
    """assemble_rows: the fast lines are RowWriter's, floats pydantic spells otherwise included (they take the
    slow path), and a torn tail is cut as RowWriter cuts it."""
    from katdata import assemble_rows

    base = dict(id="x", query="q ä 😀 \u2028 \x00\x1f \"quoted\" \\ 1e5 0.00001", mode="off", judge="j\nk\t",
                answer="16", response="r")
    floats = [0.1, 1e-05, 0.0001, 1e16, 1e15, 123456789012345678.0, -0.0, 5e-324, 1.7976931348623157e308,
              float("nan"), float("inf"), 2.5, 3]
    rows = [KatRecord(**base, tags={"p_reasoning": f, "difficulty": 3, "domain": "math"},
                      vote={"p_on": f, "classes_on": {"16": 3, "k": f}, "margin": [f, 1.0]},
                      provenance={"source": "gsm8k", "models": {"solver": "m"}, "x": f})
            for f in floats]
    rows.append(Query(id="q", query="q", reference="16", kind="numeric", meta={"f": 1e-7}))
    rows.append({"id": "d", "stage": "vote", "reason": "r", "raw": {"p": 1e-05, "n": float("nan")}})
    slow = []
    monkeypatch.setattr(assemble_rows, "slow_line", lambda row, _f=assemble_rows.slow_line: slow.append(row) or _f(row))
    for row in rows:
        assert assemble_rows.line(row) == assemble_rows.slow_line(row)
    assert len(slow) == 2 * len(rows) - 6  # 0.1, -0.0, nan, inf (null), 2.5 and 3 went the fast way
    with RowWriter(tmp_path / "a.jsonl") as w:
        w.write_all(rows)
    (tmp_path / "b.jsonl").write_bytes(b'{"id": "torn"')  # a crash mid-write, cut when the writer opens the file
    with assemble_rows.RecordWriter(tmp_path / "b.jsonl", every=3) as w:
        for row in rows:
            w.write(row)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    slow.clear()  # a batch takes the slow path for exactly the rows `line` does: float-like text before tags does not
    with assemble_rows.RecordWriter(tmp_path / "c.jsonl", every=len(rows) + 1) as w:
        for row in rows[:-2] * 3:
            w.write(row)
    assert len(slow) == 3 * (len(rows) - 2 - 6) and all(r.tags["p_reasoning"] not in (0.1, 2.5, 3) for r in slow)
    assert (tmp_path / "c.jsonl").read_bytes() == b"".join(assemble_rows.slow_line(r) + b"\n" for r in rows[:-2] * 3)
