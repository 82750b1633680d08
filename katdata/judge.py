"""Judge rationales: 1-3 sentences on what the query asks and why it does or does not need reasoning.

Written for the voted mode by the judge engine with an intent-aware prompt
(``prompts/judge_rationale.txt``), then the rationale check: does the rationale argue for its label?
It asks the same engine (``prompts/rationale_check.txt``, NEEDS / NOT); a reply that does not parse
falls back to the keyword reading of the rationale (``keyword_stance``, which eval uses too). A failed rationale is regenerated (``retries``), then the
query is rejected with the reason, or (``fallback: tags``) given the tags-written rationale.

``writer: tags`` writes every rationale from the query's tags instead (``prompts/judge_tags.yaml``:
one sentence on what the request asks, by task type, one on why the mode fits): for judge engines
too small to write a sound rationale, such as the embedded 135M model. No engine is loaded then.
Every reply is kept in judges.jsonl.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata import template
from katdata.errors import InputError
from katdata.backends.base import WAIT, Backend, Completion, Job, Request, SamplingParams
from katdata.records import Query, Tags, Vote
from katdata.runfiles import RowIndex, RowWriter, done_keys, read_rows
from katdata.stage import Stage
from katdata.prompt_files import read_prompt
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)

DECISION = {
    "on": ("This request needs explicit step-by-step reasoning before the answer.", "needs explicit reasoning"),
    "off": ("This request can be answered directly, without explicit reasoning.", "does not need explicit reasoning"),
}


class JudgeConfig(BaseModel):
    """Settings of the judge-rationale stage (the recipe's ``judge:`` section)."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field("default", description="engine that writes and checks rationales (e.g. a stronger 'judge' engine)")
    prompt: str = Field("judge_rationale.txt", description="prompt file of the rationale")
    rationale_check_prompt: str = Field("rationale_check.txt", description="prompt file of the rationale check "
                                        "(does the rationale argue for its label?)")
    rationale_check: Literal["llm", "keywords", "none"] = Field(
        "llm", description="how the rationale check reads which mode a rationale argues for: ask the engine "
        "(keywords when its reply does not parse), keywords only, or no check")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature of the rationale")
    max_tokens: int = Field(96, ge=8, description="token limit of a rationale")
    max_sentences: int = Field(3, ge=1, description="a rationale is cut to this many sentences")
    retries: int = Field(1, ge=0, description="regenerations of a failed rationale before rejecting")
    seed: int = Field(0, description="sampling seed (moved per retry)")
    writer: Literal["llm", "tags"] = Field("llm", description="who writes rationales: the judge engine, or a sentence "
                                           "per task type and mode from the query's tags (prompts/judge_tags.yaml), "
                                           "for engines too small to write one")
    fallback: Literal["reject", "tags"] = Field("reject", description="a rationale still failing after the retries: "
                                                "reject the query, or use the tags-written rationale")


class JudgeRow(BaseModel):
    """One row of judges.jsonl."""

    model_config = ConfigDict(extra="forbid")

    id: str
    mode: Literal["on", "off"]
    rationale: Optional[str] = Field(None, description="the accepted rationale")
    ok: bool = False
    reason: Optional[str] = Field(None, description="why no rationale was accepted")
    attempts: list[dict] = Field(default_factory=list, description="every raw reply with its verdict")


_CUT = (template.JUDGE_CLOSE, template.THINK_ON, template.THINK_OFF, template.THINK_OPEN,
        template.ANSWER_OPEN) + template.END_TOKENS
_SENT = re.compile(r"(?<=[.!?])\s+")
# Keyword cues of a rationale arguing for (on) or against (off) explicit reasoning; on-cues are read
# with negated phrases removed ("no complex reasoning is needed" is not a cue for thinking).
_CUES = {"on": re.compile(r"step|several|multi|calculat|reason(ing)? (is|it)|careful|work(ing)? (it )?(through|out)|"
                          r"deriv|prove|needs? (explicit )?reasoning", re.I),
         "off": re.compile(r"no (complex |explicit )?reasoning|not need|directly|recall|simple|"
                           r"single (well-known )?fact|lookup|would add nothing|straightforward|quick", re.I)}
_NEGATED = re.compile(r"\b(no|not|without)\b[^.;,]*", re.I)


def clean(text: str, max_sentences: int = 3) -> Optional[str]:
    """The rationale from a raw reply: cut at the first mode/closing marker or end token, the
    remaining markers removed, the first sentences kept; None when too little is left."""
    cut = min((text.find(m) for m in _CUT if m in text), default=len(text))
    text = text[:cut]
    for marker in template.MARKERS:
        text = text.replace(marker, " ")
    text = " ".join(text.split()).strip().strip('"').strip()
    sentences = [s for s in _SENT.split(text) if s.strip()]
    out = " ".join(sentences[:max_sentences]).strip()
    return out if len(out) >= 12 else None


def keyword_stance(text: Optional[str]) -> Optional[str]:
    """Which mode a rationale argues for, from its wording (a keyword heuristic): 'on' / 'off' when its
    cues point one way only, else None (unclear). The rationale check's fallback and eval's measure."""
    if not text:
        return None
    hits = {"off"} if _CUES["off"].search(text) else set()
    if _CUES["on"].search(_NEGATED.sub(" ", text)):
        hits.add("on")
    return hits.pop() if len(hits) == 1 else None


def parse_stance(reply: str) -> Optional[str]:
    """NEEDS -> 'on', NOT -> 'off'; None when neither word leads the reply."""
    m = re.search(r"\b(needs|need|not)\b", reply.lower())
    if not m:
        return None
    return "off" if m.group(1) == "not" else "on"


@functools.lru_cache(maxsize=1)
def _tags_table() -> dict:
    import yaml

    return yaml.safe_load(read_prompt("judge_tags.yaml"))


def tags_rationale(task_type: str, domain: str, mode: str) -> str:
    """The rationale for a mode written from a query's task type and domain tags (prompts/judge_tags.yaml)."""
    table = _tags_table()
    asks = table["asks"].get(task_type, table["asks"]["other"])
    why = table["why"][mode]
    return f"{asks} {why.get(task_type, why['default'])}".format(domain=domain)


def _tags_row(row: JudgeRow, tags: Tags, note: str) -> JudgeRow:
    text = tags_rationale(tags.task_type, tags.domain, row.mode)
    row.attempts.append({"raw": None, "rationale": text, "stance": keyword_stance(text), "check": "keywords",
                         "verdict": "ok", "writer": "tags", "note": note})
    row.rationale, row.ok, row.reason = text, True, None
    return row


def _chat(text: str) -> Request:
    return Request(messages=[{"role": "user", "content": text}])


def write_rationales(pairs: Iterable[tuple[Query, str]], cfg: JudgeConfig, backend: Backend,
                     on_row: Optional[Callable[[JudgeRow], None]] = None, max_open: int = 256) -> list[JudgeRow]:
    """Rationale rows for (query, mode) pairs (read lazily): write, check, regenerate once, else reject.

    Streamed through ``backend.stream``: each pair moves on its own (its check, then a rewrite if
    rejected) and ``on_row`` gets its row as soon as it is settled; at most ``max_open`` pairs are in
    progress. Without ``on_row`` it returns the rows in input order."""
    tmpl = read_prompt(cfg.prompt)
    check_tmpl = read_prompt(cfg.rationale_check_prompt) if cfg.rationale_check == "llm" else None
    check_params = SamplingParams(temperature=0.0, max_tokens=4, stop=tuple(template.STOP_STRINGS))
    pairs = iter(pairs)
    ready: deque = deque()
    done: list[JudgeRow] = []
    state = {"open": 0}

    def write_job(q: Query, row: JudgeRow, attempt: int) -> Job:
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                stop=tuple(template.STOP_STRINGS), seed=cfg.seed + attempt)
        decision, why = DECISION[row.mode]
        return Job(("write", q, row, attempt, None), _chat(tmpl.format(query=q.query, decision=decision, why=why)), params)

    def source():
        while True:
            if ready:
                yield ready.popleft()
            elif state["open"] < max_open and (pair := next(pairs, None)) is not None:
                q, mode = pair
                state["open"] += 1
                row = JudgeRow(id=q.id, mode=mode)
                if on_row is None:
                    done.append(row)
                ready.append(write_job(q, row, 0))
            elif state["open"]:
                yield WAIT
            else:
                return

    def settle(q: Query, row: JudgeRow, attempt: int, comp: Completion, text: Optional[str], stance, how) -> None:
        if text is None:
            verdict = "empty rationale"
        elif cfg.rationale_check != "none" and stance != row.mode:
            verdict = f"argues for {stance or 'neither mode'} ({how}), label is {row.mode}"
        else:
            verdict = "ok"
        row.attempts.append({"raw": comp.text, "finish_reason": comp.finish_reason, "rationale": text,
                             "stance": stance, "check": how, "verdict": verdict})
        if verdict == "ok":
            row.rationale, row.ok, row.reason = text, True, None
        else:
            row.reason = f"rationale rejected after {attempt + 1} tries: {verdict}"
            if attempt < cfg.retries:
                ready.append(write_job(q, row, attempt + 1))
                return
        state["open"] -= 1
        if on_row is not None:
            on_row(row)

    for job, comps in backend.stream(source()):
        kind, q, row, attempt, wrote = job.key
        if kind == "write":
            comp = comps[0]
            text = clean(comp.text, cfg.max_sentences)
            if text and check_tmpl is not None:
                ready.append(Job(("check", q, row, attempt, (comp, text)),
                                 _chat(check_tmpl.format(query=q.query, rationale=text)), check_params))
            elif text:
                settle(q, row, attempt, comp, text, keyword_stance(text), "keywords")
            else:
                settle(q, row, attempt, comp, None, None, "empty")
        else:
            comp, text = wrote
            stance, how = parse_stance(comps[0].text), "llm"
            if stance is None:
                stance, how = keyword_stance(text), f"keywords (llm reply unparsed: {comps[0].text[:40]!r})"
            settle(q, row, attempt, comp, text, stance, how)
    return done


