"""Two-mode majority voting (kat-format.md section 5): pure functions, plus the stage that runs them.

For each query, N samples per mode (samples.jsonl) carry a verdict (``correct``) and an answer
class (``answer_class``, ``verify.INVALID`` for no answer). The label is think-off when
``p_off >= p_on - delta``, else think-on. The invalid class never wins a consensus; when no
sample is correct the recipe drops the query, uses the tagger's prior, or sends it to review.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata.errors import InputError
from katdata.stage import Context, Stage
from katdata.records import Attempt, Query, Tags, Vote, decide  # noqa: F401 (decide: the vote rule, re-exported)
from katdata.runfiles import RowIndex, RowWriter, done_keys
from katdata.verify import INVALID, taken_by_last_number
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)


class VoteConfig(BaseModel):
    """How the mode label is chosen from the samples."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(8, ge=1, description="samples per mode the sampler aimed for (to count samples saved)")
    delta: float = Field(0.1, ge=0, le=1, description="think-off wins when p_off >= p_on - delta (prefer the cheaper mode)")
    none_correct: Literal["drop", "prior", "review"] = Field(
        "drop", description="when no sample is correct: drop the query, use the tagger's prior, or send to review")
    explore_share: float = Field(0.01, ge=0.0, le=1.0, description="share of queries given a random mode")
    seed: int = Field(0, description="seed of the exploration draw")


@dataclass
class ModeStats:
    n: int
    correct: int
    classes: dict[str, int]
    pass_rate: float
    entropy: float
    tokens: float


def valid(a: Attempt) -> bool:
    """A sample counts as an answer: it has one, in a class, and was not cut off."""
    return a.answer_class not in (None, INVALID) and not (a.finish_reason == "length" and a.answer is None)


def consensus(attempts: list[Attempt]) -> Optional[str]:
    """The majority answer class over all samples; the invalid class never wins; ties by key."""
    counts = Counter(a.answer_class for a in attempts if valid(a))
    if not counts:
        return None
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def entropy(counts: dict[str, int]) -> float:
    """Shannon entropy (bits) of the class distribution, invalid class included."""
    total = sum(counts.values())
    return 0.0 - sum(c / total * math.log2(c / total) for c in counts.values() if c) if total else 0.0


def verdicts(attempts: list[Attempt]) -> tuple[list[bool], Optional[str]]:
    """Per sample: correct or not. Against the reference when any verdict exists, else against
    the consensus class (self-consistency); returns the pseudo-reference class in that case."""
    if any(a.correct is not None for a in attempts):
        return [bool(a.correct) and a.answer is not None for a in attempts], None
    pseudo = consensus(attempts)
    return [pseudo is not None and a.answer_class == pseudo for a in attempts], pseudo


def mode_stats(attempts: list[Attempt], ok: list[bool]) -> ModeStats:
    n = len(attempts)
    classes = dict(Counter(a.answer_class or INVALID for a in attempts))
    tokens = sum(a.completion_tokens for a in attempts) / n if n else 0.0
    good = sum(ok)
    return ModeStats(n=n, correct=good, classes=classes, pass_rate=good / n if n else 0.0,
                     entropy=entropy(classes), tokens=tokens)


def explore_mode(qid: str, share: float, seed: int) -> Optional[str]:
    """A seeded, order-independent draw: a random mode for about ``share`` of the queries."""
    rng = random.Random(f"{seed}:explore:{qid}")
    return rng.choice(["on", "off"]) if rng.random() < share else None


def shortest_correct(attempts: list[Attempt], ok: list[bool]) -> Optional[Attempt]:
    """The shortest correct sample (tokens, then characters, then index)."""
    good = [a for a, g in zip(attempts, ok) if g]
    return min(good, key=lambda a: (a.completion_tokens, len(a.text), a.index)) if good else None


def prior_mode(tags: Optional[Tags]) -> Optional[str]:
    if tags is None:
        return None
    return "on" if tags.needs_reasoning or tags.p_reasoning >= 0.5 else "off"


