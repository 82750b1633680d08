"""Stage `tag`: label every query (kat-format.md section 5, the "tagging system").

Two taggers, combined per query:

- a rule prior that needs no model: math notation, numbers and operators, code, length, question
  form, multi-part questions -> domain, task type, difficulty, p(needs reasoning), verifiability,
  language;
- an LLM tagger (prompt ``prompts/tag.txt``) asked for one JSON object and parsed tolerantly. The
  assistant turn is pre-filled with ``{"needs_reasoning": "`` so that the first generated token is
  the yes/no answer: where the backend returns logprobs, p(needs reasoning) comes from the yes/no
  token probabilities at that position, not from the free text.

A reply that does not parse keeps its raw text (``Tags.llm_raw``), gets a reason (``llm_error``), is
counted, and the rule prior fills in. Think-off candidates are queries tagged as needing no
reasoning with a confidence ``1 - p_reasoning`` at or above ``think_off_threshold``. With
``calibration`` (a fit of an earlier run's vote outcomes, ``katdata.calibrate``) the calibrated p
decides both, and the tagger's own p is kept as ``p_uncalibrated``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from katdata.backends.base import Backend, Completion, Job, Request, SamplingParams
from katdata.prompt_files import read_prompt
from katdata.errors import KatdataError
from katdata.records import Query, Tags
from katdata.runfiles import RowWriter, done_keys, read_rows
from katdata.stage import Stage
from katdata.template import STOP_STRINGS
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)

LLM_PREFIX = '{"needs_reasoning": "'
VERIFIABILITY = ("reference", "tests", "grader", "none")
# labels the prompt's examples carry (prompts/tag.txt: {math_domain}, {lookup_task}, ...)
EXAMPLE_DOMAINS = ("math", "factual", "code", "writing")
EXAMPLE_TASKS = ("calculation", "lookup", "coding", "creative")
FIELDS = ("needs_reasoning", "domain", "task_type", "difficulty", "verifiability", "language")

# Keyword hints of the default taxonomy; a recipe may replace them (keys must be taxonomy labels).
DEFAULT_HINTS = {
    "math": r"\b(how many|how much|calculate|compute|solve|sum|total|percent|average|equation|integer|"
            r"remainder|probability|fraction|prove|triangle|area|ratio|digits?)\b",
    "code": r"\b(python|javascript|java|c\+\+|rust|sql|function|code|program|algorithm|script|regex|"
            r"bug|compile|api|class|array|string|list)\b",
    "science": r"\b(physics|chemistry|biology|atom|molecule|cell|energy|force|gravity|planet|species|"
               r"dna|protein|reaction|element|temperature)\b",
    "factual": r"^\s*(who|what|when|where|which|whose|name|in (which|what)|how (old|long|tall|far|big))\b",
    "writing": r"\b(write|compose|draft|poem|story|essay|email|letter|summari[sz]e|translate|rewrite|"
               r"paraphrase)\b",
    "calculation": r"\b(how many|how much|calculate|compute|total|percent|average|cost|left|remain)\b",
    "proof": r"\b(prove|show that|derive|demonstrate)\b",
    "coding": r"\b(implement|function|code|program|script|debug|return)\b",
    "lookup": r"^\s*(who|what|when|where|which|whose|name|in (which|what)|how (old|long|tall|far|big))\b",
    "explanation": r"\b(why|explain|describe|compare|difference|how does|how do)\b",
    "creative": r"\b(write|compose|poem|story|essay|imagine|slogan)\b",
}
_MATH_NOTATION = re.compile(r"\\(frac|sqrt|sum|int|cdot|times|le|ge|pi)\b|\$[^$\n]+\$|\^\d|[=<>≤≥±×÷√∑∫π]")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_OPERATOR = re.compile(r"\d\s*[-+*/×÷^%]\s*\d")
_CODE = re.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|\breturn\b|\bimport \w+|#include|=>|\w+\(\w*\)\s*[:{]|"
                   r">>>|\bprint\(", re.M)
_QUESTION = re.compile(r"^\s*(what|who|whom|whose|when|where|which|why|how|is|are|was|were|do|does|did|"
                       r"can|could|should|would|will|name|list)\b", re.I)
_REASONING_WORDS = re.compile(r"\b(why|explain|prove|derive|step|compare|analy[sz]e|justify|estimate|"
                              r"optimi[sz]e|plan|design|debug)\b", re.I)
_MULTI_PART = re.compile(r"\b(and then|after that|first\b.*\bthen|respectively)\b|\(\s*[a-d1-4]\s*\)|"
                         r"^\s*\d+[.)]\s", re.I | re.M)
_SCRIPTS = (("zh", r"[\u4e00-\u9fff]"), ("ja", r"[\u3040-\u30ff]"), ("ko", r"[\uac00-\ud7af]"),
            ("ru", r"[\u0400-\u04ff]"), ("ar", r"[\u0600-\u06ff]"), ("hi", r"[\u0900-\u097f]"),
            ("el", r"[\u0370-\u03ff]"))
_DIFFICULTY_WORDS = {"trivial": 1, "very easy": 1, "easy": 2, "simple": 2, "medium": 3, "moderate": 3,
                     "intermediate": 3, "hard": 4, "difficult": 4, "very hard": 5, "expert": 5}
_LANG_NAMES = {"english": "en", "chinese": "zh", "mandarin": "zh", "japanese": "ja", "korean": "ko",
               "russian": "ru", "arabic": "ar", "hindi": "hi", "greek": "el", "french": "fr",
               "german": "de", "spanish": "es", "italian": "it", "portuguese": "pt"}


class TagConfig(BaseModel):
    """Settings of the tagging stage (the recipe's ``tag:`` section)."""

    model_config = ConfigDict(extra="forbid")

    domains: list[str] = Field(default_factory=lambda: ["math", "code", "science", "factual", "writing", "general"],
                               description="the domain taxonomy; the last label is the fallback")
    task_types: list[str] = Field(
        default_factory=lambda: ["calculation", "proof", "coding", "lookup", "explanation", "creative", "other"],
        description="the task-type taxonomy; the last label is the fallback")
    hints: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_HINTS),
                                  description="rule-prior keyword regexes per taxonomy label (case-insensitive)")
    use_llm: bool = Field(True, description="run the LLM tagger; off = the rule prior alone")
    engine: str = Field("default", description="name of the engine (recipe `engines:` table) of the LLM tagger")
    max_tokens: int = Field(80, ge=8, description="token limit of an LLM tagger reply")
    logprobs: int = Field(5, ge=0, description="top-k logprobs to ask for (0 = take p from the text only)")
    batch_size: int = Field(64, ge=1, description="queries per backend call (rows are written per call)")
    rule_weight: float = Field(0.5, ge=0.0, le=1.0,
                               description="weight of the rule prior in the combined p_reasoning and difficulty; "
                               "above 0.5 the rule prior's domain and task type also win over the LLM's")
    text_confidence: float = Field(0.75, gt=0.5, le=1.0,
                                   description="p given to the LLM's yes/no answer when there are no logprobs")
    think_off_threshold: float = Field(0.7, ge=0.5, le=1.0,
                                       description="think-off candidate: 1 - p_reasoning at least this")
    calibration: Optional[str] = Field(
        None, description="a fit of p_reasoning to vote outcomes (calibration.json, or the folder of an earlier run "
        "that has one; `katdata calibrate RUN_DIR` writes it): its calibrated p sets needs_reasoning and "
        "think_off_candidate, the tagger's own p is kept as p_uncalibrated")

    @model_validator(mode="after")
    def _check(self):
        if not self.domains or not self.task_types:
            raise ValueError("domains and task_types need at least one label each")
        unknown = set(self.hints) - set(self.domains) - set(self.task_types)
        if unknown and self.hints != DEFAULT_HINTS:
            raise ValueError(f"hints for labels outside the taxonomy: {sorted(unknown)}")
        for label, pattern in self.hints.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"hint for '{label}' is not a regex: {exc}") from exc
        return self

    @field_validator("calibration")
    @classmethod
    def _fit_readable(cls, path: Optional[str]) -> Optional[str]:
        if path:  # a missing or broken fit fails with the recipe, before any model loads
            from katdata.calibrate import load_fit

            try:
                load_fit(path)
            except KatdataError as exc:
                raise ValueError(str(exc).removeprefix("tag.calibration: ")) from None
        return path


