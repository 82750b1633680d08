"""Stage `solve`: the multi-agent solver that writes think-on traces (kat-format.md section 5).

Three roles, each with its own prompt file and engine (by default all the same):

- the solver drafts a solution ending in ``Answer: ...``;
- the thinker reflects on the draft, checks and corrects each step and writes the full reasoning,
  ending in ``Final answer: ...``: that reasoning becomes the ``<think>`` content;
- the critic scores the result 1-10 (``Score:`` is pre-filled) with a verdict and a reason.

Rounds are batched across queries: one backend call per role per round for a whole chunk of
queries. A trace is accepted when its reasoning is complete, it has an answer, its answer passes
the reference check (where the query has a checkable reference; a failed verifier is a
``verify_error``, not a mismatch), the critic's verdict is not "reject" and its score reaches the
threshold; otherwise the attempt is written with a ``reason`` and the query is regenerated with
the critic's feedback, up to ``rounds`` times. Every attempt row keeps its segments (role, round,
model, raw text) as provenance.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata.backends.base import Backend, Completion, Request, SamplingParams
from katdata.records import Attempt, Query, Segment, Tags
from katdata.runfiles import RowWriter, read_rows, repair_tail
from katdata.prompt_files import read_prompt
from katdata.tag import engine_factory
from katdata.verify import Verifier, VerifyConfig, VerifyError, check_error_share
from katdata.template import END_TOKENS, MARKERS, STOP_STRINGS

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
    chunk_size: int = Field(64, ge=1, description="queries solved together: one backend call per role per round")
    check_reference: bool = Field(True, description="reject a trace whose answer fails the reference check")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="how answers are checked (katdata.verify)")
    grader_engine: Optional[str] = Field(None, description="engine of the LLM grader for kind=open references "
                                                           "(None: open answers stay unverified)")


@dataclass
class Work:
    """One query in flight through the rounds."""

    q: Query
    feedback: str = ""


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


def solve_rounds(queries: list[Query], cfg: SolveConfig, engine: Callable[[str], Backend],
                 calls: Counter, usage: Counter, verifier: Optional[Verifier] = None) -> Iterator[list[Attempt]]:
    """Run the rounds for a chunk of queries; yields each round's attempt rows (accepted and rejected)."""
    p = _prompts()
    verifier = verifier or Verifier(cfg.verify)
    active = [Work(q) for q in queries]
    for rnd in range(cfg.rounds + 1):
        if not active:
            return
        temp = cfg.temperature if rnd == 0 else cfg.regen_temperature
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=temp, seed=cfg.seed + rnd,
                                stop=tuple(STOP_STRINGS))
        backends = {role: engine(getattr(cfg, f"{role}_engine")) for role in ("solver", "thinker", "critic")}

        def call(role: str, requests: list[Request], sp: SamplingParams) -> list[Completion]:
            calls[role] += 1
            outs = [o[0] for o in backends[role].generate(requests, sp)]
            for c in outs:
                usage[f"{role}_prompt_tokens"] += c.prompt_tokens
                usage[f"{role}_completion_tokens"] += c.completion_tokens
            return outs

        drafts = call("solver", [_user(p["solver"].format(query=w.q.query, feedback=w.feedback)) for w in active], params)
        traces = call("thinker", [_user(p["thinker"].format(query=w.q.query, draft=_clean(d.text), feedback=w.feedback))
                                  for w, d in zip(active, drafts)], params)
        found: list[dict[str, Any]] = []
        for w, d, t in zip(active, drafts, traces):
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
            found.append({"think": think, "answer": answer, "errors": errors, "correct": correct,
                          "verify_error": verify_error})
        critiqued = [i for i, f in enumerate(found) if not f["errors"]]
        critiques: dict[int, Completion] = {}
        if critiqued:
            cparams = SamplingParams(max_tokens=cfg.critic_max_tokens, temperature=0.0, seed=cfg.seed + rnd,
                                     stop=tuple(STOP_STRINGS))
            reqs = [_user(p["critic"].format(query=active[i].q.query, reasoning=found[i]["think"],
                                             answer=found[i]["answer"]), prefix=CRITIC_PREFIX) for i in critiqued]
            critiques = dict(zip(critiqued, call("critic", reqs, cparams)))

        rows, still = [], []
        for i, (w, d, t, f) in enumerate(zip(active, drafts, traces, found)):
            segs = [Segment(role="solver", round=rnd, model=backends["solver"].model_id, text=d.text),
                    Segment(role="thinker", round=rnd, model=backends["thinker"].model_id, text=t.text)]
            score, verdict, critique, errors = None, None, "", list(f["errors"])
            if i in critiques:
                c = critiques[i]
                raw = CRITIC_PREFIX + c.text
                segs.append(Segment(role="critic", round=rnd, model=backends["critic"].model_id, text=raw))
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
            tokens = [x for x in (d, t, critiques.get(i)) if x is not None]
            rows.append(Attempt(id=w.q.id, index=rnd, source="solver", mode="on", text=t.text, think=f["think"] or None,
                                answer=f["answer"], finish_reason=t.finish_reason, ok=not errors, errors=errors,
                                correct=f["correct"], prompt_tokens=sum(x.prompt_tokens for x in tokens),
                                completion_tokens=sum(x.completion_tokens for x in tokens), score=score,
                                reason=reason, segments=segs))
            if reason is not None:
                critique = critique or reason.split(": ", 1)[-1]
                w.feedback = "\n" + p["feedback"].format(answer=f["answer"] or "(none)", critique=critique)
                still.append(w)
        active = still
        yield rows


