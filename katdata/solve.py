"""Stage `solve`: the multi-agent solver that writes think-on traces (kat-format.md section 5).

Three roles, each with its own prompt file and engine (by default all the same):

- the solver drafts a solution ending in ``Answer: ...``;
- the thinker reflects on the draft, checks and corrects each step and writes the full reasoning,
  ending in ``Final answer: ...``: that reasoning becomes the ``<think>`` content;
- the critic scores the result 1-10 (``Score:`` is pre-filled) with a verdict and a reason.

Queries stream through ``Backend.stream`` (several engines: ``backends.multi.stream_routed``):
each moves through its own steps (solver, thinker, critic, next round) and its next request goes
out as soon as its previous reply is in, while other queries' requests are out; its rows are
written once it is finished. A trace is accepted when its reasoning is complete, it has an
answer, its answer passes the reference check (where the query has a checkable reference; a
failed verifier is a ``verify_error``, not a mismatch), the critic's verdict is not "reject" and its score reaches the
threshold; otherwise the attempt is written with a ``reason`` and the query is regenerated with
the critic's feedback, up to ``rounds`` times. Every attempt row keeps its segments (role, round,
model, raw text) as provenance.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata.backends.base import WAIT, Backend, Completion, Job, Request, SamplingParams
from katdata.backends.multi import stream_routed
from katdata.records import Attempt, Query, Segment, Tags
from katdata.runfiles import RowWriter, read_rows, repair_tail
from katdata.prompt_files import read_prompt
from katdata.sandbox import SandboxConfig
from katdata.stage import Stage
from katdata.verify import Verifier, VerifyConfig, VerifyError, check_error_share
from katdata.template import END_TOKENS, MARKERS, STOP_STRINGS
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)

CRITIC_PREFIX = "Score:"
# why a trace is rejected before the critic sees it (also the feedback for the next round)
STRUCTURAL = {
    "engine_error": "the engine failed on this request",
    "truncated": "the reasoning was cut off at the token limit; reason more concisely",
    "no_reasoning": "the reasoning is empty",
    "no_answer": "the reasoning ends without a final answer line (Final answer: ...)",
    "marker_in_text": "the reasoning or answer contains a KAT template tag",
}
_ANSWER = re.compile(r"^[\W_]*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:：]\s*(.+?)\s*$", re.I | re.M)
_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")
_ANSWER_IS = re.compile(r"\bthe (?:final )?answer is\s*:?\s*([^\n]+?)\s*\.?\s*$", re.I | re.M)


class SolveConfig(BaseModel):
    """Settings of the solver stage (the recipe's ``solve:`` section)."""

    model_config = ConfigDict(extra="forbid")

    solver_engine: str = Field("default", description="engine name (recipe `engines:` table) of the solver role")
    thinker_engine: str = Field("default", description="engine name of the thinker role")
    critic_engine: str = Field("default", description="engine name of the critic role")
    threshold: float = Field(7.0, ge=1, le=10, description="lowest critic score (1-10) that is accepted")
    rounds: int = Field(2, ge=0, description="regenerations with the critic's feedback after the first round")
    max_tokens: int = Field(384, ge=16, description="token limit of a solver draft and of a thinker trace")
    critic_max_tokens: int = Field(96, ge=8, description="token limit of a critic reply")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of the first round")
    regen_temperature: float = Field(0.7, ge=0, description="sampling temperature of regeneration rounds")
    seed: int = Field(0, description="sampling seed; round r uses seed + r")
    queries: Literal["all", "not_off_candidates"] = Field(
        "all", description="which queries to solve: all, or only those not tagged think-off candidates")
    chunk_size: int = Field(64, ge=1, description="queries in progress at once (each moves through its rounds on "
                                                   "its own): bounds memory; an in-process engine batches their "
                                                   "pending requests together")
    check_reference: bool = Field(True, description="reject a trace whose answer fails the reference check")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="how answers are checked (katdata.verify)")
    grader_engine: Optional[str] = Field(None, description="engine of the LLM grader for kind=open references "
                                                           "(None: open answers stay unverified)")


ROLES = ("solver", "thinker", "critic")


@dataclass
class Work:
    """One query on its way through the rounds: the replies of its current round so far."""

    q: Query
    round: int = 0
    feedback: str = ""
    critique: str = ""
    draft: Optional[Completion] = None
    trace: Optional[Completion] = None
    found: Optional[dict[str, Any]] = None
    rows: list[Attempt] = field(default_factory=list)