@dataclass
class LLMTags:
    """What the LLM tagger said, after tolerant parsing."""

    fields: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # no_reply | no_json | no_valid_fields | partial: ...
    p_reasoning: Optional[float] = None
    p_from: Optional[str] = None  # logprobs | text


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def language_of(text: str) -> str:
    """The query's language from its script (Latin script counts as English)."""
    letters = sum(ch.isalpha() for ch in text) or 1
    for code, pattern in _SCRIPTS:
        if len(re.findall(pattern, text)) / letters > 0.2:
            return code
    return "en"


def _pick(labels: list[str], hints: dict[str, str], text: str, bonus: dict[str, float]) -> str:
    scores = {lab: bonus.get(lab, 0.0) + (len(re.findall(hints[lab], text, re.I | re.M)) if lab in hints else 0)
              for lab in labels}
    best = max(scores.values())
    return next(lab for lab in labels if scores[lab] == best) if best > 0 else labels[-1]


def rule_tags(q: Query, cfg: TagConfig) -> dict[str, Any]:
    """The rule prior: tags from surface features, no model."""
    text = q.query
    words = len(text.split())
    feats = {
        "words": words,
        "numbers": len(_NUMBER.findall(text)),
        "operators": len(_OPERATOR.findall(text)),
        "math_notation": bool(_MATH_NOTATION.search(text)),
        "code": bool(_CODE.search(text)) or q.kind == "code",
        "question": bool(_QUESTION.search(text)) or text.rstrip().endswith("?"),
        "questions": text.count("?"),
        "multi_part": bool(_MULTI_PART.search(text)) or text.count("?") > 1,
        "reasoning_words": len(_REASONING_WORDS.findall(text)),
    }
    math_words = len(re.findall(DEFAULT_HINTS["math"], text, re.I))
    short_lookup = words <= 15 and feats["numbers"] == 0 and feats["question"] and not feats["reasoning_words"]
    one_step = words <= 6 and feats["numbers"] == 2 and feats["operators"] == 1  # "What is 9*2?": answer directly
    logit = (-1.2 + 1.5 * feats["math_notation"] + 0.35 * min(feats["numbers"], 6) + 0.8 * bool(feats["operators"])
             + 1.5 * feats["code"] + 0.8 * min(math_words, 2) + 0.8 * min(feats["reasoning_words"], 2)
             + 0.7 * feats["multi_part"] + 0.6 * (words > 60) + 0.6 * (words > 120) - 0.8 * short_lookup
             - 1.0 * one_step)
    p = round(_sigmoid(logit), 4)
    numeric = 1.0 + feats["math_notation"] + (feats["numbers"] >= 2)
    domain = _pick(cfg.domains, cfg.hints, text, {"math": 2.0 * feats["math_notation"] + (feats["numbers"] >= 2),
                                                  "code": 5.0 * feats["code"]})
    task = _pick(cfg.task_types, cfg.hints, text, {"calculation": numeric - 1.0, "coding": 5.0 * feats["code"]})
    difficulty = 1 + (words > 40) + (words > 100) + (feats["numbers"] >= 4 or feats["math_notation"]) \
        + (feats["multi_part"] or feats["code"])
    if q.reference is not None:
        verif = "tests" if q.kind == "code" else "reference"
    else:
        verif = "grader" if p >= 0.5 or domain in ("math", "code", "science", "factual") else "none"
    return {"domain": domain, "task_type": task, "difficulty": int(min(difficulty, 5)), "p_reasoning": p,
            "needs_reasoning": p >= 0.5, "verifiability": verif, "language": language_of(text), "features": feats}


