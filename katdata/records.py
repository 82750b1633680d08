"""Row types of every stage, validated at the file boundaries (pydantic, ``extra="forbid"``).

Data flows one way; each stage writes one JSONL file of one of these rows:

    queries.jsonl (Query) -> tags.jsonl (Tags) -> solve.jsonl (Attempt, source="solver")
    -> samples.jsonl (Attempt, source="vote") -> votes.jsonl (Vote) -> records.jsonl (KatRecord)
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["on", "off"]
Kind = Literal["math", "numeric", "choice", "exact", "code", "open"]
# who chose a record's mode: the vote over verified samples, the tagger's prior (no sample was correct),
# the exploration draw (a random mode), or a human reviewer
LabelSource = Literal["vote", "prior", "exploration", "human"]
# where a record's think/answer text came from: a vote sample of the model, the solver team's accepted
# attempt, or the query's reference (its worked solution and answer)
ContentSource = Literal["sample", "solver", "reference"]


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


def stable_id(text: str) -> str:
    """A stable id for a query without one: a short hash of its text."""
    return "q-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Query(Row):
    id: str = Field(description="unique query id (a hash of the text when the input has none)")
    query: str = Field(description="the user's query text")
    system: Optional[str] = Field(None, description="optional system prompt")
    reference: Optional[str] = Field(None, description="reference answer, or test code for kind=code")
    kind: Optional[Kind] = Field(None, description="how the answer is verified")
    source: Optional[str] = Field(None, description="where the query came from (file or dataset)")
    meta: dict[str, Any] = Field(default_factory=dict, description="anything else the input carried")


class Tags(Row):
    id: str
    domain: str
    task_type: str
    difficulty: int = Field(ge=1, le=5)
    needs_reasoning: bool
    p_reasoning: float = Field(ge=0.0, le=1.0, description="probability that the query needs reasoning")
    p_llm: Optional[float] = Field(None, ge=0.0, le=1.0, description="the LLM tagger's own p, before combining")
    p_uncalibrated: Optional[float] = Field(None, ge=0.0, le=1.0,
                                            description="the tagger's p before a calibration fit replaced it")
    verifiability: Literal["reference", "tests", "grader", "none"]
    language: str
    think_off_candidate: bool = Field(False, description="tagged as needing no reasoning, confidently")
    source: Literal["rule", "llm", "combined"] = "rule"
    rule: dict[str, Any] = Field(default_factory=dict, description="the rule prior's own tags")
    llm_raw: Optional[str] = Field(None, description="the LLM tagger's raw reply, kept always")
    llm_error: Optional[str] = Field(None, description="why the LLM reply did not parse")


class Segment(Row):
    role: str = Field(description="solver, thinker, critic, judge or sampler")
    round: int = 0
    model: str = ""
    text: str = ""


class Attempt(Row):
    id: str = Field(description="the query id")
    index: int = Field(0, description="sample index within (query, mode)")
    source: Literal["vote", "solver"] = "vote"
    mode: Mode
    text: str = Field(description="the model's raw completion (after the prefix)")
    response: Optional[str] = Field(None, description="the full KAT response, prefix included")
    think: Optional[str] = None
    answer: Optional[str] = None
    finish_reason: Optional[str] = None
    ok: bool = Field(False, description="the response parsed cleanly")
    errors: list[str] = Field(default_factory=list)
    correct: Optional[bool] = Field(None, description="verifier verdict; None when unverifiable")
    answer_class: Optional[str] = Field(None, description="equivalence class of the answer")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    score: Optional[float] = Field(None, description="critic score (solver attempts)")
    reason: Optional[str] = Field(None, description="why it was rejected, when it was")
    segments: list[Segment] = Field(default_factory=list)


class Vote(Row):
    id: str
    label: Optional[Mode] = Field(None, description="the chosen mode, None when dropped")
    reason: str = Field(description="why this label (pass rates, exploration, prior, dropped)")
    label_source: Optional[LabelSource] = Field(None, description="who chose the label; None when dropped")
    explored: bool = False
    n_on: int = 0
    n_off: int = 0
    p_on: float = 0.0
    p_off: float = 0.0
    margin: float = 0.0
    delta: float = 0.0
    entropy_on: float = 0.0
    entropy_off: float = 0.0
    classes_on: dict[str, int] = Field(default_factory=dict)
    classes_off: dict[str, int] = Field(default_factory=dict)
    tokens_on: float = 0.0
    tokens_off: float = 0.0
    samples_used: int = 0
    samples_saved: int = 0
    chosen_index: Optional[int] = None
    chosen_source: Optional[Literal["vote", "solver"]] = None
    review: bool = False


class Change(Row):
    field: str
    old: Any = None
    new: Any = None
    annotator: Optional[str] = None
    at: Optional[str] = None


class KatRecord(Row):
    id: str
    query: str
    system: Optional[str] = None
    mode: Mode
    judge: str
    think: Optional[str] = None
    answer: str
    response: str = Field(description="the byte-exact KAT response")
    reference: Optional[str] = None
    kind: Optional[Kind] = None
    label_source: Optional[LabelSource] = Field(None, description="who chose the mode (None: not recorded)")
    content_source: Optional[ContentSource] = Field(None, description="where think/answer came from (None: not recorded)")
    tags: dict[str, Any] = Field(default_factory=dict)
    vote: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    changes: list[Change] = Field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The chat for SFT: optional system, the user query, the full KAT response."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.query}, {"role": "assistant", "content": self.response}]


def decide(p_on: float, p_off: float, delta: float) -> str:
    """The vote's rule: think-off when its pass rate is within delta of think-on's (ties go to the cheaper mode)."""
    return "off" if p_off >= p_on - delta - 1e-12 else "on"
