"""Rewards and step-level advantages of the `rl` stage (pure logic: no torch needed except in `token_advantages`).

Reward functions have TRL's signature ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``:

- ``format``: 1 when the assistant prefix plus the completion parses as a KAT response
  (:func:`katdata.template.parse`: exactly one judge, one mode tag, one think block in think-on, one
  answer, nothing after); a truncated completion (no end-of-turn token) scores 0;
- ``answer``: 1 when the query's verifier accepts the answer against the reference, 0 when wrong,
  missing or truncated, None when the query has no reference (no verdict: TRL skips it);
- ``mode``: 1 when the completion's mode (chosen, or forced by the prompt) is the better mode for
  the query, 0 otherwise or when no mode tag was written. The better mode comes from the first
  evidence source in ``mode_evidence`` that has evidence: ``group`` (this batch's rollouts of the
  query in both modes, at least one correct), ``vote`` (the vote's pass rates p_on / p_off, with at
  least one correct sample), ``label`` (the record's cold-start label). Think-off is better when its
  pass rate is within ``delta`` of think-on's (the cold-start rule, favouring the cheaper mode);
- ``cost``: minus the completion's length in tokens over ``max_completion_length`` (optional).

Step-level advantages (HiPO's separate advantages for decision and answer): the decision segment
(judge rationale and mode tag) gets the group-normalised mode reward; the answer segment (think block
and answer) the group-normalised weighted sum of the format, answer and cost rewards. The split is
the end of the first mode tag found by token ids (:func:`decision_length`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

from katdata.template import GENERATION_PREFIX, THINK_OFF, THINK_ON, parse

EVIDENCE = ("group", "vote", "label")


def better_mode(p_on: float, p_off: float, delta: float) -> str:
    """The cold-start rule: think-off unless think-on's pass rate beats it by more than delta."""
    return "off" if p_off >= p_on - delta else "on"


class Scorer:
    """Parses and verifies each completion once; the reward functions share its verdicts."""

    def __init__(self, verifier, queries: dict[str, SimpleNamespace], eos_ids: Sequence[int]):
        self.verifier, self.queries, self.eos_ids = verifier, queries, set(eos_ids)
        self._cache: dict[tuple, tuple] = {}

    def truncated(self, ids: Optional[Sequence[int]]) -> bool:
        """No end-of-turn token closes the completion (it was cut by the token limit)."""
        return ids is not None and (not ids or ids[-1] not in self.eos_ids)

    def score(self, qid: str, prefix: str, completion: str, ids: Optional[Sequence[int]]) -> tuple:
        """(parsed, correct) of one completion; correct is None without a verdict."""
        key = (qid, prefix, completion, self.truncated(ids))
        if key not in self._cache:
            cut = self.truncated(ids)
            parsed = parse(prefix + completion, "length" if cut else None)
            q = self.queries.get(qid) or SimpleNamespace(kind=None, reference=None, query="", meta={})
            if not self.verifier.can_check(q.kind, q.reference):
                correct = None
            elif cut or parsed.answer is None:
                correct = False
            else:
                correct = self.verifier.correct(q.kind, parsed.answer, q.reference, q)
            self._cache[key] = (parsed, correct)
            if len(self._cache) > 4096:  # the batches of a few steps; older ones are never asked again
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]


def _columns(n: int, kwargs: dict, name: str, default=None) -> list:
    value = kwargs.get(name)
    return list(value) if value is not None else [default] * n


def mode_of(parsed, forced: Optional[str]) -> Optional[str]:
    return forced or parsed.mode


