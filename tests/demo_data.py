"""Test data: real cold-start KAT records from the packaged data sets and fixed judge rationales.

Tests import it as ``from demo_data import ...`` (pytest puts tests/ on the path); the benchmarks
add tests/ to ``sys.path`` first.
"""

from __future__ import annotations

import re

from katdata import sources
from katdata.records import KatRecord
from katdata.template import render

JUDGE_ON = ("This is a multi-step arithmetic word problem: the quantities must be combined in several steps, so "
            "explicit step-by-step reasoning is needed.",
            "The question needs several calculations that depend on each other, so working through them carefully "
            "before answering is worthwhile.")
JUDGE_OFF = ("The question asks to recall a single well-known fact, so no complex reasoning is needed.",
             "This is a direct factual lookup with a short answer; explicit reasoning would add nothing.")


def demo_records(n_on: int, n_off: int, seed: int = 0) -> list:
    """Real cold-start records from packaged data: GSM8K worked solutions as think-on traces, fanoutqa
    single-hop questions with short answers as think-off (smoke runs, tests and benchmarks)."""
    out = []
    for i, q in enumerate(sources.load("gsm8k", limit=n_on, seed=seed)):
        think = re.sub(r"<<[^>]*>>", "", q.meta["solution"].split("####")[0]).strip()
        judge = JUDGE_ON[i % len(JUDGE_ON)]
        out.append(KatRecord(id=q.id, query=q.query, mode="on", judge=judge, think=think, answer=q.reference,
                             response=render("on", judge, q.reference, think=think), reference=q.reference,
                             kind=q.kind, tags={"domain": "math", "difficulty": 3}, vote={"label": "on"}))
    for i, q in enumerate(sources.load("fanoutqa-hop", limit=n_off, seed=seed)):
        judge = JUDGE_OFF[i % len(JUDGE_OFF)]
        out.append(KatRecord(id=q.id, query=q.query, mode="off", judge=judge, answer=q.reference,
                             response=render("off", judge, q.reference), reference=q.reference, kind=q.kind,
                             tags={"domain": "factual", "difficulty": 1}, vote={"label": "off"}))
    return out
