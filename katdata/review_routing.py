"""Which records need a human, and which of those hold the export back until a reviewer answered.

Routing (`route`) is pure and deterministic: `katdata review push` sends the routed records to
Argilla. A record *waits* when a blocking reason routed it (the vote's own ``review`` flag, from
``vote.none_correct: review``, always blocks; ``review.blocking`` adds rules) and no reviewer has
answered it yet (a merged answer leaves a dict under ``provenance.review``). Export and train leave
waiting records out unless the recipe says ``export.require_review: false``.

Vote margins are measured against the vote's decision boundary: `vote.decide` picks think-off when
``p_on - p_off <= delta``, so the signed distance ``p_on - p_off - delta`` is > 0 on the think-on
side and <= 0 on the think-off side; its absolute value says how clear the case is.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from katdata.records import Attempt, Vote
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)

ANNOTATION_DIR = Path(__file__).resolve().parent.parent / "annotation"
Rule = Literal["low_margin", "tagger_disagrees", "verifier_conflict", "explored", "audit"]
WAIT_HINT = "katdata review push, answer in Argilla, then katdata review pull"


class ReviewConfig(BaseModel):
    """The recipe's ``review:`` section."""

    model_config = ConfigDict(extra="forbid")

    api_url: Optional[str] = Field(None, description="Argilla API URL; ARGILLA_API_URL overrides it")
    api_key: Optional[SecretStr] = Field(
        None, description="Argilla API key; ARGILLA_API_KEY overrides it (prefer the variable: recipes get copied)"
    )
    workspace: str = Field("katdata", description="Argilla workspace, created when missing")
    dataset: Optional[str] = Field(None, description="dataset name; default katdata-<run folder>-v<settings version>")
    settings: Path = Field(ANNOTATION_DIR / "dataset.yaml", description="the dataset layout file")
    route: Literal["policy", "all"] = Field("policy", description="'all' pushes every record, 'policy' only those below")
    margin_below: float = Field(
        0.2, ge=0, le=1, description="route records whose vote lies closer than this to the decision boundary "
        "(|p_on - p_off - delta|; a unanimous vote is far from it)")
    disagreement: bool = Field(True, description="route records where the tagger and the vote disagree on the mode")
    verifier_conflict: bool = Field(
        True, description="route records whose answer the verifier did not confirm, or whose modes' answers differ"
    )
    explored: bool = Field(True, description="route records whose mode was drawn at random (exploration)")
    audit_share: float = Field(0.05, ge=0, le=1, description="share of the other records routed at random for audit")
    seed: int = Field(0, description="seed of the audit draw (stable per record id)")
    timeout_s: int = Field(30, ge=1, description="HTTP timeout per request, seconds")
    blocking: list[Rule] = Field(
        default_factory=list, description="routing rules whose records are held back from export and training until "
        "a reviewer answered them; records the vote flagged (vote.none_correct: review) always are")

    @model_validator(mode="after")
    def _blocking_rules_on(self):
        enabled = {"low_margin": self.margin_below > 0, "tagger_disagrees": self.disagreement,
                   "verifier_conflict": self.verifier_conflict, "explored": self.explored,
                   "audit": self.audit_share > 0}
        off = [r for r in self.blocking if not enabled[r]]
        if off:
            raise ValueError(f"blocking lists {', '.join(off)}, but that routing rule is switched off")
        return self


# ---------------------------------------------------------------- the vote's evidence


def boundary_distance(vote: dict) -> Optional[float]:
    """Signed distance of a vote from its decision boundary (> 0: think-on side); None without pass rates."""
    p_on, p_off = vote.get("p_on"), vote.get("p_off")
    if isinstance(p_on, (int, float)) and isinstance(p_off, (int, float)):
        diff = p_on - p_off
    elif isinstance(vote.get("margin"), (int, float)):  # a vote row with the margin only
        diff = vote["margin"]
    else:
        return None
    delta = vote.get("delta")
    return float(diff - (delta if isinstance(delta, (int, float)) else 0.0))


def mode_confidence(vote: dict, mode: str) -> Optional[float]:
    """How strongly the vote backs ``mode``, in [0, 1]: 0.5 on the boundary, 1 for a unanimous vote
    for it, 0 for a unanimous vote against it. None when the vote carries no evidence (no pass
    rates, or no correct sample at all)."""
    d = boundary_distance(vote)
    if d is None or (vote.get("p_on") == 0 and vote.get("p_off") == 0):
        return None
    delta = vote.get("delta") if isinstance(vote.get("delta"), (int, float)) else 0.0
    reach = (1 - delta) if d > 1e-12 else (1 + delta)  # the largest distance possible on this side (ties: off)
    conf_on = min(1.0, max(0.0, 0.5 + 0.5 * d / max(reach, 1e-9)))
    return conf_on if mode == "on" else 1.0 - conf_on


# ---------------------------------------------------------------- routing


def verdict_index(records, votes: dict[str, Vote], attempts: dict[str, list[Attempt]]) -> dict:
    """Per record id: the verifier's verdict on the chosen response and its token count, when known."""
    out = {}
    for rec in records:
        info = {"correct": rec.provenance.get("correct"), "tokens": rec.provenance.get("completion_tokens")}
        vote = votes.get(rec.id)
        if vote is not None and vote.chosen_index is not None:
            for a in attempts.get(rec.id, []):
                if (a.index, a.mode, a.source) == (vote.chosen_index, rec.mode, vote.chosen_source or a.source):
                    info["correct"] = a.correct if info["correct"] is None else info["correct"]
                    info["tokens"] = info["tokens"] or a.completion_tokens or None
                    break
        out[rec.id] = info
    return out