def _json_object(text: str) -> Optional[dict]:
    """The first JSON object in ``text``, repairing the usual slips (quotes, commas, a missing brace)."""
    start = text.find("{")
    if start < 0:
        return None
    body = text[start:]
    end = body.find("}")
    candidates = [body, body[: end + 1]] if end >= 0 else [body + "}", body + '"}']
    for cand in candidates:
        for fixed in (cand, _repair(cand)):
            try:
                obj, _ = json.JSONDecoder().raw_decode(fixed)
            except (json.JSONDecodeError, ValueError):
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _repair(s: str) -> str:
    s = s.replace("'", '"').replace("\u201c", '"').replace("\u201d", '"')
    s = re.sub(r",\s*([}\]])", r"\1", s)
    s = re.sub(r'([{,]\s*)([A-Za-z_]\w*)\s*:', r'\1"\2":', s)
    return re.sub(r"\b(True|False|None)\b", lambda m: {"True": "true", "False": "false", "None": "null"}[m[1]], s)


_KV = re.compile(r"[\"']?(" + "|".join(FIELDS) + r")[\"']?\s*[:=]\s*[\"']?([^\"',}\n]+)", re.I)


def _label(value: Any, labels: list[str]) -> Optional[str]:
    v = re.sub(r"[\s-]+", "_", str(value).strip().lower())
    by_lower = {lab.lower(): lab for lab in labels}
    if v in by_lower:
        return by_lower[v]
    near = [lab for low, lab in by_lower.items() if v and (low.startswith(v) or v.startswith(low))]
    return near[0] if len(near) == 1 else None


