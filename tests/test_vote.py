"""Two-mode vote: exact cases of the pure logic."""

from katdata.records import Attempt, Tags, Vote
from katdata.runfiles import read_rows
from katdata.verify import INVALID
from katdata.vote import (VoteConfig, consensus, decide, entropy, explore_mode, rate_bounds, run, settled,
                          shortest_correct, verdicts, vote)

NOEXP = VoteConfig(explore_share=0.0, n=4)


def att(mode, i, cls, correct=None, tokens=10, answer="x"):
    return Attempt(id="q", index=i, mode=mode, text="t" * tokens, answer=None if cls is None else answer,
                   answer_class=INVALID if cls is None else cls, correct=correct, completion_tokens=tokens)


def rows(on, off):
    """on/off: lists of (class, correct)."""
    return [att("on", i, c, k) for i, (c, k) in enumerate(on)] + [att("off", i, c, k) for i, (c, k) in enumerate(off)]


def test_tie_goes_to_think_off():
    v = vote("q", rows([("16", True), ("3", False)], [("16", True), ("4", False)]), NOEXP)
    assert v.label == "off" and v.p_on == v.p_off == 0.5


def test_delta_decides():
    r = rows([("16", True)] * 4, [("16", True)] * 3 + [("2", False)])  # p_on 1.0, p_off 0.75
    assert vote("q", r, NOEXP.model_copy(update={"delta": 0.1})).label == "on"
    assert vote("q", r, NOEXP.model_copy(update={"delta": 0.25})).label == "off"
    assert decide(0.75, 0.5, 0.25) == "off" and decide(0.8, 0.5, 0.25) == "on"


def test_none_correct_policies():
    r = rows([("3", False), (None, False)], [("4", False), ("5", False)])
    tags = Tags(id="q", domain="math", task_type="x", difficulty=3, needs_reasoning=True, p_reasoning=0.9,
                verifiability="reference", language="en")
    dropped = vote("q", r, NOEXP)
    assert dropped.label is None and "dropped" in dropped.reason
    assert vote("q", r, NOEXP.model_copy(update={"none_correct": "prior"}), tags).label == "on"
    assert vote("q", r, NOEXP.model_copy(update={"none_correct": "prior"})).label is None  # no prior to use
    rev = vote("q", r, NOEXP.model_copy(update={"none_correct": "review"}), tags)
    assert rev.review and rev.label == "on"


def test_invalid_class_never_wins_consensus():
    r = [att("on", i, None) for i in range(5)] + [att("off", 0, "7"), att("off", 1, "8"), att("off", 2, "7")]
    assert consensus(r) == "7"
    ok, pseudo = verdicts(r)
    assert pseudo == "7" and ok == [False] * 5 + [True, False, True]
    v = vote("q", r, NOEXP)
    assert v.label == "off" and v.classes_on == {INVALID: 5} and "consensus '7'" in v.reason
    assert consensus([att("on", 0, None)]) is None


def test_016_and_16_are_one_class_when_classes_come_from_the_verifier():
    from katdata.verify import Verifier, assign_class

    v, seen = Verifier(), []
    classes = [assign_class("numeric", v.key("numeric", a), seen, v) for a in ["016", "16", "The answer is 16.", "17"]]
    assert classes == ["16", "16", "16", "17"]
    r = [att("off", i, c) for i, c in enumerate(classes)]
    assert consensus(r) == "16"


def test_shortest_correct_kept():
    r = [att("off", 0, "16", True, tokens=30), att("off", 1, "16", True, tokens=12),
         att("off", 2, "9", False, tokens=5), att("off", 3, "16", True, tokens=12)]
    assert shortest_correct(r, [a.correct for a in r]).index == 1
    v = vote("q", r + [att("on", 0, "16", True, tokens=3)], NOEXP.model_copy(update={"delta": 0.25}))
    assert v.label == "off" and v.chosen_index == 1 and v.chosen_source == "vote"