def _audit(rec_id: str, cfg: ReviewConfig) -> bool:
    digest = hashlib.sha256(f"{cfg.seed}:{rec_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.audit_share


def route(rec, vote: Optional[Vote], verdict: dict, cfg: ReviewConfig) -> list[str]:
    """Why this record needs a human (empty: it does not). Deterministic, so pushes repeat."""
    if cfg.route == "all":
        return ["all"]
    v = vote.model_dump() if vote else dict(rec.vote)
    reasons = []
    if v.get("review"):
        reasons.append("vote_flag")
    distance = boundary_distance(v)
    if distance is not None and abs(distance) < cfg.margin_below:
        reasons.append("low_margin")
    needs = rec.tags.get("needs_reasoning")
    if cfg.disagreement and isinstance(needs, bool) and needs != (rec.mode == "on"):
        reasons.append("tagger_disagrees")
    if cfg.verifier_conflict:
        top_on, top_off = (max(c, key=c.get) if c else None for c in (v.get("classes_on"), v.get("classes_off")))
        if verdict.get("correct") is False or (top_on and top_off and top_on != top_off):
            reasons.append("verifier_conflict")
    if cfg.explored and v.get("explored"):
        reasons.append("explored")
    if not reasons and _audit(rec.id, cfg):
        reasons.append("audit")
    return reasons


def blocks(reasons: Iterable[str], cfg: ReviewConfig) -> bool:
    """True when one of these routing reasons holds the record back until a reviewer answered."""
    return any(r == "vote_flag" or r in cfg.blocking for r in reasons)


def answered(rec) -> bool:
    """A reviewer's answer was merged into this record (`katdata review pull`)."""
    return isinstance(rec.provenance.get("review"), dict)


# ---------------------------------------------------------------- the run's policy and its waiting records


def hold_policy(review: Optional[ReviewConfig], require_review: bool) -> Optional[ReviewConfig]:
    """The policy records wait for review under before export and train take them (the recipe's ``review:``
    section, its defaults without one); None when ``export.require_review`` is false: nothing waits."""
    return (review or ReviewConfig()) if require_review else None


class _Routed(BaseModel):
    """What routing reads of a record; the texts are skipped unparsed."""

    model_config = ConfigDict(extra="ignore")
    id: str
    mode: Any = None
    tags: dict[str, Any] = Field(default_factory=dict)
    vote: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


class _Flagged(BaseModel):
    """The vote's review flag and the merged answer of a record, parsed straight from its JSON line."""

    class _Vote(BaseModel):
        model_config = ConfigDict(extra="ignore")
        review: Any = False

    class _Prov(BaseModel):
        model_config = ConfigDict(extra="ignore")
        review: Any = None

    model_config = ConfigDict(extra="ignore")
    id: str
    vote: _Vote = Field(default_factory=_Vote)
    provenance: _Prov = Field(default_factory=_Prov)


_FLAG = re.compile(rb'"review"\s*:\s*true')


def _flagged(src: Path) -> set[str]:
    """Ids the vote flagged and no reviewer answered; lines that do not parse are left to the readers
    that name them (export, train)."""
    out: set[str] = set()
    if not Path(src).is_file():
        return out
    with open(src, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()  # whole lines only
            if _FLAG.search(block):  # most blocks: no review flag anywhere, no line to look at
                _flagged_lines(block.split(b"\n"), out)
    return out


_BLOCK = 1 << 22


def _flagged_lines(lines: list[bytes], out: set[str]) -> None:
    for raw in lines:
        if not _FLAG.search(raw):
            continue
        try:
            r = _Flagged.model_validate_json(raw)
        except ValidationError:
            continue
        if waits_for_review(r.vote.review, r.provenance.review):
            out.add(r.id)


def waits_for_review(vote_review: Any, provenance_review: Any) -> bool:
    """The vote's flag rule: the vote flagged the record (``review`` is true) and no reviewer answered it (the
    merge puts the answer, an object, under provenance's ``review``)."""
    return vote_review is True and not isinstance(provenance_review, dict)


def _rows(path: Path, model) -> Iterable:
    from katdata.runfiles import read_rows

    return read_rows(path, model) if Path(path).is_file() else []


def waiting(run_dir: Path, src: Path, cfg: Optional[ReviewConfig]) -> set[str]:
    """Ids of the records in ``src`` that a blocking reason of ``cfg`` routed and no reviewer answered yet (none
    when ``cfg`` is None: see :func:`hold_policy`)."""
    if cfg is None:
        return set()
    run_dir = Path(run_dir)
    cfg = cfg.model_copy(update={"route": "policy"})
    if not cfg.blocking:  # the vote's flag alone: one light pass over the records (assemble copied the vote in)
        return _flagged(src)
    votes = {v.id: v for v in _rows(RunFolder(run_dir).votes, Vote)}
    attempts: dict[str, list[Attempt]] = {}
    if {"verifier_conflict", "audit"} & set(cfg.blocking):  # only these read the attempts
        for path in (RunFolder(run_dir).samples, RunFolder(run_dir).solve):
            for a in _rows(path, Attempt):
                attempts.setdefault(a.id, []).append(a)
    out = set()
    for rec in _rows(src, _Routed):
        if answered(rec):
            continue
        verdict = verdict_index([rec], votes, attempts)[rec.id]
        if blocks(route(rec, votes.get(rec.id), verdict, cfg), cfg):
            out.add(rec.id)
    return out