def _normalize(key: str, value: Any, cfg: TagConfig) -> Any:
    """A valid tag value, or None."""
    if key == "needs_reasoning":
        v = str(value).strip().lower()
        return True if v in ("yes", "y", "true", "1") else False if v in ("no", "n", "false", "0") else None
    if key == "domain":
        return _label(value, cfg.domains)
    if key == "task_type":
        return _label(value, cfg.task_types)
    if key == "verifiability":
        return _label(value, list(VERIFIABILITY))
    if key == "difficulty":
        m = re.match(r"\s*([1-5])(?:\.0)?\s*(?:/\s*5)?\s*$", str(value))
        return int(m[1]) if m else _DIFFICULTY_WORDS.get(str(value).strip().lower())
    v = str(value).strip().lower()
    if v in _LANG_NAMES:
        return _LANG_NAMES[v]
    return v if re.fullmatch(r"[a-z]{2,3}(-[a-z]{2})?", v) else None


def parse_llm(raw: str, cfg: TagConfig) -> LLMTags:
    """Parse an LLM tagger reply (the pre-filled prefix included) tolerantly."""
    if not raw.strip() or raw.strip() == LLM_PREFIX.strip():
        return LLMTags(error="no_reply")
    obj = _json_object(raw)
    pairs = {k.lower(): v for k, v in obj.items()} if obj else {m[1].lower(): m[2] for m in _KV.finditer(raw)}
    if not pairs:
        return LLMTags(error="no_json")
    out, bad = {}, []
    for key in FIELDS:
        if key in pairs:
            value = _normalize(key, pairs[key], cfg)
            (bad.append(key) if value is None else out.__setitem__(key, value))
    if not out:
        return LLMTags(error="no_valid_fields")
    missing = [k for k in FIELDS if k not in out and k not in bad]
    error = None
    if bad or missing:
        error = "partial: " + ", ".join([f"bad {k}" for k in bad] + [f"no {k}" for k in missing])
    return LLMTags(fields=out, error=error)


def yes_probability(logprobs: Optional[list[dict[str, float]]], positions: int = 3) -> Optional[float]:
    """p(yes) / (p(yes) + p(no)) at the first of the first ``positions`` tokens that offers yes or no."""
    for top in (logprobs or [])[:positions]:
        p_yes = p_no = 0.0
        for token, lp in (top or {}).items():
            t = token.replace("\u2581", " ").replace("\u0120", " ").strip().strip('"').lower()
            if t in ("y", "ye", "yes", "true"):
                p_yes += math.exp(lp)
            elif t in ("n", "no", "false"):
                p_no += math.exp(lp)
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no)
    return None


def llm_tags(completion: Completion, cfg: TagConfig) -> tuple[str, LLMTags]:
    raw = LLM_PREFIX + completion.text if completion.finish_reason != "error" else ""
    got = parse_llm(raw, cfg) if raw else LLMTags(error=f"engine_error: {completion.error}")
    p = yes_probability(completion.logprobs)
    if p is not None:
        got.p_reasoning, got.p_from = p, "logprobs"
    elif "needs_reasoning" in got.fields:
        got.p_reasoning = cfg.text_confidence if got.fields["needs_reasoning"] else 1 - cfg.text_confidence
        got.p_from = "text"
    return raw or (completion.error or ""), got