def extract_answer(text: str) -> Optional[str]:
    """The final answer stated in a reply: the last ``(Final) Answer: ...`` line, else ``\\boxed{}``."""
    for pattern in (_ANSWER, _BOXED, _ANSWER_IS):
        hits = [h.strip() for h in pattern.findall(text) if h.strip()]
        if hits:
            return hits[-1].strip().rstrip(".").strip() or None
    return None


def parse_critic(raw: str) -> tuple[Optional[float], Optional[str], str]:
    """(score 1-10 or None, verdict or None, reason) from a critic reply, parsed tolerantly."""
    m = re.search(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", raw, re.I)
    score = float(m[1]) if m and 1 <= float(m[1]) <= 10 else None
    v = re.search(r"verdict\s*[:=]?\s*\**\s*(accept|reject|pass|fail|correct|incorrect)", raw, re.I)
    verdict = None
    if v:
        verdict = "accept" if v[1].lower() in ("accept", "pass", "correct") else "reject"
    r = re.search(r"reason\s*[:=]\s*(.+)", raw, re.I)
    reason = (r[1] if r else raw.replace(CRITIC_PREFIX, "", 1)).strip()
    return score, verdict, reason[:400]


def check_answer(answer: Optional[str], q: Query, verifier: Verifier) -> Optional[bool]:
    """The project's verifier on the trace's answer; None when the query has no checkable reference.
    Raises VerifyError when the verifier itself failed (a Math-Verify worker crashed or timed out)."""
    if q.reference is None:
        return None
    return verifier.check(q.kind, answer, q.reference, query=q)


def answer_of(think: str, q: Query) -> Optional[str]:
    """The trace's answer: the last fenced code block for code queries, else the stated final answer."""
    if q.kind == "code":
        blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", think, re.S)
        return f"```python\n{blocks[-1].strip()}\n```" if blocks and blocks[-1].strip() else None
    return extract_answer(think)


def _prompts() -> dict[str, str]:
    solver, feedback = read_prompt("solver.txt").split("=== feedback ===")
    return {"solver": solver.strip() + "\n", "feedback": feedback.strip("\n"),
            "thinker": read_prompt("thinker.txt"), "critic": read_prompt("critic.txt")}


def _clean(text: str) -> str:
    """A reply without end-of-turn tokens and surrounding whitespace."""
    for token in END_TOKENS:
        text = text.replace(token, "")
    return text.strip()


def _user(text: str, prefix: Optional[str] = None) -> Request:
    return Request(messages=[{"role": "user", "content": text}], prefix=prefix)


def _reject_code(reason: Optional[str]) -> str:
    return (reason or "accepted").split(":")[0]


def _params(cfg: SolveConfig, rnd: int, role: str) -> SamplingParams:
    """Round ``rnd``'s sampling: solver and thinker share it, the critic decodes greedily."""
    if role == "critic":
        return SamplingParams(max_tokens=cfg.critic_max_tokens, temperature=0.0, seed=cfg.seed + rnd,
                              stop=tuple(STOP_STRINGS))
    temp = cfg.temperature if rnd == 0 else cfg.regen_temperature
    return SamplingParams(max_tokens=cfg.max_tokens, temperature=temp, seed=cfg.seed + rnd, stop=tuple(STOP_STRINGS))


def inspect_trace(w: Work, cfg: SolveConfig, verifier: Verifier) -> dict[str, Any]:
    """The thinker's reasoning and answer, its structural errors and the reference check."""
    d, t = w.draft, w.trace
    think = _clean(t.text)
    answer = answer_of(think, w.q)
    errors = [code for code, bad in (
        ("engine_error", t.finish_reason == "error" or d.finish_reason == "error"),
        ("truncated", t.finish_reason == "length"), ("no_reasoning", not think),
        ("no_answer", not answer),
        ("marker_in_text", any(m in think or m in (answer or "") for m in MARKERS))) if bad]
    correct, verify_error = None, None
    if cfg.check_reference and not errors:
        try:
            correct = check_answer(answer, w.q, verifier)
        except VerifyError as exc:
            verify_error = str(exc)
    return {"think": think, "answer": answer, "errors": errors, "correct": correct, "verify_error": verify_error}


def attempt_row(w: Work, c: Optional[Completion], cfg: SolveConfig, models: dict[str, str]) -> Attempt:
    """The round's attempt row from the draft, the trace and the critic's reply (None: not asked)."""
    d, t, f, rnd = w.draft, w.trace, w.found, w.round
    segs = [Segment(role="solver", round=rnd, model=models["solver"], text=d.text),
            Segment(role="thinker", round=rnd, model=models["thinker"], text=t.text)]
    score, verdict, critique, errors = None, None, "", list(f["errors"])
    if c is not None:
        raw = CRITIC_PREFIX + c.text
        segs.append(Segment(role="critic", round=rnd, model=models["critic"], text=raw))
        score, verdict, critique = parse_critic(raw)
        if score is None:
            errors.append("critic_unparsed")
    if errors:
        reason = f"{errors[0]}: " + (f"no score in {raw[:120]!r}" if errors[0] == "critic_unparsed"
                                     else STRUCTURAL[errors[0]])
    elif f["verify_error"]:
        reason = f"verify_error: {f['verify_error']} (not counted as wrong)"
    elif f["correct"] is False:
        reason = f"reference_mismatch: answer {f['answer']!r} fails the reference check (critic score {score:g})"
    elif verdict == "reject":  # the critic's verdict stands whatever score it gave
        reason = f"critic_reject: the critic rejected it (score {score:g}): {critique}"
    elif score < cfg.threshold:
        reason = f"below_threshold: critic score {score:g} < {cfg.threshold:g}: {critique}"
    else:
        reason = None
    w.critique = critique or (reason or "").split(": ", 1)[-1]
    tokens = [x for x in (d, t, c) if x is not None]
    return Attempt(id=w.q.id, index=rnd, source="solver", mode="on", text=t.text, think=f["think"] or None,
                   answer=f["answer"], finish_reason=t.finish_reason, ok=not errors, errors=errors,
                   correct=f["correct"], prompt_tokens=sum(x.prompt_tokens for x in tokens),
                   completion_tokens=sum(x.completion_tokens for x in tokens), score=score,
                   reason=reason, segments=segs)


def solve_queries(queries: Iterable[Query], cfg: SolveConfig, engine: Callable[[str], Backend],
                  on_done: Callable[[list[Attempt]], None], requests: Counter, usage: Counter,
                  verifier: Optional[Verifier] = None) -> None:
    """Stream the rounds of ``queries``; ``on_done`` gets each query's attempt rows once it is finished.

    Each query moves on its own: solver, thinker, critic, then (rejected, rounds left) the next
    round with the critic's feedback, each step submitted as soon as the query's previous reply is
    in while other queries' requests are out. At most ``cfg.chunk_size`` queries are in progress
    (read lazily from ``queries``). Every request is the one the round-by-round loop made (same
    prompt, params and seed), so the rows are the same and the request cache serves them."""
    p = _prompts()
    verifier = verifier or Verifier(cfg.verify)
    backends = {role: engine(getattr(cfg, f"{role}_engine")) for role in ROLES}
    models = {role: b.model_id for role, b in backends.items()}
    todo, ready = iter(queries), deque()
    state = {"open": 0}

    def ask(role: str, w: Work) -> None:
        q, fb = w.q.query, w.feedback
        if role == "solver":
            req = _user(p["solver"].format(query=q, feedback=fb))
        elif role == "thinker":
            req = _user(p["thinker"].format(query=q, draft=_clean(w.draft.text), feedback=fb))
        else:
            req = _user(p["critic"].format(query=q, reasoning=w.found["think"], answer=w.found["answer"]),
                        prefix=CRITIC_PREFIX)
        requests[role] += 1
        ready.append(Job((role, w), req, _params(cfg, w.round, role)))

    def source():
        while True:
            if ready:
                yield ready.popleft()
            elif state["open"] < cfg.chunk_size and (q := next(todo, None)) is not None:
                state["open"] += 1
                ask("solver", Work(q))
            elif state["open"]:
                yield WAIT
            else:
                return

    def end_round(w: Work, critic: Optional[Completion]) -> None:
        row = attempt_row(w, critic, cfg, models)
        w.rows.append(row)
        if row.reason is None or w.round >= cfg.rounds:
            state["open"] -= 1
            on_done(w.rows)
            return
        w.feedback = "\n" + p["feedback"].format(answer=w.found["answer"] or "(none)", critique=w.critique)
        w.round, w.draft, w.trace, w.found = w.round + 1, None, None, None
        ask("solver", w)

    for job, comps in stream_routed(backends.values(), lambda job: backends[job.key[0]], source()):
        role, w = job.key
        c = comps[0]
        usage[f"{role}_prompt_tokens"] += c.prompt_tokens
        usage[f"{role}_completion_tokens"] += c.completion_tokens
        if role == "solver":
            w.draft = c
            ask("thinker", w)
        elif role == "thinker":
            w.trace = c
            w.found = inspect_trace(w, cfg, verifier)
            if w.found["errors"]:  # rejected before the critic sees it
                end_round(w, None)
            else:
                ask("critic", w)
        else:
            end_round(w, c)


def solve_stats(rows: Iterable[Attempt], cfg: SolveConfig) -> dict[str, Any]:
    """Accepted queries, rejects by reason, acceptance by round, critic scores (one pass over ``rows``)."""
    ids, accepted, gave_up = set(), set(), set()
    attempts = n_accepted = checked = 0
    rejects, by_round, scores = Counter(), Counter(), [0.0, 0]
    for a in rows:
        attempts += 1
        ids.add(a.id)
        checked += a.correct is not None
        if a.score is not None:
            scores[0] += a.score
            scores[1] += 1
        if a.reason is None:
            n_accepted += 1
            accepted.add(a.id)
            by_round[a.index] += 1
        else:
            rejects[_reject_code(a.reason)] += 1
            if a.index >= cfg.rounds:
                gave_up.add(a.id)
    return {"attempts": attempts, "queries": len(ids), "accepted": n_accepted, "gave_up": len(gave_up - accepted),
            "acceptance_rate": round(n_accepted / len(ids), 4) if ids else None, "rejects": dict(rejects),
            "accepted_by_round": dict(by_round),
            "mean_score": round(scores[0] / scores[1], 3) if scores[1] else None,
            "reference_checked": checked, "verify_errors": rejects["verify_error"]}


def run(cfg: SolveConfig, run_dir: Path, engine: Callable[[str], Backend],
        sandbox: Optional[SandboxConfig] = None) -> dict[str, Any]:
    """Solve queries.jsonl (using tags.jsonl) into solve.jsonl, each query's rows written once it is
    finished; a rerun solves the queries that are not (resumable by (id, round)). The queries are
    read from the file as they are needed, never all at once."""
    run_dir = Path(run_dir)
    out_path = RunFolder(run_dir).solve
    off: set[str] = set()
    if cfg.queries == "not_off_candidates":
        off = {t.id for t in read_rows(RunFolder(run_dir).tags, Tags) if t.think_off_candidate}
    existing: set[tuple[str, int]] = set()
    done: set[str] = set()
    if out_path.is_file():
        repair_tail(out_path)
        for a in read_rows(out_path, Attempt):
            existing.add((a.id, a.index))
            if a.reason is None or a.index >= cfg.rounds:
                done.add(a.id)

    def pending():
        return (q for q in read_rows(RunFolder(run_dir).queries, Query) if q.id not in off and q.id not in done)

    rows_in = skipped_off = n_todo = 0
    code_query = None  # one code query with tests, for the sandbox check before any model loads
    for q in read_rows(RunFolder(run_dir).queries, Query):
        rows_in += 1
        skipped_off += q.id in off
        if q.id not in off and q.id not in done:
            n_todo += 1
            if code_query is None and q.kind == "code" and q.reference is not None:
                code_query = q
    isolation = (Verifier(cfg.verify, sandbox=sandbox).code_isolation([code_query] if code_query else [])
                 if cfg.check_reference else None)
    verifier = Verifier(cfg.verify, grader=engine(cfg.grader_engine) if cfg.grader_engine and n_todo else None,
                        sandbox=sandbox)
    requests, usage, seen = Counter(), Counter(), Counter()
    t0 = time.perf_counter()
    with RowWriter(out_path) as w:
        def write(rows: list[Attempt]) -> None:
            # verifications failing too often stop the run before this query's rows are written
            errs = sum(_reject_code(a.reason) == "verify_error" for a in rows)
            seen["checked"] += errs + sum(a.correct is not None for a in rows)
            seen["failed"] += errs
            check_error_share(seen["failed"], seen["checked"], cfg.verify, "solve")
            w.write_all(a for a in rows if (a.id, a.index) not in existing)
            seen["queries"] += 1
            if seen["queries"] % cfg.chunk_size == 0 or seen["queries"] == n_todo:
                log.info("solved %d/%d", seen["queries"], n_todo)

        if n_todo:
            solve_queries(pending(), cfg, engine, write, requests, usage, verifier)
    secs = time.perf_counter() - t0
    stats = solve_stats(read_rows(out_path, Attempt), cfg) if out_path.is_file() else {}
    stats.update(rows_in=rows_in, skipped_off_candidates=skipped_off, queries_new=n_todo,
                 requests=dict(requests), tokens=dict(usage), seconds=round(secs, 3),
                 queries_per_s=round(n_todo / secs, 3) if n_todo and secs > 0 else None)
    if isolation:
        stats = {"sandbox": isolation, **stats}
    return stats


STAGE = Stage("solve", "think-on traces from the solver / thinker / critic agents",
              lambda ctx: run(ctx.cfg, ctx.folder.root, ctx.engines, sandbox=ctx.section("sandbox")), SolveConfig,
              reads=("queries",), may_read=("tags",), writes=("solve",), sections=("sandbox",))