def reward_functions(scorer: Scorer, evidence: Sequence[str], delta: float, max_tokens: int,
                     with_cost: bool, score_forced: bool = True) -> list[Callable]:
    """[format, answer, mode] (+ cost): TRL reward functions over the dataset columns id, prefix, forced,
    label, p_on, p_off, vote_n, delta (a column delta overrides the argument).

    ``score_forced=False`` gives forced completions no mode reward (None): their decision is in the
    prompt, so in sequence-level GRPO a mode reward would only move their answer tokens."""

    def rows(completions, completion_ids, kwargs):
        n = len(completions)
        ids = completion_ids if completion_ids is not None else [None] * n
        prefixes = _columns(n, kwargs, "prefix", GENERATION_PREFIX)
        qids = _columns(n, kwargs, "id", "")
        return [scorer.score(q, p, c, i) for q, p, c, i in zip(qids, prefixes, completions, ids)], qids

    def format(prompts, completions, completion_ids=None, **kwargs):
        scored, _ = rows(completions, completion_ids, kwargs)
        return [1.0 if parsed.ok else 0.0 for parsed, _ in scored]

    def answer(prompts, completions, completion_ids=None, **kwargs):
        scored, _ = rows(completions, completion_ids, kwargs)
        return [None if correct is None else float(correct) for _, correct in scored]

    def mode(prompts, completions, completion_ids=None, **kwargs):
        scored, qids = rows(completions, completion_ids, kwargs)
        n = len(completions)
        forced = _columns(n, kwargs, "forced")
        modes = [mode_of(parsed, f) for (parsed, _), f in zip(scored, forced)]
        group: dict[str, dict[str, list]] = {}
        for q, m, (_, correct) in zip(qids, modes, scored):
            if m and correct is not None:
                group.setdefault(q, {"on": [], "off": []})[m].append(correct)
        labels, p_on, p_off = (_columns(n, kwargs, k) for k in ("label", "p_on", "p_off"))
        vote_n, deltas = _columns(n, kwargs, "vote_n", 0), _columns(n, kwargs, "delta")
        out, used = [], {s: 0 for s in EVIDENCE}
        for i, (q, m) in enumerate(zip(qids, modes)):
            d = deltas[i] if deltas[i] is not None else delta
            best, source = None, None
            for src in evidence:
                g = group.get(q, {})
                if src == "group" and g.get("on") and g.get("off") and any(g["on"] + g["off"]):
                    best = better_mode(sum(g["on"]) / len(g["on"]), sum(g["off"]) / len(g["off"]), d)
                elif src == "vote" and (vote_n[i] or 0) > 0 and max(p_on[i] or 0, p_off[i] or 0) > 0:
                    best = better_mode(p_on[i], p_off[i], d)
                elif src == "label" and labels[i] in ("on", "off"):
                    best = labels[i]
                if best:
                    source = src
                    break
            if best is None or (forced[i] and not score_forced):
                out.append(None)
                continue
            used[source] += 1
            out.append(1.0 if m == best else 0.0)
        log_metric = kwargs.get("log_metric")
        if log_metric:
            _log_batch(log_metric, scored, forced, modes, completion_ids, used)
        return out

    def cost(prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is None:  # TRL always passes the token ids; without them there is no token count
            return [None] * len(completions)
        return [-min(len(i), max_tokens) / max_tokens for i in completion_ids]

    funcs = [format, answer, mode] + ([cost] if with_cost else [])
    return funcs


def _log_batch(log_metric, scored, forced, modes, completion_ids, used) -> None:
    """Mode rate of the free (auto) completions, mean tokens per mode, evidence shares: into TRL's log."""
    auto = [m for m, f in zip(modes, forced) if not f]
    if auto:
        log_metric("mode/no_mode_tag_auto", sum(m is None for m in auto) / len(auto))
    if any(auto):  # the think-on rate among the free completions that wrote a mode tag
        log_metric("mode/think_on_rate_auto", sum(m == "on" for m in auto) / sum(m is not None for m in auto))
    if completion_ids is not None:
        for m in ("on", "off"):
            lengths = [len(i) for i, mm in zip(completion_ids, modes) if mm == m]
            if lengths:
                log_metric(f"tokens/mean_{m}", sum(lengths) / len(lengths))
    total = sum(used.values())
    for src, k in used.items():
        if total:
            log_metric(f"mode/evidence_{src}", k / total)


# ---------------------------------------------------------------- step-level advantages
def decision_length(ids: Sequence[int], tag_ids: Sequence[Sequence[int]], forced: bool = False) -> int:
    """Tokens of the decision segment: up to and including the first mode tag (found by its token ids).

    A forced completion has its decision in the prompt: 0. Without a mode tag (cut inside the judge,
    or no tag written) every token belongs to the decision.
    """
    if forced:
        return 0
    ids = list(ids)
    best = None
    for tag in tag_ids:
        k = len(tag)
        for start in range(len(ids) - k + 1):
            if ids[start:start + k] == list(tag):
                best = start + k if best is None else min(best, start + k)
                break
    return len(ids) if best is None else best


def mode_tag_ids(tokenizer) -> list[list[int]]:
    """The token ids of <think_on> and <think_off> (SmolLM2 tokenizes them alike alone and after a blank line)."""
    return [tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in (THINK_ON, THINK_OFF)]


def group_normalise(values: list[Optional[float]], group: int) -> list[float]:
    """(x - group mean) / (group std + 1e-4), None-aware; None and a group without values give 0."""
    out = []
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        known = [v for v in chunk if v is not None and not math.isnan(v)]
        mean = sum(known) / len(known) if known else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in known) / (len(known) - 1)) if len(known) > 1 else 0.0
        out += [0.0 if v is None or math.isnan(v) else (v - mean) / (std + 1e-4) for v in chunk]
    return out


def segment_advantages(rewards: list[dict], weights: dict[str, float], group: int) -> tuple[list[float], list[float]]:
    """(decision advantage, answer advantage) per completion, from rows of {reward name: value or None}."""
    decision = group_normalise([r.get("mode") for r in rewards], group)
    decision = [weights.get("mode", 1.0) * a for a in decision]
    answer_keys = [k for k in ("format", "answer", "cost") if k in weights]
    summed = []
    for r in rewards:
        parts = [weights[k] * r[k] for k in answer_keys if r.get(k) is not None and not math.isnan(r[k])]
        summed.append(sum(parts) if parts else None)
    return decision, group_normalise(summed, group)


def token_advantages(decision: list[float], answer: list[float], splits: list[int], width: int):
    """A (B, width) tensor: the decision advantage before each split, the answer advantage from it on."""
    import torch

    pos = torch.arange(width).unsqueeze(0)
    split = torch.tensor(splits).unsqueeze(1)
    return torch.where(pos < split, torch.tensor(decision).unsqueeze(1), torch.tensor(answer).unsqueeze(1))