def combine(q: Query, rule: dict[str, Any], llm: Optional[LLMTags], raw: Optional[str], cfg: TagConfig) -> Tags:
    """Merge the rule prior with the LLM tagger; the rule prior fills every field the LLM missed."""
    f = llm.fields if llm else {}
    w, p = cfg.rule_weight, rule["p_reasoning"]
    if llm and llm.p_reasoning is not None:
        p = w * p + (1 - w) * llm.p_reasoning
    difficulty = rule["difficulty"]
    if "difficulty" in f:
        difficulty = round(w * difficulty + (1 - w) * f["difficulty"] + 1e-9)
    if w > 0.5:  # the rule prior is trusted more: its labels win too
        f = {k: v for k, v in f.items() if k not in ("domain", "task_type")}
    verif = rule["verifiability"] if q.reference is not None else f.get("verifiability", rule["verifiability"])
    used = bool(f) or (llm is not None and llm.p_reasoning is not None)
    needs = p >= 0.5
    return Tags(id=q.id, domain=f.get("domain", rule["domain"]), task_type=f.get("task_type", rule["task_type"]),
                difficulty=int(difficulty), needs_reasoning=needs, p_reasoning=round(min(max(p, 0.0), 1.0), 4),
                p_llm=round(llm.p_reasoning, 4) if llm and llm.p_reasoning is not None else None,
                verifiability=verif, language=f.get("language", rule["language"]),
                think_off_candidate=(not needs) and (1 - p) >= cfg.think_off_threshold,
                source="combined" if used else "rule", rule=rule, llm_raw=raw, llm_error=llm.error if llm else None)


def tag_requests(queries: list[Query], cfg: TagConfig, prompt: Optional[str] = None) -> list[Request]:
    template = prompt or read_prompt("tag.txt")
    kw = {"domains": ", ".join(f'"{d}"' for d in cfg.domains), "task_types": ", ".join(f'"{t}"' for t in cfg.task_types),
          "first_domain": cfg.domains[0], "first_task": cfg.task_types[0],
          "last_domain": cfg.domains[-1], "last_task": cfg.task_types[-1]}
    # the examples' labels by name; a taxonomy without that label gets its fallback (last) label
    kw |= {f"{name}_domain": _label(name, cfg.domains) or cfg.domains[-1] for name in EXAMPLE_DOMAINS}
    kw |= {f"{name}_task": _label(name, cfg.task_types) or cfg.task_types[-1] for name in EXAMPLE_TASKS}
    return [Request(messages=[{"role": "user", "content": template.format(query=q.query, **kw)}], prefix=LLM_PREFIX)
            for q in queries]


def tag_batch(queries: list[Query], cfg: TagConfig, backend: Optional[Backend], fit=None) -> tuple[list[Tags], dict]:
    """Tag a batch: one backend call for all of it (none when the LLM tagger is off); ``fit`` (a
    ``calibrate.Fit``) replaces p_reasoning by its calibrated value."""
    rules = [rule_tags(q, cfg) for q in queries]
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    if not (cfg.use_llm and backend):
        rows = [combine(q, r, None, None, cfg) for q, r in zip(queries, rules)]
        return [fit.apply(t, cfg.think_off_threshold) for t in rows] if fit else rows, usage
    params = SamplingParams(max_tokens=cfg.max_tokens, stop=tuple(STOP_STRINGS), logprobs=cfg.logprobs or None)
    outs = backend.generate(tag_requests(queries, cfg), params)
    rows = []
    for q, r, out in zip(queries, rules, outs):
        c = out[0]
        usage["prompt_tokens"] += c.prompt_tokens
        usage["completion_tokens"] += c.completion_tokens
        raw, got = llm_tags(c, cfg)
        rows.append(combine(q, r, got, raw, cfg))
    return [fit.apply(t, cfg.think_off_threshold) for t in rows] if fit else rows, usage