def test_evidence_is_stored():
    r = rows([("16", True), ("16", True), ("3", False), (None, False)], [("16", True), ("5", False)])
    v = vote("q", r, NOEXP)
    assert (v.n_on, v.n_off, v.p_on, v.p_off) == (4, 2, 0.5, 0.5)
    assert v.classes_on == {"16": 2, "3": 1, INVALID: 1} and v.classes_off == {"16": 1, "5": 1}
    assert abs(v.entropy_on - 1.5) < 1e-9 and abs(v.entropy_off - 1.0) < 1e-9
    assert v.margin == 0.0 and v.tokens_on == 10 and v.samples_used == 6 and v.samples_saved == 2
    assert entropy({"a": 4}) == 0.0


def test_exploration_is_seeded_and_about_the_share():
    ids = [f"q{i}" for i in range(4000)]
    picks = [explore_mode(i, 0.01, seed=0) for i in ids]
    assert picks == [explore_mode(i, 0.01, seed=0) for i in ids]  # same seed, same draw
    n = sum(p is not None for p in picks)
    assert 20 <= n <= 65  # 1% of 4000 = 40
    assert {p for p in picks if p} == {"on", "off"}
    assert picks != [explore_mode(i, 0.01, seed=1) for i in ids]
    qid = next(i for i, p in zip(ids, picks) if p is not None)
    r = [Attempt(**{**a.model_dump(), "id": qid}) for a in rows([("1", True)], [("1", True)])]
    v = vote(qid, r, VoteConfig(explore_share=0.01, seed=0))
    assert v.explored and v.label == explore_mode(qid, 0.01, 0) and "exploration" in v.reason


def test_early_stop_worst_case_and_confidence():
    # 4/4 think-off correct, 0/4 think-on, N=8: even the worst case keeps think-off
    assert settled(0, 4, 4, 4, 8, 0.1, 1.0)
    # 1/2 vs 1/2 at N=8: the rest could change it
    assert not settled(1, 2, 1, 2, 8, 0.1, 1.0)
    # think-on clearly ahead: 2/2 vs 0/2 is not settled in the worst case, but is at lower confidence
    assert not settled(2, 2, 0, 2, 8, 0.0, 1.0)
    assert settled(4, 4, 0, 4, 8, 0.0, 0.9)
    # no correct sample yet never settles before N
    assert not settled(0, 4, 0, 4, 8, 0.1, 0.5) and settled(0, 8, 0, 8, 8, 0.1, 0.5)
    lo, hi = rate_bounds(2, 2, 0.95)
    assert 0 < lo < 1 and hi == 1.0 and rate_bounds(2, 2, 1.0) == (0.0, 1.0)


def test_stage_writes_votes_and_resumes(tmp_path):
    from katdata.runfiles import RowWriter, read_rows

    with RowWriter(tmp_path / "samples.jsonl") as w:
        for qid in ("a", "b"):
            for a in rows([("1", True)], [("2", False)]):
                w.write(Attempt(**{**a.model_dump(), "id": qid}))
    stats = run(NOEXP, tmp_path)
    assert stats["rows_out"] == 2 and stats["label_on"] == 2
    assert run(NOEXP, tmp_path)["skipped"] == 2
    assert [v.id for v in read_rows(tmp_path / "votes.jsonl", Vote)] == ["a", "b"]


