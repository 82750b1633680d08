"""Backend.stream and the streaming sample stage (pure logic: a scripted engine that answers one
request at a time from a rolling window, so the order of events is known)."""

from collections import Counter, deque
from types import SimpleNamespace

from katdata import template
from katdata.backends.base import WAIT, Job, Request, SamplingParams
from katdata.backends.scripted import ScriptedBackend
from katdata.cache import CachedBackend
from katdata.records import Attempt, Query
from katdata.runfiles import RowWriter, read_rows
from katdata.sample import SampleConfig, run, sample_queries
from katdata.verify import Verifier


class Window(ScriptedBackend):
    """A streaming engine: ``window`` requests in flight, the oldest answered first; ``log`` records
    ("send", query id, seed) and ("answer", query id, seed) in order."""

    def __init__(self, script, window=2):
        super().__init__(script=script)
        self.window, self.log = window, []

    def stream(self, source, wave_limit=0):
        it, flight, exhausted = iter(source), deque(), False
        while True:
            while not exhausted and len(flight) < self.window:
                item = next(it, StopIteration)
                if item is StopIteration:
                    exhausted = True
                elif item is WAIT:
                    break
                elif isinstance(item, tuple):
                    yield item
                else:
                    flight.append(item)
                    self.log.append(("send", who(item), item.params.seed))
            if not flight:
                return
            job = flight.popleft()
            self.log.append(("answer", who(job), job.params.seed))
            yield job, self.generate([job.request], job.params)[0]


def who(job):
    return job.request.messages[-1]["content"]


def wrong(req, i):
    """Never correct: every query runs to N."""
    return "1\n</answer>" if req.prefix.endswith(template.FORCE_PREFIX["off"]) else "x\n</think>\n<answer>\n1\n</answer>"


QUERIES = [Query(id=f"q{i}", query=f"q{i}", reference="2", kind="numeric") for i in range(3)]


def test_a_query_moves_to_its_next_round_while_others_are_out():
    backend = Window(wrong, window=2)
    cfg = SampleConfig(n=4, rounds=[2], seed=0)
    states = sample_queries(QUERIES, cfg, backend, Verifier())
    assert all(len(st.rows["on"]) == len(st.rows["off"]) == 4 for st in states.values())
    round2 = cfg.seed + 7919 * 4
    first_round2 = backend.log.index(("send", "q0", round2))
    last_round1 = max(k for k, e in enumerate(backend.log) if e[0] == "answer" and e[2] != round2)
    assert first_round2 < last_round1  # q0's second round went out before every first round was in
    assert [a.index for a in states["q0"].rows["on"]] == [0, 1, 2, 3]


def test_the_window_stays_full_while_work_remains():
    backend = Window(wrong, window=3)
    sample_queries(QUERIES * 1, SampleConfig(n=2, rounds=[]), backend, Verifier())
    depth, full = 0, []
    for kind, *_ in backend.log:
        depth += 1 if kind == "send" else -1
        if kind == "answer":
            full.append(depth + 1)
    sends = sum(e[0] == "send" for e in backend.log)
    assert sends == 6 and full[: sends - 3] == [3] * (sends - 3)


def test_rows_are_written_as_they_finish_and_a_rerun_writes_only_the_rest(tmp_path):
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(QUERIES)
    cfg = SampleConfig(n=4, rounds=[2])
    seen = []

    class Spy(Window):
        def stream(self, source, wave_limit=0):
            for item in super().stream(source):
                seen.append((tmp_path / "samples.jsonl").read_text().count("\n"))
                yield item

    stats = run(cfg, tmp_path, lambda name: Spy(wrong))
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] < stats["rows_out"]  # written one by one
    full = (tmp_path / "samples.jsonl").read_text().splitlines()
    (tmp_path / "samples.jsonl").write_text("\n".join(full[:5]) + "\n")
    again = Window(wrong)
    stats = run(cfg, tmp_path, lambda name: again)
    rows = list(read_rows(tmp_path / "samples.jsonl", Attempt))
    assert Counter((a.id, a.mode, a.index) for a in rows).most_common(1)[0][1] == 1
    assert len(rows) == len(full) == 24 and stats["rows_out"] == 24 - 5
    assert sum(e[0] == "send" for e in again.log) == 12 - 2  # the 5 rows kept answer their requests


def test_cache_hits_come_back_without_the_engine(tmp_path):
    reqs = [Request([{"role": "user", "content": f"hi {i}"}]) for i in range(4)]
    p = SamplingParams(n=2, temperature=0.7, seed=1)
    first = CachedBackend(Window(lambda r, i: f"a{i}"), tmp_path / "c.jsonl")
    out1 = list(first.stream(Job(i, r, p) for i, r in enumerate(reqs)))
    first.close()
    again = CachedBackend(Window(lambda r, i: "other"), tmp_path / "c.jsonl")
    out2 = list(again.stream(Job(i, r, p) for i, r in enumerate(reqs)))
    assert again.backend.log == [] and again.hits == 8 and again.misses == 0
    assert [(j.key, [c.text for c in cs]) for j, cs in out1] == [(j.key, [c.text for c in cs]) for j, cs in out2]
    # one more sample per request: only the missing one goes out, seed moved to its index
    more = list(again.stream(Job(i, r, p.with_(n=3)) for i, r in enumerate(reqs)))
    assert [len(cs) for _, cs in more] == [3] * 4 and all(e[2] == 1 + 2 for e in again.backend.log)