def tag_stats(rows: Iterable[Tags], cfg: TagConfig) -> dict[str, Any]:
    """Distribution of every tag, the LLM tagger's parse-failure rate, rule/LLM agreement (one pass over
    ``rows``, which may be streamed from the file)."""
    keys = ("domain", "task_type", "difficulty", "needs_reasoning", "verifiability", "language",
            "think_off_candidate", "source")
    dist: dict[str, Counter] = {k: Counter() for k in keys}
    errors: Counter = Counter()
    agree: dict[str, list[int]] = {k: [0, 0] for k in FIELDS}
    n = candidates = 0
    for t in rows:
        n += 1
        candidates += t.think_off_candidate
        for k in keys:
            dist[k][str(getattr(t, k))] += 1
        if t.llm_raw is None and t.llm_error is None:
            continue
        errors[(t.llm_error or "ok").split(":")[0]] += 1
        for k, v in parse_llm(t.llm_raw or "", cfg).fields.items():
            same = abs(v - t.rule[k]) <= 1 if k == "difficulty" else v == t.rule[k]
            agree[k][0] += bool(same)
            agree[k][1] += 1
    asked = sum(errors.values())
    failed = sum(v for k, v in errors.items() if k not in ("ok", "partial"))
    return {"rows": n, "distribution": {k: dict(c.most_common()) for k, c in dist.items()},
            "think_off_candidates": candidates, "llm_replies": asked, "llm_parse": dict(errors),
            "llm_parse_failure_rate": round(failed / asked, 4) if asked else None,
            "agreement": {k: {"rate": round(a / m, 4), "n": m} for k, (a, m) in agree.items() if m},
            "agreement_note": "rule prior vs parsed LLM fields; difficulty agrees within 1"}


def think_off_candidates(run_dir: Path) -> set[str]:
    """Ids of the think-off candidates in a run's tags.jsonl (for sample.skip_on_for_off_candidates)."""
    return {t.id for t in read_rows(RunFolder(run_dir).tags, Tags) if t.think_off_candidate}


def run(cfg: TagConfig, run_dir: Path, engine: Callable[[str], Backend]) -> dict[str, Any]:
    """Tag queries.jsonl into tags.jsonl, skipping ids already there; returns the stage stats."""
    run_dir = Path(run_dir)
    out_path = RunFolder(run_dir).tags
    done = done_keys(out_path)
    rows_in = n_todo = 0
    for q in read_rows(RunFolder(run_dir).queries, Query):  # counted here, read again as they are tagged
        rows_in, n_todo = rows_in + 1, n_todo + (q.id not in done)
    batches = _batches((q for q in read_rows(RunFolder(run_dir).queries, Query) if q.id not in done), cfg.batch_size)
    fit = None
    if cfg.calibration:
        from katdata.calibrate import load_fit

        fit = load_fit(cfg.calibration)
    backend = engine(cfg.engine) if cfg.use_llm and n_todo else None
    usage = Counter()
    t0 = time.perf_counter()
    with RowWriter(out_path) as w:
        if backend is None:  # the rule prior alone: a batch at a time, so the progress shows
            for i, batch in enumerate(batches):
                rows, _ = tag_batch(batch, cfg, None, fit)
                w.write_all(rows)
                log.info("tagged %d/%d", min((i + 1) * cfg.batch_size, n_todo), n_todo)
        else:  # streamed: each row written as its reply comes in (an in-process engine: batch_size a call)
            params = SamplingParams(max_tokens=cfg.max_tokens, stop=tuple(STOP_STRINGS), logprobs=cfg.logprobs or None)
            jobs = (Job(q, r, params) for b in batches for q, r in zip(b, tag_requests(b, cfg)))  # a batch's prompts at a time
            for n, (job, comps) in enumerate(backend.stream(jobs, wave_limit=cfg.batch_size), 1):
                c = comps[0]
                usage.update(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                raw, got = llm_tags(c, cfg)
                row = combine(job.key, rule_tags(job.key, cfg), got, raw, cfg)
                w.write(fit.apply(row, cfg.think_off_threshold) if fit else row)
                if n % cfg.batch_size == 0:
                    log.info("tagged %d/%d", n, n_todo)
    secs = time.perf_counter() - t0
    stats = tag_stats(read_rows(out_path, Tags), cfg)  # streamed from the file, as every pass here
    stats.update(rows_in=rows_in, rows_new=n_todo, rows_skipped=rows_in - n_todo, seconds=round(secs, 3),
                 queries_per_s=round(n_todo / secs, 3) if n_todo and secs > 0 else None, tokens=dict(usage),
                 model=getattr(backend, "model_id", None))
    if fit:
        stats["calibration"] = fit.summary(read_rows(out_path, Tags))
    return stats


def _batches(items, size: int):
    """Lists of ``size`` items (the last one shorter) from an iterator, read as they are needed."""
    from itertools import islice

    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


STAGE = Stage("tag", "tag a run's queries (rule prior + LLM tagger)", lambda ctx: run(ctx.cfg, ctx.folder.root, ctx.engines),
              TagConfig, reads=("queries",), writes=("tags",))