def test_real_end_to_end_vote_on_the_embedded_model(tmp_path, hf_backend):
    """GSM8K and fanoutqa-hop queries through sample -> vote -> judge -> assemble on SmolLM2."""
    import json

    from katdata import assemble, judge, sample, sources
    from katdata import template
    from katdata.judge import JudgeRow
    from katdata.records import KatRecord, Query
    from katdata.runfiles import RowWriter, read_rows

    qs = sources.load("gsm8k", limit=2, seed=1) + sources.load("fanoutqa-hop", limit=2, seed=1)
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(qs)
    engine = lambda name: hf_backend  # noqa: E731  (the session's transformers backend)
    s = sample.run(sample.SampleConfig(n=2, rounds=[], max_tokens_on=48, max_tokens_off=24), tmp_path, engine)
    v = run(VoteConfig(n=2, explore_share=0.0), tmp_path)
    judge.run(judge.JudgeConfig(max_tokens=48, retries=1), tmp_path, engine)
    assemble.run(assemble.AssembleConfig(think_source="vote"), tmp_path)
    samples = list(read_rows(tmp_path / "samples.jsonl", Attempt))
    assert s["samples_used"] == len(samples) == 4 * 2 * 2
    for a in samples:  # every sample was forced into its mode and parsed; no answer means a reason
        assert a.response.startswith(sample.mode_prefix(a.mode, "x")[:8])
        assert template.FORCE_PREFIX[a.mode] in a.response
        assert (a.answer is None) == (a.reason is not None) and a.answer_class is not None
        assert a.correct is not None  # every query here has a reference
    votes = {x.id: x for x in read_rows(tmp_path / "votes.jsonl", Vote)}
    assert set(votes) == {q.id for q in qs} and v["rows_out"] == 4
    for qid, x in votes.items():
        mine = [a for a in samples if a.id == qid]
        assert x.n_on == x.n_off == 2
        assert sum(x.classes_on.values()) == 2 and sum(x.classes_off.values()) == 2
        assert x.p_on == sum(bool(a.correct) for a in mine if a.mode == "on") / 2
        assert x.p_off == sum(bool(a.correct) for a in mine if a.mode == "off") / 2
    judges = {j.id: j for j in read_rows(tmp_path / "judges.jsonl", JudgeRow)}
    assert set(judges) == {i for i, x in votes.items() if x.label}
    records = list(read_rows(tmp_path / "records.jsonl", KatRecord)) if (tmp_path / "records.jsonl").is_file() else []
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert {r.id for r in records} | {r["id"] for r in rejects} == {q.id for q in qs}  # nothing lost
    assert all(r["reason"] for r in rejects)
    for r in records:
        p = template.parse(r.response)
        assert p.ok and p.mode == r.mode == votes[r.id].label


def test_label_source_says_who_chose_the_label():
    tags = Tags(id="q", domain="math", task_type="x", difficulty=3, needs_reasoning=True, p_reasoning=0.9,
                verifiability="reference", language="en")
    voted = vote("q", rows([("16", True), ("3", False)], [("16", True), ("4", False)]), NOEXP)
    assert (voted.label, voted.label_source) == ("off", "vote")
    wrong = rows([("3", False)], [("4", False)])
    prior = vote("q", wrong, NOEXP.model_copy(update={"none_correct": "prior"}), tags)
    assert (prior.label, prior.label_source) == ("on", "prior")
    review = vote("q", wrong, NOEXP.model_copy(update={"none_correct": "review"}), tags)
    assert (review.label, review.label_source, review.review) == ("on", "prior", True)
    dropped = vote("q", wrong, NOEXP)
    assert (dropped.label, dropped.label_source) == (None, None)
    explored = vote("q", rows([("16", True)], [("16", True)]), NOEXP.model_copy(update={"explore_share": 1.0}))
    assert explored.explored and explored.label_source == "exploration"


def test_vote_stage_counts_label_sources(tmp_path):
    from katdata.runfiles import RowWriter

    tags = [Tags(id=q, domain="math", task_type="x", difficulty=3, needs_reasoning=q == "hard", p_reasoning=0.5 * (q == "hard"),
                 verifiability="reference", language="en") for q in ("hard", "easy", "known")]
    samples = [a.model_copy(update={"id": q}) for q, on, off in (
        ("hard", [("3", False)], [("4", False)]), ("easy", [("5", False)], [("6", False)]),
        ("known", [("16", True)], [("16", True)])) for a in rows(on, off)]
    with RowWriter(tmp_path / "samples.jsonl") as w:
        w.write_all(samples)
    with RowWriter(tmp_path / "tags.jsonl") as w:
        w.write_all(tags)
    stats = run(NOEXP.model_copy(update={"none_correct": "prior"}), tmp_path)
    assert (stats["label_source_prior"], stats["label_source_vote"]) == (2, 1)
    assert [v.label_source for v in read_rows(tmp_path / "votes.jsonl", Vote)] == ["prior", "prior", "vote"]
