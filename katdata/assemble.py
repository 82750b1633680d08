"""Assembly: the cold-start KAT records, rendered byte-exact and re-checked with the parser.

For each labelled vote with an accepted judge rationale: think-off takes the answer of the vote's
chosen (shortest correct) sample; think-on takes its think text and answer from the solver's
accepted attempts (solve.jsonl) or from the vote samples, as ``think_source`` says. The response is
``template.render``-ed, then checked to parse back to the same fields (katdata.kat_bulk, exact; the
parser names what is wrong): any difference rejects the record. Every
query that yields no record lands in rejects.jsonl with its stage and reason. Each record says who
chose its label (``label_source``) and where its text came from (``content_source``), and its
``provenance`` names the engines, models and prompts behind it (katdata/provenance.py). The stage ends
with the mode-collapse check (katdata/balance.py), before anything is exported.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata import kat_bulk, template
from katdata.assemble_rows import RecordWriter
from katdata.balance import check_balance
from katdata.errors import InputError
from katdata.judge import JudgeRow
from katdata.provenance import RunInfo
from katdata.stage import Context, Stage
from katdata.records import Attempt, KatRecord, Query, Tags, Vote
from katdata.runfiles import RowIndex, RowWriter, count_rows, done_keys, dump, read_rows
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)


class AssembleConfig(BaseModel):
    """Settings of the assembly stage (the recipe's ``assemble:`` section)."""

    model_config = ConfigDict(extra="forbid")

    think_source: Literal["solver", "vote", "solver_then_vote", "vote_then_solver"] = Field(
        "solver_then_vote", description="where think-on content comes from: the solver's accepted traces, "
        "the vote's shortest correct think-on sample, or one then the other")
    require_clean_parse: bool = Field(False, description="use only vote samples whose raw response parsed cleanly")
    reference_fallback: bool = Field(
        False, description="when no verified sample of the chosen mode exists, use the query's reference as the "
        "teacher: its worked solution (meta.solution, e.g. GSM8K's) as the think text and the reference answer; "
        "marked content_source=reference")
    max_mode_loss: float = Field(
        0.5, ge=0.0, le=1.0, description="stop before export when assembly lost more than this share of a mode's "
        "labelled queries (no content, rejected renders, judge rejects)")
    min_mode_share: float = Field(
        0.1, ge=0.0, le=1.0, description="stop before export when a mode the vote labelled makes up less than this "
        "share of the records")
    accept_imbalance: bool = Field(
        False, description="export even when a mode collapsed (max_mode_loss / min_mode_share); the card records it")


CALC_NOTE = re.compile(r"<<[^<>]*>>")


def reference_pick(q: Query, mode: str) -> Optional[Attempt]:
    """An attempt built from the query's reference (a worked solution for think-on), or None."""
    if not q.reference or q.kind not in ("numeric", "math", "exact", "choice"):
        return None
    think = None
    if mode == "on":
        solution = q.meta.get("solution")
        if not isinstance(solution, str):
            return None
        think = CALC_NOTE.sub("", solution.split("####")[0]).strip()
        if not think:
            return None
    return Attempt(id=q.id, index=-1, source="vote", mode=mode, text="", think=think, answer=q.reference, ok=True,
                   correct=True)


def _rows(path: Path, model):
    """The rows of a stage file, streamed (as its model's msgspec mirror reads them: katdata.fast_rows); none when the
    file is not there."""
    return read_rows(path, model, fast=True) if path.is_file() else iter(())


def solver_pick(attempts: list[Attempt]) -> Optional[Attempt]:
    """The solver's accepted attempt with a think text and an answer (highest score, then shortest)."""
    good = [a for a in attempts if a.reason is None and a.think and a.answer and a.correct is not False]
    return min(good, key=lambda a: (-(a.score or 0.0), a.completion_tokens, a.index)) if good else None


def content(vote: Vote, samples: list[Attempt], solver: list[Attempt], cfg: AssembleConfig,
            q: Optional[Query] = None) -> tuple[Optional[Attempt], str]:
    """The attempt whose think/answer the record uses, and where it came from ("sample", "solver",
    "reference"), or None and why there is none."""
    pick, source = _sampled_content(vote, samples, solver, cfg)
    if pick is None and cfg.reference_fallback and q is not None:
        ref = reference_pick(q, vote.label)
        if ref is not None:
            return ref, "reference"
    return pick, source


def _sampled_content(vote: Vote, samples: list[Attempt], solver: list[Attempt],
                     cfg: AssembleConfig) -> tuple[Optional[Attempt], str]:
    chosen = next((a for a in samples if a.mode == vote.label and a.index == vote.chosen_index), None)
    if chosen is not None and cfg.require_clean_parse and not chosen.ok:
        chosen = None
    if vote.label == "off":
        return (chosen, "sample") if chosen else (None, "no correct think-off sample")
    order = {"solver": ["solver"], "vote": ["vote"], "solver_then_vote": ["solver", "vote"],
             "vote_then_solver": ["vote", "solver"]}[cfg.think_source]
    for src in order:
        pick = solver_pick(solver) if src == "solver" else (chosen if chosen and chosen.think else None)
        if pick is not None:
            return pick, "sample" if src == "vote" else src
    return None, f"no think-on content ({cfg.think_source})"


def label_source(vote: Vote) -> str:
    """Who chose the vote's label (votes written before katdata recorded it: read from the row)."""
    if vote.label_source:
        return vote.label_source
    return "exploration" if vote.explored else "prior" if vote.reason.startswith("no correct sample") else "vote"


def agents(pick: Attempt, source: str) -> list[str]:
    """The roles that wrote the think/answer text: the solver team's segments, the sampler, or none."""
    if source == "solver":
        return list(dict.fromkeys(s.role for s in pick.segments)) or ["solver"]
    return ["sampler"] if source == "sample" else []


def build(q: Query, vote: Vote, judge: JudgeRow, pick: Attempt, source: str,
          tags: Optional[Tags], info: Optional[RunInfo] = None) -> KatRecord:
    """Render and re-check one record; raises template.TemplateError with the reason."""
    answer = pick.answer.strip("\n")
    think = pick.think.strip("\n") if vote.label == "on" and pick.think else None
    response = kat_bulk.render_checked(vote.label, judge.rationale, answer, think)  # parses back to the same fields
    labelled_by = label_source(vote)
    roles = (info or RunInfo(None)).record(labelled_by, source, agents(pick, source), tags.source if tags else None)
    return KatRecord(id=q.id, query=q.query, system=q.system, mode=vote.label, judge=judge.rationale, think=think,
                     answer=answer, response=response, reference=q.reference, kind=q.kind,
                     label_source=labelled_by, content_source=source,
                     tags=dump(tags) if tags else {},
                     vote=dump(vote),
                     provenance={"source": q.source, **roles, "attempt_index": pick.index,
                                 "attempt_mode": pick.mode, "correct": pick.correct,
                                 "completion_tokens": pick.completion_tokens,
                                 "judge_tries": len(judge.attempts), "explored": vote.explored,
                                 "review": vote.review})


def run(cfg: AssembleConfig, run_dir: Path, engine=None, info: Optional[RunInfo] = None) -> dict:
    """queries + votes + judges (+ samples, solve, tags) -> records.jsonl and rejects.jsonl."""
    run_dir = Path(run_dir)
    if not (RunFolder(run_dir).queries).is_file():
        raise InputError(RunFolder(run_dir).queries, "file not found")
    # votes are streamed; every other file is an index (rows read back by id), each checked here, before any work;
    # rows are read as their models' msgspec mirrors where those read them (katdata.fast_rows: the same values)
    queries = RowIndex(RunFolder(run_dir).queries, Query, fast=True)
    n_votes = count_rows(RunFolder(run_dir).votes, Vote) if RunFolder(run_dir).votes.is_file() else 0
    judges = RowIndex(RunFolder(run_dir).judges, JudgeRow, fast=True)
    tags = RowIndex(RunFolder(run_dir).tags, Tags, fast=True)
    samples = RowIndex(RunFolder(run_dir).samples, Attempt, fast=True)
    solve = RowIndex(RunFolder(run_dir).solve, Attempt, fast=True)
    done = done_keys(RunFolder(run_dir).records) | done_keys(RunFolder(run_dir).rejects)
    info = info or RunInfo(None)  # the engines and prompts of the run, for each record's provenance
    stats: Counter = Counter()
    rejects: Counter = Counter()
    with RecordWriter(RunFolder(run_dir).records) as rec_out, RowWriter(RunFolder(run_dir).rejects) as rej_out, \
            kat_bulk.gc_paused():
        def reject(qid: str, stage: str, reason: str, raw=None) -> None:
            rej_out.write({"id": qid, "stage": stage, "reason": reason, "raw": raw})
            rejects[f"{stage}: {reason.split(':')[0]}"] += 1

        for vote in _rows(RunFolder(run_dir).votes, Vote):
            if vote.id in done or vote.id not in queries:
                continue
            q = queries.one(vote.id)
            if vote.label is None:
                reject(q.id, "review" if vote.review else "vote", vote.reason, dump(vote))
                continue
            judge = judges.one(q.id)
            if judge is None or not judge.ok or not judge.rationale:
                reason = judge.reason if judge else "no judge rationale"
                reject(q.id, "judge", reason or "no judge rationale", judge.attempts if judge else None)
                continue
            solver = [a for a in solve.get(q.id, []) if a.source == "solver"]
            # of the query's samples only the vote's chosen one is read whole
            chosen = None if vote.chosen_index is None else \
                samples.first(q.id, mode=vote.label, index=vote.chosen_index)
            pick, source = content(vote, [chosen] if chosen else [], solver, cfg, q)
            if pick is None:
                reject(q.id, "assemble", source, dump(vote))
                continue
            try:
                rec = build(q, vote, judge, pick, source, tags.one(q.id), info)
            except template.TemplateError as exc:
                reject(q.id, "assemble", f"render: {exc}", {"think": pick.think, "answer": pick.answer})
                continue
            rec_out.write(rec)
            stats["rows_out"] += 1
    # the whole files, not this call's rows (a resumed run): raises KatdataError when a mode collapsed
    for index in (queries, judges, tags, samples, solve):
        index.close()
    return {"rows_in": n_votes, **stats, "rejects": dict(rejects), **check_balance(cfg, run_dir)}


def _stage_run(ctx: Context) -> dict:
    from katdata.redact import redact

    return run(ctx.cfg, ctx.folder.root, info=RunInfo(redact(ctx.recipe.model_dump(mode="json", include=set(
        ctx.stage.sections)))))


STAGE = Stage("assemble", "render the final KAT records", _stage_run, AssembleConfig,
              reads=("votes", "queries"), may_read=("judges", "tags", "samples", "solve"), writes=("records", "rejects"),
              sections=("engines", "tag", "solve", "sample", "judge"))
