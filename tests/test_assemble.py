"""Assembly: byte-exact records from votes, judges, samples and solver traces; rejects with reasons."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import yaml

from katdata import assemble_rows, template
from katdata.assemble import AssembleConfig, run
from katdata.judge import JudgeRow
from katdata.provenance import RunInfo
from katdata.records import Attempt, KatRecord, Query, Vote
from katdata.runfiles import RowWriter, read_rows


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
    """assemble_rows: the fast lines are RowWriter's; a row with a float pydantic spells otherwise than repr takes the
    slow path, and only such a row (float-like text in strings, hex ids and hashes, does not); a torn tail is cut as
    RowWriter cuts it."""

    base = dict(id="x", query="q ä 😀 \u2028 \x00\x1f \"quoted\" \\ 1e5 0.00001", mode="off", judge="j\nk\t",
                answer="16", response="r")
    floats = [0.1, 1e-05, 1.5e-07, 0.0001, 1e16, 1e15, 123456789012345678.0, -0.0, 5e-324, 1.7976931348623157e308,
              float("nan"), float("inf"), 2.5, 3]
    otherwise = {1e-05, 1.5e-07}  # pydantic-core writes 0.00001 and 1.5e-7, repr 1e-05 and 1.5e-07
    hexes = {"id": "q-6baa9455e3e70682", "note": "1e5 0.0000 1234567890123456 2E9"}  # strings that look like floats
    rows = [KatRecord(**base, tags={"p_reasoning": f, "difficulty": 3, "domain": "math", **hexes},
                      vote={"p_on": f, "classes_on": {"16": 3, "k": f}, "margin": [f, 1.0]},
                      provenance={"source": "gsm8k", "models": {"solver": "m"}, "x": f,
                                  "prompts": {"judge.txt": "52dd0f030891"}})
            for f in floats]
    rows.append(Query(id="q", query="q", reference="16", kind="numeric", meta={"f": 1e-7, "h": "9e3"}))
    rows.append(Query(id="q1e5", query="q", reference="0.00001", meta={"f": 0.5, "h": "9e3"}))
    rows.append({"id": "d", "stage": "vote", "reason": "r", "raw": {"p": 1e-05, "n": float("nan")}})
    slow, reference = [], assemble_rows.slow_line
    monkeypatch.setattr(assemble_rows, "slow_line", lambda row: slow.append(row) or reference(row))
    for row in rows:
        assert assemble_rows.line(row) == reference(row)
    # the rows with 1e-05 and 1.5e-07, the Query with 1e-7, and the dict (no model) went the slow way
    assert len(slow) == len(otherwise) + 2
    assert [r.tags["p_reasoning"] for r in slow[:2]] == [1e-05, 1.5e-07] and slow[2].id == "q" and slow[3]["id"] == "d"
    with RowWriter(tmp_path / "a.jsonl") as w:
        w.write_all(rows)
    (tmp_path / "b.jsonl").write_bytes(b'{"id": "torn"')  # a crash mid-write, cut when the writer opens the file
    with assemble_rows.RecordWriter(tmp_path / "b.jsonl", every=3) as w:
        for row in rows:
            w.write(row)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    slow.clear()  # in a batch: no row the slow way where no float is spelled otherwise (hex ids, float-like strings)
    plain = [r for r in rows[:-1] if not (r.id == "q" or r.id == "x" and r.tags["p_reasoning"] in otherwise)]
    with assemble_rows.RecordWriter(tmp_path / "c.jsonl", every=len(rows) + 1) as w:
        for row in plain * 3:
            w.write(row)
    assert slow == [] and (tmp_path / "c.jsonl").read_bytes() == b"".join(reference(r) + b"\n" for r in plain * 3)
    with assemble_rows.RecordWriter(tmp_path / "d.jsonl", every=len(rows) + 1) as w:  # and every row that holds one
        for row in rows[:-1] * 3:
            w.write(row)
    assert {r.tags["p_reasoning"] for r in slow if r.id == "x"} >= otherwise and [r.id for r in slow].count("q") == 3
    assert (tmp_path / "d.jsonl").read_bytes() == b"".join(reference(r) + b"\n" for r in rows[:-1] * 3)


def test_record_writer_spells_floats_of_every_magnitude_as_row_writer(tmp_path):
    """Seeded floats from 1e-30 to 1e30 (pydantic-core spells those from 1e-5 to 1e-9 otherwise than repr) beside
    hex ids: the batch writer's file is RowWriter's, byte for byte."""
    rng = random.Random(7)
    rows = [KatRecord(id=f"q-{rng.getrandbits(64):016x}", query="q", mode="on", judge="j", answer="a", response="r",
                      tags={"id": f"q-{rng.getrandbits(64):016x}", "p": rng.uniform(-10, 10) * 10.0 ** rng.randint(-30, 30)},
                      vote={"p_on": round(rng.random(), 2), "x": [rng.random() * 10.0 ** rng.randint(-12, 3)]})
            for _ in range(3000)]
    with RowWriter(tmp_path / "a.jsonl") as w:
        w.write_all(rows)
    with assemble_rows.RecordWriter(tmp_path / "b.jsonl", every=500) as w:
        for row in rows:
            w.write(row)
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_stage_bench_runs_small_side_by_side(tmp_path):
    """bench/assemble_stage.py builds a run folder, runs the stage of this checkout and of a baseline checkout (here
    the same one) in fresh processes, prints both rates and their ratio, and finds the outputs byte-identical; a
    baseline folder without katdata is refused in one line."""
    root = Path(__file__).resolve().parents[1]
    bench = [sys.executable, str(root / "bench" / "assemble_stage.py")]
    out = subprocess.run([*bench, "--counts", "400", "--repeats", "1", "--baseline", str(root), "--dir",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rates = re.findall(r"^assemble stage \((this|baseline)\) n= +400 .* ([\d,]+) records/s  \(([\d,]+) records\)",
                       out.stdout, re.M)
    assert [r[0] for r in rates] == ["this", "baseline"] and 300 < int(rates[0][2].replace(",", "")) < 400, out.stdout
    assert re.search(r"this vs baseline: x[\d.]+ records/s, .* byte-identical$", out.stdout, re.M), out.stdout
    assert list((tmp_path / "work").iterdir()) == []
    bad = subprocess.run([*bench, "--baseline", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no katdata checkout there" in bad.stderr.strip().splitlines()[-1]


def test_the_quick_scan_finds_every_float_pydantic_spells_otherwise():
    """assemble_rows.risky's patterns hold for pydantic-core's float spelling: over every decimal exponent, both signs,
    mantissas of 1 to 17 digits and random bit patterns, a float spelled otherwise than repr is always found (and
    there are such floats: 1e-05 and 1.5e-07 among them)."""
    import math

    import pydantic_core

    rng = random.Random(3)
    floats = [float(f"{m}e{e}") for e in range(-323, 309) for m in ("1", "1.5", "9.999999999999999", "2.25")]
    floats += [float(f"{rng.uniform(1, 10):.{rng.randint(0, 16)}f}e{rng.randint(-323, 308)}") for _ in range(30_000)]
    floats += [rng.uniform(-1, 1) * 2.0 ** rng.randint(-1074, 1023) for _ in range(30_000)]
    otherwise = [x for x in floats + [-x for x in floats] if not math.isinf(x)
                 and pydantic_core.to_json(x).decode() != repr(x)]
    assert {1e-05, 1.5e-07} <= set(otherwise) and len(otherwise) > 100
    assert [x for x in otherwise if not assemble_rows.risky(pydantic_core.to_json(x))] == []