def run(cfg: JudgeConfig, run_dir: Path, engine: Callable[[str], Backend]) -> dict:
    """votes.jsonl + queries.jsonl -> judges.jsonl, for every labelled vote; resumable by id.

    Votes are streamed from their file and queries and tags looked up by id in an index of their
    files, so memory holds offsets and the rows in progress, not the files."""
    run_dir = Path(run_dir)
    if not (RunFolder(run_dir).queries).is_file():
        raise InputError(RunFolder(run_dir).queries, "file not found")
    queries = RowIndex(RunFolder(run_dir).queries, Query)  # every file is checked here, before any model loads
    tags = _Tags(run_dir, queries) if "tags" in (cfg.writer, cfg.fallback) else None
    labelled = sum(v.label is not None for v in read_rows(RunFolder(run_dir).votes, Vote))
    done = done_keys(RunFolder(run_dir).judges)
    stats: Counter = Counter()

    def todo() -> Iterator[tuple[Query, str]]:
        for v in read_rows(RunFolder(run_dir).votes, Vote):
            if v.label is not None and v.id not in done and v.id in queries:
                stats["rows_out"] += 1
                yield queries.one(v.id), v.label

    with RowWriter(RunFolder(run_dir).judges) as out:
        def write(row: JudgeRow) -> None:
            if not row.ok and cfg.fallback == "tags":
                _tags_row(row, tags[row.id], f"fallback after: {row.reason}")
                stats["fallback"] += 1
            out.write(row)
            stats["ok" if row.ok else "rejected"] += 1
            stats["regenerated"] += len(row.attempts) > 1
            if not row.ok:
                stats["reject:" + row.reason.split(": ", 1)[-1].split(" (")[0]] += 1

        pairs = todo()
        if cfg.writer == "tags":
            for q, label in pairs:
                write(_tags_row(JudgeRow(id=q.id, mode=label), tags[q.id], "writer: tags"))
        elif (first := next(pairs, None)) is not None:  # the engine loads only when there is work
            # streamed: each row written as soon as it is settled
            write_rationales(itertools.chain([first], pairs), cfg, engine(cfg.engine), on_row=write)
    queries.close()
    if tags is not None:
        tags.close()
    return {"rows_in": labelled, "rows_out": stats.pop("rows_out", 0), **stats}


class _Tags:
    """The tag rows of queries, by id, read from tags.jsonl on demand; queries the tagger has not seen get the
    rule prior's tags."""

    def __init__(self, run_dir: Path, queries: RowIndex):
        from katdata.tag import TagConfig

        self._index = RowIndex(RunFolder(run_dir).tags, Tags)
        self._queries = queries
        self._cfg = TagConfig()

    def __getitem__(self, qid: str) -> Tags:
        from katdata.tag import combine, rule_tags

        row = self._index.one(qid)
        if row is None:
            q = self._queries.one(qid)
            row = combine(q, rule_tags(q, self._cfg), None, None, self._cfg)
        return row

    def close(self) -> None:
        self._index.close()


STAGE = Stage("judge", "write and check the judge rationales", lambda ctx: run(ctx.cfg, ctx.folder.root, ctx.engines),
              JudgeConfig, reads=("votes", "queries"), may_read=("tags",), writes=("judges",))