def test_base_stream_groups_a_wave_by_params():
    backend = ScriptedBackend(script=lambda r, i: "ok")
    a, b = SamplingParams(max_tokens=4), SamplingParams(max_tokens=8)
    jobs = [Job(k, Request([{"role": "user", "content": str(k)}]), a if k % 2 else b) for k in range(6)]
    out = list(backend.stream(iter(jobs)))
    assert sorted(j.key for j, _ in out) == list(range(6))
    assert [len(reqs) for reqs, _ in backend.calls] == [3, 3]


def test_finish_reasons_other_than_stop_and_length_are_kept():
    from katdata.backends import EngineConfig
    from katdata.backends.openai_api import OpenAIBackend

    be = OpenAIBackend(EngineConfig(base_url="http://127.0.0.1:9/v1"))
    for reason in ("stop", "length", "abort", "content_filter", "tool_calls"):
        choice = SimpleNamespace(finish_reason=reason, token_ids=[1, 2], model_extra={}, logprobs=None)
        assert be._completion("t", choice, None, 1, SamplingParams()).finish_reason == reason


# -- the solve stage ---------------------------------------------------------------------------

def solver_script(req, i):
    text = req.messages[0]["content"]
    if text.startswith("You are the solver"):
        return "Draft.\nAnswer: 4"
    if text.startswith("You are the thinker"):
        return "Two and two.\nFinal answer: 4"
    return " 3\nVerdict: accept\nReason: too short"  # the critic: every round is rejected


def step(job):
    """(role, query id, round) of a solve request."""
    text = job.request.messages[0]["content"]
    role = text.split(".")[0].replace("You are the ", "")
    qid = next(q.id for q in SOLVE_QUERIES if f"<<{q.id}>>" in text)
    return role, qid, job.params.seed


SOLVE_QUERIES = [Query(id=f"s{i}", query=f"<<s{i}>> What is two plus two?") for i in range(3)]


def test_a_solve_query_takes_its_next_step_while_others_are_out(tmp_path, monkeypatch):
    from katdata import solve

    class Steps(Window):
        def stream(self, source, wave_limit=0):
            for job, comps in super().stream(source):
                self.log.append(("done",) + step(job))
                yield job, comps

    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(SOLVE_QUERIES)
    backend = Steps(solver_script, window=2)
    written = []

    class Writer(RowWriter):
        def write(self, row):
            written.append((row.id, row.index, sum(e[0] == "done" for e in backend.log)))
            super().write(row)

    monkeypatch.setattr(solve, "RowWriter", Writer)
    stats = solve.run(solve.SolveConfig(rounds=1, chunk_size=3, seed=0), tmp_path, lambda name: backend)
    done = [e[1:] for e in backend.log if e[0] == "done"]
    assert len(done) == stats["attempts"] * 3 == 18  # solver, thinker, critic per round, 2 rounds, 3 queries
    # s0's thinker went out before s2's solver draft was in; s0's round 1 before the last round-0 critic
    assert done.index(("thinker", "s0", 0)) < done.index(("solver", "s2", 0))
    assert done.index(("solver", "s0", 1)) < done.index(("critic", "s2", 0))
    # each query's rows are written once it is finished, before the stage is over
    assert sorted((i, k) for i, k, _ in written) == [(q.id, k) for q in SOLVE_QUERIES for k in (0, 1)]
    assert written[0][2] < len(done)


def test_solve_requests_come_from_the_cache_on_a_rerun(tmp_path):
    from katdata import solve

    cfg = solve.SolveConfig(rounds=1, seed=3)
    runs = []
    for name, script in (("first", solver_script), ("again", lambda r, i: "never asked")):
        d = tmp_path / name
        with RowWriter(d / "queries.jsonl") as w:
            w.write_all(SOLVE_QUERIES)
        cached = CachedBackend(Window(script, window=2), tmp_path / "cache.jsonl")
        solve.run(cfg, d, lambda n: cached)
        cached.close()
        runs.append((cached, sorted(a.model_dump_json() for a in read_rows(d / "solve.jsonl", Attempt))))
    (first, rows1), (again, rows2) = runs
    assert first.misses == 18 and again.misses == 0 and again.hits == 18 and again.backend.log == []
    assert rows1 == rows2


def test_an_engine_failing_in_its_own_thread_fails_the_stage(tmp_path):
    import pytest

    from katdata import solve
    from katdata.errors import EngineError

    class Broken(ScriptedBackend):
        def generate(self, requests, params, on_done=None):
            raise EngineError("critic engine down")

    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all(SOLVE_QUERIES)
    engines = {"solver": Window(solver_script), "thinker": Window(solver_script), "critic": Broken()}
    cfg = solve.SolveConfig(solver_engine="solver", thinker_engine="thinker", critic_engine="critic")
    with pytest.raises(EngineError, match="critic engine down"):
        solve.run(cfg, tmp_path, engines.get)
    assert (tmp_path / "solve.jsonl").read_text() == ""  # no query finished, nothing written