def vote(qid: str, attempts: list[Attempt], cfg: VoteConfig, tags: Optional[Tags] = None) -> Vote:
    """The Vote row of one query from its samples (both modes)."""
    on = sorted((a for a in attempts if a.mode == "on"), key=lambda a: a.index)
    off = sorted((a for a in attempts if a.mode == "off"), key=lambda a: a.index)
    ok, pseudo = verdicts(on + off)
    ok_on, ok_off = ok[: len(on)], ok[len(on):]
    s_on, s_off = mode_stats(on, ok_on), mode_stats(off, ok_off)
    basis = f"consensus '{pseudo}'" if pseudo is not None else "reference"
    row = dict(id=qid, n_on=s_on.n, n_off=s_off.n, p_on=s_on.pass_rate, p_off=s_off.pass_rate,
               margin=s_on.pass_rate - s_off.pass_rate, delta=cfg.delta, entropy_on=s_on.entropy,
               entropy_off=s_off.entropy, classes_on=s_on.classes, classes_off=s_off.classes,
               tokens_on=s_on.tokens, tokens_off=s_off.tokens, samples_used=s_on.n + s_off.n,
               samples_saved=max(0, 2 * cfg.n - s_on.n - s_off.n))
    if s_on.correct + s_off.correct == 0:
        prior = prior_mode(tags)
        if cfg.none_correct == "review":
            return Vote(label=prior, reason=f"no correct sample ({basis}); sent to review", review=True,
                        label_source="prior" if prior else None, **row)
        if cfg.none_correct == "prior" and prior is not None:
            return Vote(label=prior, reason=f"no correct sample ({basis}); tagger prior", label_source="prior", **row)
        return Vote(label=None, reason=f"no correct sample ({basis}); dropped", **row)
    label = decide(s_on.pass_rate, s_off.pass_rate, cfg.delta)
    reason = f"p_on={s_on.pass_rate:.3f} p_off={s_off.pass_rate:.3f} delta={cfg.delta} vs {basis}"
    explored = explore_mode(qid, cfg.explore_share, cfg.seed)
    if explored is not None:
        label, reason = explored, f"exploration (random mode); vote said {label}: {reason}"
    pick = shortest_correct(on, ok_on) if label == "on" else shortest_correct(off, ok_off)
    return Vote(label=label, reason=reason, explored=explored is not None,
                label_source="exploration" if explored is not None else "vote",
                chosen_index=pick.index if pick else None, chosen_source="vote" if pick else None, **row)


# ---------------------------------------------------------------- early stopping

def rate_bounds(s: int, n: int, confidence: float) -> tuple[float, float]:
    """A Wilson interval for a pass rate; [0, 1] at confidence 1 (the worst case)."""
    if n == 0 or confidence >= 1.0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = s / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def settled(s_on: int, n_on: int, s_off: int, n_off: int, n_max: int, delta: float, confidence: float) -> bool:
    """True when the label after ``n_max`` samples per mode cannot differ from the label now,
    for any outcome of the remaining samples whose pass rate lies in the confidence interval.
    No correct sample yet never settles (a later correct one could change the outcome)."""
    if s_on + s_off == 0:
        return n_on >= n_max and n_off >= n_max
    final = []
    for s, n in ((s_on, n_on), (s_off, n_off)):
        lo, hi = rate_bounds(s, n, confidence)
        rest = max(0, n_max - n)
        total = max(n, n_max)
        final.append(((s + rest * lo) / total, (s + rest * hi) / total))
    (on_lo, on_hi), (off_lo, off_hi) = final
    now = decide(s_on / max(n_on, 1), s_off / max(n_off, 1), delta)
    if now == "off":
        return off_lo >= on_hi - delta - 1e-12
    return off_hi < on_lo - delta - 1e-12


# ---------------------------------------------------------------- the stage

def run(cfg: VoteConfig, run_dir: Path, engine=None) -> dict:
    """samples.jsonl (+ tags.jsonl when present) -> votes.jsonl; skips ids already voted."""
    run_dir = Path(run_dir)
    if not (RunFolder(run_dir).samples).is_file():
        raise InputError(RunFolder(run_dir).samples, "file not found")
    # indexes of the files, not their rows: each query's samples are read back when it is voted
    samples = RowIndex(RunFolder(run_dir).samples, Attempt)
    tags = RowIndex(RunFolder(run_dir).tags, Tags)
    queries = RowIndex(RunFolder(run_dir).queries, Query)  # the kinds, to count last-number answers apart
    done = done_keys(RunFolder(run_dir).votes)
    stats = Counter()
    with RowWriter(RunFolder(run_dir).votes) as out:
        for qid in samples.keys():
            attempts = [a for a in samples.get(qid) if a.source == "vote"]
            if not attempts:
                continue
            stats["rows_in"] += 1
            if qid in done:
                stats["skipped"] += 1
                continue
            v = vote(qid, attempts, cfg, tags.one(qid))
            out.write(v)
            stats["rows_out"] += 1
            stats[f"label_{v.label}"] += 1
            if v.label is not None:
                stats[f"label_source_{v.label_source}"] += 1
            stats["explored"] += v.explored
            stats["review"] += v.review
            stats["samples_used"] += v.samples_used
            stats["samples_saved"] += v.samples_saved
            q = queries.one(qid)
            taken = [a for a in attempts if valid(a) and taken_by_last_number(q and q.kind, a.answer)]
            stats["last_number_answers"] += len(taken)  # numeric answers valid only by verify.numeric_extraction
            stats["last_number_correct"] += sum(bool(a.correct) for a in taken)  # = last_number: counted apart
    samples.close()
    tags.close()
    queries.close()
    return {"rows_in": stats.pop("rows_in", 0), **stats}


def _stage_run(ctx: Context) -> dict:
    from katdata.calibrate import after_vote  # the tagger fitted to the vote's outcomes (calibration.json)

    stats = run(ctx.cfg, ctx.folder.root)
    stats["calibration"] = after_vote(ctx.folder.root, ctx.section("tag").think_off_threshold)
    return stats


STAGE = Stage("vote", "majority vote over verified samples: the mode labels", _stage_run, VoteConfig,
              reads=("samples",), may_read=("tags", "queries"), writes=("votes", "calibration", "calibration_plot"),
              maybe_writes=("calibration_plot",), sections=("tag",))
