"""Two-mode sampling for the vote: N responses per mode per query, the mode forced by the prefix.

Each request is the query's chat with the assistant turn pre-filled up to the mode:
``<judge>\\n{neutral text}\\n</judge>\\n\\n`` + ``template.FORCE_PREFIX[mode]``, so the judge text
does not argue for either mode. Each mode of each query is ONE request with ``n`` samples.

Early stopping: samples come in rounds (cumulative per-mode counts, e.g. 2, 4, 8); after each of its
rounds a query whose label cannot change at the recipe's confidence (``vote.settled``) gets no more.
Rounds run per query through ``Backend.stream``: a query's next round goes out as soon as its own
previous round is verified, and rows are written as each request finishes.
Every sample becomes an ``Attempt`` row (source="vote") in samples.jsonl, parsed with
``template.parse``; one that yields no answer is kept with a ``reason``.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from katdata import template
from katdata.backends.base import WAIT, Backend, Completion, Job, Request, SamplingParams
from katdata.records import Attempt, Query
from katdata.sandbox import SandboxConfig
from katdata.stage import Stage
from katdata.runfiles import RowIndex, RowWriter, read_rows, repair_tail
from katdata.prompt_files import read_prompt
from katdata.verify import (INVALID, Verifier, VerifyConfig, VerifyError, assign_class, check_error_share,
                            is_verify_error)
from katdata.vote import settled, verdicts
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)


class SampleConfig(BaseModel):
    """Settings of the two-mode sampling stage (the recipe's ``sample:`` section)."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field("default", description="engine that samples the responses")
    grader_engine: Optional[str] = Field(None, description="engine of the LLM grader of open-ended answers (kind=open)")
    n: int = Field(8, ge=1, description="samples per mode per query (N)")
    rounds: list[int] = Field([2, 4, 8], description="cumulative samples per mode after each round; [] = all N at once")
    confidence: float = Field(0.95, gt=0.0, le=1.0, description="stop a query once its label is settled at this confidence (1 = worst case)")
    delta: float = Field(0.1, ge=0, le=1, description="the vote's delta (keep equal to vote.delta)")
    temperature: float = Field(0.8, ge=0.0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling")
    max_tokens_on: int = Field(384, ge=8, description="token limit of a think-on sample")
    max_tokens_off: int = Field(128, ge=8, description="token limit of a think-off sample")
    seed: int = Field(0, description="sampling seed (moved per round, so rounds draw fresh samples)")
    chunk: int = Field(16, ge=1, description="unused since the stage streams its requests (kept so older recipes load)")
    max_open: int = Field(256, ge=1, description="queries in progress at once: bounds memory; an in-process engine batches their pending requests")
    neutral_judge: str = Field("judge_neutral.txt", description="prompt file with the neutral judge text")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="how answers are checked")
    skip_on_for_off_candidates: bool = Field(
        False, description="budget: queries the tagger marks as think-off candidates get no think-on samples")

    @field_validator("rounds")
    @classmethod
    def _increasing(cls, rounds: list[int]) -> list[int]:
        if any(r < 1 for r in rounds) or any(b <= a for a, b in zip(rounds, rounds[1:])):
            raise ValueError(f"rounds must be positive and increasing (cumulative counts), got {rounds}")
        return rounds

    @model_validator(mode="after")
    def _rounds_within_n(self):
        """Rounds that go past ``n`` are refused (they would be cut off unseen), except the default rounds,
        cumulative targets that end at ``n`` whatever it is (and load again from a saved recipe.yaml)."""
        over = [r for r in self.rounds if r > self.n]
        if over and self.rounds != type(self).model_fields["rounds"].default:
            raise ValueError(f"sample.rounds {self.rounds} go past sample.n={self.n} ({', '.join(map(str, over))}): "
                             f"rounds are cumulative samples per mode, the last at most n; e.g. rounds: "
                             f"{[r for r in self.rounds if r < self.n] + [self.n]}")
        return self


def schedule(cfg: SampleConfig) -> list[int]:
    """The cumulative per-mode targets, ending at N."""
    steps = sorted({r for r in cfg.rounds if 0 < r < cfg.n}) + [cfg.n]
    return steps


def mode_prefix(mode: str, neutral: str) -> str:
    """The assistant prefix that forces ``mode`` after a neutral judge text."""
    return f"{template.GENERATION_PREFIX}{neutral.strip()}\n{template.JUDGE_CLOSE}\n\n{template.FORCE_PREFIX[mode]}"


def request_for(q: Query, mode: str, neutral: str) -> Request:
    msgs = ([{"role": "system", "content": q.system}] if q.system else []) + [{"role": "user", "content": q.query}]
    return Request(messages=msgs, prefix=mode_prefix(mode, neutral))


def to_attempt(q: Query, mode: str, index: int, prefix: str, comp: Completion) -> Attempt:
    """Parse one completion. A completion that stopped at the end-of-turn token inside the open
    ``<answer>`` block is closed before parsing (recorded as ``closed_at_stop``): the model ended
    its answer there. Errors from the strict parse are kept."""
    response = prefix + comp.text
    strict = template.parse(response, comp.finish_reason)
    parsed, errors = strict, list(strict.errors)
    if comp.finish_reason == "stop" and "unclosed_answer" in strict.errors:
        parsed = template.parse(response.rstrip() + "\n" + template.ANSWER_CLOSE)
        errors.append("closed_at_stop")
    # An answer block that closed before a cut-off still counts (the junk after it is recorded).
    closed = "unclosed_answer" not in parsed.errors and "unclosed_think" not in parsed.errors
    answer = parsed.answer if parsed.answer and parsed.answer.strip() and closed else None
    think = parsed.think if mode == "on" else None
    reason = None
    if comp.finish_reason == "error":
        reason = f"engine error: {comp.error}"
    elif answer is None:
        reason = "no answer: " + ",".join(parsed.errors or ["empty"])
    return Attempt(id=q.id, index=index, source="vote", mode=mode, text=comp.text, response=response,
                   think=think, answer=answer, finish_reason=comp.finish_reason, ok=strict.ok, errors=errors,
                   prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens, reason=reason)


class QueryState:
    def __init__(self, q: Query):
        self.q = q
        self.rows: dict[str, list[Attempt]] = {"on": [], "off": []}
        self.seen: list[str] = []  # class keys so far (both modes)
        self.round = 0  # the next round of the schedule
        self.pending = 0  # requests of the current round still out

    def counts(self) -> tuple[int, int, int, int]:
        ok, _ = verdicts(self.rows["on"] + self.rows["off"])
        n_on = len(self.rows["on"])
        return sum(ok[:n_on]), n_on, sum(ok[n_on:]), len(self.rows["off"])

    def done(self, cfg: SampleConfig) -> bool:
        s_on, n_on, s_off, n_off = self.counts()
        if n_on >= cfg.n and n_off >= cfg.n:
            return True
        return n_on > 0 and n_off > 0 and settled(s_on, n_on, s_off, n_off, cfg.n, cfg.delta, cfg.confidence)


def check_attempt(a: Attempt, st: QueryState, verifier: Verifier) -> Attempt:
    """Fill ``answer_class`` and ``correct`` for one attempt. When the verifier fails (a Math-Verify
    worker crashed or timed out) the attempt gets no verdict (``correct`` None, class invalid) and
    the failure as its ``reason``: an error, not a wrong answer."""
    q = st.q
    try:
        key = verifier.key(q.kind, a.answer, q) if a.answer is not None else None
        a.answer_class = assign_class(q.kind, key, st.seen, verifier)
        if verifier.can_check(q.kind, q.reference):
            a.correct = verifier.check(q.kind, a.answer, q.reference, q, key) if a.answer is not None else False
    except VerifyError as exc:
        a.answer_class, a.correct, a.reason = INVALID, None, str(exc)
    return a


def sample_queries(queries: Iterable[Query], cfg: SampleConfig, backend: Backend, verifier: Verifier,
                   existing: Optional[Mapping[str, list[Attempt]]] = None,
                   on_rows: Optional[Callable[[list[Attempt]], None]] = None,
                   skip_on: frozenset = frozenset(),
                   on_close: Optional[Callable[[QueryState], None]] = None,
                   keep_states: bool = True) -> dict[str, QueryState]:
    """Stream the rounds of ``queries`` through ``backend.stream``; returns the states (when kept).

    Each query moves on its own: its next round is asked for as soon as its previous one is in and
    verified and its label is not settled, while other queries are still out. At most
    ``cfg.max_open`` queries are in progress (queries are read lazily). ``on_rows`` gets each
    request's new rows as they finish; ``on_close`` each query once it is finished.

    ``existing`` rows (a resumed run; a dict or a :class:`RowIndex` of the file, looked up as each query
    opens) answer their requests at once and are not handed to
    ``on_rows`` again: the schedule is replayed from the start, so a synchronous engine forms the
    same batches as an uninterrupted run and the request cache serves what was generated before.
    Queries in ``skip_on`` (think-off candidates, under the budget option) get no think-on samples.
    """
    neutral = read_prompt(cfg.neutral_judge)
    targets = schedule(cfg)
    have: dict[tuple[str, str], dict[int, Attempt]] = defaultdict(dict)  # a resumed query's rows, while it is open
    states: dict[str, QueryState] = {}
    ready: deque = deque()  # jobs (or answered pairs) to hand the engine next
    open_count = 0

    def plan(st: QueryState) -> bool:
        """Queue the requests of ``st``'s next round; False when the query is finished."""
        while st.round < len(targets) and not st.done(cfg):
            target = targets[st.round]
            st.round += 1
            for mode in ("on", "off"):
                if mode == "on" and st.q.id in skip_on:
                    continue
                start = len(st.rows[mode])
                need = target - start
                if need <= 0:
                    continue
                params = SamplingParams(n=need, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_tokens=cfg.max_tokens_on if mode == "on" else cfg.max_tokens_off,
                                        stop=tuple(template.STOP_STRINGS), seed=cfg.seed + 7919 * target)
                job = Job((st, mode, start), request_for(st.q, mode, neutral), params)
                old = have.get((st.q.id, mode), {})
                ready.append((job, None) if all(start + k in old for k in range(need)) else job)
                st.pending += 1
            if st.pending:
                return True
        return False

    def close(st: QueryState) -> None:
        nonlocal open_count
        open_count -= 1
        if on_close:
            on_close(st)
        if not keep_states:
            states.pop(st.q.id, None)
        have.pop((st.q.id, "on"), None)
        have.pop((st.q.id, "off"), None)

    def source():
        nonlocal open_count
        todo = iter(queries)
        more = True
        while True:
            if ready:
                yield ready.popleft()
            elif more and open_count < cfg.max_open:
                q = next(todo, None)
                if q is None:
                    more = False
                    continue
                st = states[q.id] = QueryState(q)
                open_count += 1
                for a in (existing or {}).get(q.id) or ():
                    have[(q.id, a.mode)][a.index] = a
                if not plan(st):
                    close(st)
            elif open_count:
                yield WAIT
            else:
                return

    for job, comps in backend.stream(source()):
        st, mode, start = job.key
        old = have.get((st.q.id, mode), {})
        new: list[Attempt] = []
        for k in range(job.params.n):
            index = start + k
            if index in old:
                a = old[index]
                if a.answer_class not in (None, INVALID) and a.answer_class not in st.seen:
                    st.seen.append(a.answer_class)
            else:
                a = check_attempt(to_attempt(st.q, mode, index, job.request.prefix, comps[k]), st, verifier)
                new.append(a)
            st.rows[mode].append(a)
        if new and on_rows:
            on_rows(new)
        st.pending -= 1
        if st.pending == 0 and not plan(st):
            close(st)
    return states


def run(cfg: SampleConfig, run_dir: Path, engine: Callable[[str], Backend],
        sandbox: Optional[SandboxConfig] = None) -> dict:
    """queries.jsonl -> samples.jsonl, each request's rows written as they finish; a rerun
    continues from the rows it has (see :func:`sample_queries`)."""
    run_dir = Path(run_dir)
    queries_path = RunFolder(run_dir).queries
    out_path = RunFolder(run_dir).samples
    repair_tail(out_path)
    existing = RowIndex(out_path, Attempt)  # rows of a resumed run, read back query by query
    # refuses before any model loads if code can't be isolated
    isolation = Verifier(cfg.verify, sandbox=sandbox).code_isolation(read_rows(queries_path, Query))
    grader = engine(cfg.grader_engine) if cfg.grader_engine else None
    verifier = Verifier(cfg.verify, grader=grader, sandbox=sandbox)
    backend = engine(cfg.engine)
    stats: Counter = Counter()
    with RowWriter(out_path) as out:
        def write(rows: list[Attempt]) -> None:
            # verifications failing too often stop the run before these rows are written
            checked = stats["verified"] + sum(a.answer is not None for a in rows)
            errors = stats["verify_errors"] + sum(is_verify_error(a.reason) for a in rows)
            check_error_share(errors, checked, cfg.verify, "sample")
            stats["verified"], stats["verify_errors"] = checked, errors
            out.write_all(rows)
            stats["samples"] += len(rows)
            stats["tokens"] += sum(a.completion_tokens for a in rows)
            stats["no_answer"] += sum(a.answer is None for a in rows)
            stats["closed_at_stop"] += sum("closed_at_stop" in a.errors for a in rows)

        def closed(st: QueryState) -> None:
            n_on, n_off = len(st.rows["on"]), len(st.rows["off"])
            stats["queries"] += 1
            stats["used"] += n_on + n_off
            stats["stopped_early"] += not (n_on >= cfg.n and n_off >= cfg.n)

        skip_on = frozenset()
        if cfg.skip_on_for_off_candidates:
            from katdata.tag import think_off_candidates

            skip_on = frozenset(think_off_candidates(run_dir))
        sample_queries(read_rows(queries_path, Query), cfg, backend, verifier, existing, write, skip_on,
                       on_close=closed, keep_states=False)
    existing.close()
    return {**({"sandbox": isolation} if isolation else {}),
            "rows_in": stats["queries"], "rows_out": stats["samples"], "samples_used": stats["used"],
            "samples_saved": 2 * cfg.n * stats["queries"] - stats["used"], "tokens": stats["tokens"],
            "no_answer": stats["no_answer"], "verify_errors": stats["verify_errors"], "skipped_think_on": len(skip_on),
            "closed_at_stop": stats["closed_at_stop"], "stopped_early": stats["stopped_early"]}


STAGE = Stage("sample", "sample N responses per mode per query (mode forced by the prefix)",
              lambda ctx: run(ctx.cfg, ctx.folder.root, ctx.engines, sandbox=ctx.section("sandbox")), SampleConfig,
              reads=("queries",), may_read=("tags",), writes=("samples",), sections=("sandbox",))