def solve_stats(rows: list[Attempt], cfg: SolveConfig) -> dict[str, Any]:
    """Accepted queries, rejects by reason, acceptance by round, critic scores."""
    accepted = [a for a in rows if a.reason is None]
    ids = {a.id for a in rows}
    scores = [a.score for a in rows if a.score is not None]
    return {"attempts": len(rows), "queries": len(ids), "accepted": len(accepted),
            "gave_up": len({a.id for a in rows if a.reason is not None and a.index >= cfg.rounds} - {a.id for a in accepted}),
            "acceptance_rate": round(len(accepted) / len(ids), 4) if ids else None,
            "rejects": dict(Counter(_reject_code(a.reason) for a in rows if a.reason is not None)),
            "accepted_by_round": dict(Counter(a.index for a in accepted)),
            "mean_score": round(sum(scores) / len(scores), 3) if scores else None,
            "reference_checked": sum(a.correct is not None for a in rows),
            "verify_errors": sum(_reject_code(a.reason) == "verify_error" for a in rows)}


def run(cfg: SolveConfig, run_dir: Path, engine: Callable[[str], Backend]) -> dict[str, Any]:
    """Solve queries.jsonl (using tags.jsonl) into solve.jsonl; resumable by (id, round)."""
    run_dir = Path(run_dir)
    out_path = run_dir / "solve.jsonl"
    queries = list(read_rows(run_dir / "queries.jsonl", Query))
    skipped_off = 0
    if cfg.queries == "not_off_candidates":
        off = {t.id for t in read_rows(run_dir / "tags.jsonl", Tags) if t.think_off_candidate}
        skipped_off = sum(q.id in off for q in queries)
        queries = [q for q in queries if q.id not in off]
    repair_tail(out_path)
    existing = {(a.id, a.index) for a in read_rows(out_path, Attempt)} if out_path.is_file() else set()
    done = {a.id for a in read_rows(out_path, Attempt) if a.reason is None or a.index >= cfg.rounds} \
        if out_path.is_file() else set()
    todo = [q for q in queries if q.id not in done]
    calls, usage = Counter(), Counter()
    isolation = Verifier(cfg.verify).code_isolation(todo) if cfg.check_reference else None  # before any model loads
    verifier = Verifier(cfg.verify, grader=engine(cfg.grader_engine) if cfg.grader_engine and todo else None)
    t0 = time.perf_counter()
    checked = failed = 0
    with RowWriter(out_path) as w:
        for i in range(0, len(todo), cfg.chunk_size):
            for rows in solve_rounds(todo[i:i + cfg.chunk_size], cfg, engine, calls, usage, verifier):
                # a round whose verifications failed too often stops the run before its rows are written
                errs = sum(_reject_code(a.reason) == "verify_error" for a in rows)
                checked, failed = checked + errs + sum(a.correct is not None for a in rows), failed + errs
                check_error_share(failed, checked, cfg.verify, "solve")
                w.write_all(a for a in rows if (a.id, a.index) not in existing)
            log.info("solved %d/%d", min(i + cfg.chunk_size, len(todo)), len(todo))
    secs = time.perf_counter() - t0
    stats = solve_stats(list(read_rows(out_path, Attempt)), cfg) if out_path.is_file() else {}
    stats.update(rows_in=len(queries) + skipped_off, skipped_off_candidates=skipped_off, queries_new=len(todo),
                 calls=dict(calls), tokens=dict(usage), seconds=round(secs, 3),
                 queries_per_s=round(len(todo) / secs, 3) if todo and secs > 0 else None)
    if isolation:
        stats = {"sandbox": isolation, **stats}
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="katdata solve", description="Write think-on traces with the multi-agent solver.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--backend", default="transformers", help="transformers | vllm | openai")
    ap.add_argument("--model", default=None, help="model name or folder (default: the embedded model)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=7.0)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--only-reasoning", action="store_true", help="skip the think-off candidates of tags.jsonl")
    args = ap.parse_args(argv)
    cfg = SolveConfig(rounds=args.rounds, threshold=args.threshold, max_tokens=args.max_tokens,
                      queries="not_off_candidates" if args.only_reasoning else "all")
    print(json.dumps(run(cfg, args.run_dir, engine_factory(args.backend, args.model)), indent=2))
    return 0
