"""Decontamination: drop the queries that overlap an evaluation set, before any model sees them.

The stage sits between load and tag. It reads ``queries.jsonl``, copies every clean query's line unchanged
to the kept file and writes one row per dropped query (its id and text, the benchmark, the benchmark item,
the kind of match and the overlap) to ``contaminated.jsonl``.

What is compared. Both sides are normalised the same way (``words``): Unicode NFKC, lower case, curly quotes,
the en dash and the minus sign made plain, the em dash a space; then split on whitespace, and punctuation and
symbols stripped from both ends of every word ("France?" -> "france", "$18." -> "18"; a word made of such
characters only disappears). Punctuation inside a word stays ("9*2", "don't", "well-known"), and so do the math signs
``+ - * / = < > ^ %`` at a word's ends, so "What is 9*2?" and "What is 9+2?" stay different texts.

Two tests per query, against each benchmark:

- exact: the normalised query equals a normalised benchmark item (any length, even one word);
- ngram: the query's word n-grams (``ngram``, default 8, as open-r1's decontamination uses) looked up in
  the benchmark's n-gram set; the query is contaminated when the share of its n-grams found there is at
  least ``threshold`` (and at least one is found). A query shorter than ``ngram`` words has no n-gram and is
  checked by exact match only; so is a benchmark item shorter than that.

Why the default threshold is a share of 0.5 and not open-r1's "any one 8-gram". Measured on the packaged
benchmarks (each item against all the others of its benchmark, which are distinct problems): 35 of
GSM8K's 1,319 test questions, 36 of HumanEval's 164 prompts and 11 of AIME 2025's 30 problems share at
least one 8-gram with another item: stock phrases such as "where m and n are relatively prime positive
integers find" (in 5 AIME problems and in thousands of competition problems a training set may hold),
"find the remainder when n is divided by 1000" or "calculate the total amount of money the company". Under
the any-match rule every training problem that uses such a phrase would count as AIME or GSM8K
contamination. Those stock-phrase overlaps are shares of at most 0.32 of an item's 8-grams in GSM8K, AIME
and HumanEval (FanOutQA's sub-questions are templates filled with another entity or year, which share up
to all of their few 8-grams: a short query on such a template is caught whatever its entity). A benchmark
item with small edits keeps far more: one changed number removes at most 8 of a median GSM8K question's
36 8-grams (share >= 0.78), two remove at most 16 (>= 0.55); a benchmark item inside a short instruction
("Solve step by step: ...") keeps about 0.9. 0.5 sits between the two. What it misses: an item buried in
a prompt more than twice its length, and reworded problems (GSM8K's test set holds two pairs of inverse
problems that share 0.37-0.44); ``threshold: 0`` gives open-r1's rule (any one n-gram), and every dropped
row records its share, so the cut can be judged on the data.

Benchmarks. ``PACKAGED`` names the packaged evaluation sets (``gsm8k``, ``aime2025``, ``humaneval``,
``fanoutqa``) and the packaged sources (katdata.sources.TABLE) each covers: the sources whose query texts
are the benchmark's items (all of them, never a sample) and the sources derived from the benchmark's data
whose texts are not its items. ``gsm8k-calc`` and ``gsm8k-calc2`` ("What is 9*2?", from the calculator notes
of GSM8K test solutions) are derived: no one is evaluated on those sums, so their texts are not indexed and
a gsm8k decontamination keeps them (``derived_sources`` lists them for a warning). Both FanOutQA sources
(the multi-hop dev questions and their single-hop sub-questions) are indexed: both are texts of the dev file.
Any file the recipe lists (``files``: JSONL, CSV, Parquet or a saved dataset, through katdata.inputs) is a
benchmark too.

The quickstart trains on GSM8K test questions and FanOutQA dev sub-questions: a decontamination against
``gsm8k`` or ``fanoutqa`` drops all of them (tests/test_decontaminate.py shows it), so the quickstart
leaves those out of its list.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from katdata.errors import InputError
from katdata.inputs import FieldMap, read_queries
from katdata.records import Query
from katdata.runfiles import parse_row
from katdata.stage import Context, Stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedBenchmark:
    """An evaluation set among the packaged sources: ``indexed`` sources' query texts are its items;
    ``derived`` sources are built from its data but their texts are not its items (not indexed)."""

    name: str
    indexed: tuple[str, ...]
    derived: tuple[str, ...] = ()


PACKAGED: dict[str, PackagedBenchmark] = {b.name: b for b in (
    PackagedBenchmark("gsm8k", ("gsm8k",), ("gsm8k-calc", "gsm8k-calc2")),
    PackagedBenchmark("aime2025", ("aime2025",)),
    PackagedBenchmark("humaneval", ("humaneval",)),
    PackagedBenchmark("fanoutqa", ("fanoutqa-multihop", "fanoutqa-hop")),
)}
BENCHMARK_NAMES = tuple(PACKAGED)


def benchmark_of(source: str) -> Optional[str]:
    """The packaged benchmark a packaged source comes from (indexed or derived); None for any other name."""
    return next((b.name for b in PACKAGED.values() if source in b.indexed + b.derived), None)


# --- config -------------------------------------------------------------------------------------------------


class FileBenchmark(BaseModel):
    """An evaluation set in a file, read like query input (katdata.inputs): its query column holds the items."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the evaluation set: .jsonl, .json, .csv, .tsv, .parquet or a saved Hugging Face "
                      "dataset folder; its query column is compared with the queries")
    fields: FieldMap = Field(default_factory=FieldMap, description="which columns hold the item text (fields.query) "
                             "and its id (fields.id; missing ids become a hash of the text), as data.fields")
    name: Optional[str] = Field(None, description="the benchmark's name in contaminated.jsonl and the stats; "
                                "default: the file name without its suffix")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class DecontaminateConfig(BaseModel):
    """Recipe section ``decontaminate``: drop queries that overlap evaluation sets (between load and tag)."""

    model_config = ConfigDict(extra="forbid")

    benchmarks: list[Literal[BENCHMARK_NAMES]] = Field(
        default_factory=lambda: list(BENCHMARK_NAMES),
        description="packaged evaluation sets to check against, each in full: gsm8k (GSM8K test questions), aime2025 "
                    "(AIME 2025 I and II), humaneval (HumanEval prompts), fanoutqa (FanOutQA dev questions and their "
                    "single-hop sub-questions); [] = none. A recipe that trains on one of them must leave it out")
    files: list[FileBenchmark] = Field(default_factory=list, description="evaluation sets in files (path, fields, "
                                       "name), checked like the packaged ones")
    ngram: int = Field(8, ge=1, le=64, description="n of the word n-grams compared (8 as open-r1); queries and items "
                       "shorter than n words are checked by exact match only")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="a query is contaminated when at least this share of its "
                             "n-grams is in a benchmark's n-gram set (and at least one is); 0 = any one n-gram "
                             "(open-r1's rule). 0.5 catches an item with a few numbers changed and keeps queries "
                             "that only share stock phrases (at most 0.32 between distinct GSM8K, AIME or HumanEval "
                             "items)")

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"listed twice: {', '.join(twice)}")
        return names

    @model_validator(mode="after")
    def _distinct_names(self):
        seen = set(self.benchmarks)
        for i, f in enumerate(self.files):
            if f.label in seen:
                raise ValueError(f"files[{i}]: the benchmark name '{f.label}' is taken (packaged or another file); "
                                 "give the file a distinct name")
            seen.add(f.label)
        return self

    @property
    def active(self) -> bool:
        """False when there is nothing to check against (both lists empty): the stage keeps every query."""
        return bool(self.benchmarks or self.files)


def derived_sources(cfg: DecontaminateConfig, sources: Iterable[str]) -> list[str]:
    """The packaged sources among ``sources`` derived from a benchmark ``cfg`` checks, whose queries it keeps
    (e.g. gsm8k-calc under gsm8k): for the pipeline to warn about."""
    derived = {s for b in cfg.benchmarks for s in PACKAGED[b].derived}
    return [s for s in sources if s in derived]


# --- normalisation and the index ----------------------------------------------------------------------------

_PLAIN = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"',
                        "\u201e": '"', "\u2013": "-", "\u2212": "-", "\u2014": " "})
_MATH = frozenset("+-*/=<>^%")


def _edge(ch: str) -> bool:
    """Stripped from a word's ends: Unicode punctuation and symbols, except the math signs."""
    return ch not in _MATH and unicodedata.category(ch)[0] in "PS"


def words(text: str) -> list[str]:
    """The normalised words of a text (see the module docstring); the exact-match key is ``" ".join(words)``."""
    out = []
    for w in unicodedata.normalize("NFKC", text).lower().translate(_PLAIN).split():
        if w[0].isalnum() and w[-1].isalnum():  # most words: nothing to strip
            out.append(w)
            continue
        i, j = 0, len(w)
        while i < j and _edge(w[i]):
            i += 1
        while j > i and _edge(w[j - 1]):
            j -= 1
        if i < j:
            out.append(w[i:j])
    return out


def ngrams(ws: Sequence[str], n: int) -> list[str]:
    """The word n-grams of a normalised text, each joined by single spaces (strings cache their hash)."""
    return [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]


@dataclass(frozen=True)
class Match:
    """Why a query was dropped: the benchmark and item matched, ``kind`` exact or ngram, and ``overlap``: the share
    of the query's n-grams found in the benchmark (1.0 for an exact match), ``matched`` of ``total`` n-grams."""

    benchmark: str
    item_id: str
    kind: Literal["exact", "ngram"]
    overlap: float
    matched: int
    total: int


class BenchmarkIndex:
    """One benchmark's items, indexed once: normalised text -> first item id, n-gram -> first item id."""

    def __init__(self, name: str, items: Iterable[tuple[str, str]], n: int):
        self.name, self.n, self.items = name, n, 0
        self.exact: dict[str, str] = {}
        self.grams: dict[str, str] = {}
        for item_id, text in items:
            self.items += 1
            ws = words(text)
            if ws:
                self.exact.setdefault(" ".join(ws), item_id)
            for g in ngrams(ws, n):
                self.grams.setdefault(g, item_id)

    def exact_match(self, key: str) -> Optional[Match]:
        item = self.exact.get(key) if key else None
        return None if item is None else Match(self.name, item, "exact", 1.0, 0, 0)

    def ngram_match(self, grams: Sequence[str], threshold: float) -> Optional[Match]:
        """The n-gram test; the item reported is the one most of the found n-grams point to."""
        if not grams:
            return None
        found = [item for item in map(self.grams.get, grams) if item is not None]
        share = len(found) / len(grams)
        if not found or share < threshold:
            return None
        item = Counter(found).most_common(1)[0][0]
        return Match(self.name, item, "ngram", round(share, 4), len(found), len(grams))


def packaged_items(name: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every item of a packaged benchmark: the full sets (sources.load without a limit)."""
    from katdata import sources

    for source in PACKAGED[name].indexed:
        for q in sources.load(source):
            yield q.id, q.query


def build_indexes(cfg: DecontaminateConfig) -> list[BenchmarkIndex]:
    """An index per benchmark of ``cfg``, packaged ones first, in the order listed."""
    out = [BenchmarkIndex(name, packaged_items(name), cfg.ngram) for name in cfg.benchmarks]
    for i, f in enumerate(cfg.files):
        if not Path(f.path).exists():
            raise InputError(f.path, f"file not found (recipe key decontaminate.files[{i}].path)")
        out.append(BenchmarkIndex(f.label, ((q.id, q.query) for q in read_queries(f.path, f.fields)), cfg.ngram))
    for idx in out:
        logger.info("decontaminate: %s: %d items, %d %d-grams", idx.name, idx.items, len(idx.grams), cfg.ngram)
    return out


# --- the checks ---------------------------------------------------------------------------------------------


def match_text(text: str, benchmarks: Sequence[BenchmarkIndex], cfg: DecontaminateConfig) -> Optional[Match]:
    """The match that drops a query text, or None: an exact match (first benchmark in order) before an n-gram
    match (the highest share; ties: the first benchmark)."""
    return match_words(words(text), None, benchmarks, cfg)


def match_words(ws: list[str], grams: Optional[list[str]], benchmarks: Sequence[BenchmarkIndex],
                cfg: DecontaminateConfig) -> Optional[Match]:
    """`match_text` of a text's `words` (``grams``: their `ngrams` with ``cfg.ngram``, when worked out already)."""
    key = " ".join(ws)
    for idx in benchmarks:
        m = idx.exact_match(key)
        if m is not None:
            n = len(ws) - cfg.ngram + 1
            return Match(m.benchmark, m.item_id, "exact", 1.0, max(n, 0), max(n, 0))
    grams = ngrams(ws, cfg.ngram) if grams is None else grams
    best = None
    for idx in benchmarks:
        m = idx.ngram_match(grams, cfg.threshold)
        if m is not None and (best is None or m.overlap > best.overlap):
            best = m
    return best


def find_overlaps(queries: Iterable[Query], benchmarks: Sequence[BenchmarkIndex],
                  cfg: DecontaminateConfig) -> Iterator[tuple[Query, Match]]:
    """(query, match) for every contaminated query, in input order; clean queries yield nothing. Pure: the
    indexes come built (``build_indexes``) with ``cfg.ngram``. O(query length) per query and benchmark."""
    wrong = [idx.name for idx in benchmarks if idx.n != cfg.ngram]
    if wrong:
        raise ValueError(f"indexes built with another n than ngram={cfg.ngram}: {', '.join(wrong)}")
    for q in queries:
        m = match_text(q.query, benchmarks, cfg)
        if m is not None:
            yield q, m


def dropped_row(q: Query, m: Match) -> dict:
    """A row of contaminated.jsonl."""
    return {"id": q.id, "query": q.query, "benchmark": m.benchmark, "item_id": m.item_id, "kind": m.kind,
            "overlap": m.overlap, "ngrams_matched": m.matched, "ngrams": m.total}


def run(cfg: DecontaminateConfig, src: Path, kept: Path, dropped: Path,
        benchmarks: Optional[Sequence[BenchmarkIndex]] = None) -> dict:
    """The stage: every query of ``src`` (a queries.jsonl) is copied byte for byte to ``kept`` or written as a
    ``dropped_row`` to ``dropped``. Both files are written beside themselves (``.NAME.tmp``) and moved into place
    at the end (``dropped`` first, then ``kept``), so a crash leaves neither half-written. ``benchmarks``:
    prebuilt indexes (default: ``build_indexes(cfg)``). Returns the stats: queries in, kept, dropped, dropped
    per benchmark (every checked benchmark, zeros included) and per kind, and the size of each index."""
    src, kept, dropped = Path(src), Path(kept), Path(dropped)
    if not src.is_file():
        raise InputError(src, "file not found (the load stage's queries)")
    indexes = list(build_indexes(cfg) if benchmarks is None else benchmarks)
    by_benchmark = dict.fromkeys((idx.name for idx in indexes), 0)
    by_kind = {"exact": 0, "ngram": 0}
    n_in = n_kept = 0
    tmp_kept, tmp_dropped = kept.with_name(f".{kept.name}.tmp"), dropped.with_name(f".{dropped.name}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp_kept, "wb") as fk, open(tmp_dropped, "w", encoding="utf-8") as fd:
            for n, raw in enumerate(fin, 1):
                if not raw.strip():
                    continue
                n_in += 1
                q = parse_row(src, n, raw, Query)
                m = match_text(q.query, indexes, cfg) if cfg.active else None
                if m is None:
                    fk.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    n_kept += 1
                    continue
                by_benchmark[m.benchmark] += 1
                by_kind[m.kind] += 1
                fd.write(json.dumps(dropped_row(q, m), ensure_ascii=False) + "\n")
            for f in (fk, fd):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_dropped, dropped)
        os.replace(tmp_kept, kept)
    finally:
        for tmp in (tmp_kept, tmp_dropped):
            tmp.unlink(missing_ok=True)
    stats = {"rows_in": n_in, "rows_out": n_kept, "queries_in": n_in, "kept": n_kept, "dropped": n_in - n_kept,
             "checked": [idx.name for idx in indexes] if cfg.active else [], "dropped_by_benchmark": by_benchmark,
             "dropped_by_kind": by_kind, "ngram": cfg.ngram, "threshold": cfg.threshold,
             "benchmarks": {idx.name: {"items": idx.items, "ngrams": len(idx.grams)} for idx in indexes}}
    logger.info("decontaminate: %d queries in, %d kept, %d dropped %s", n_in, n_kept, n_in - n_kept,
                {k: v for k, v in by_benchmark.items() if v})
    return stats


def card_lines(stats: Optional[dict], sources: dict[str, int]) -> list[str]:
    """The card's word on decontamination: what the queries were checked against and what was dropped
    (``stats``: the stage's entry in summary.json), and a warning for every benchmark whose own items the
    data holds unchecked (``sources``: queries per source), since a model adapted on it cannot be evaluated
    on that benchmark."""
    out = ["## Decontamination", ""]
    checked = (stats or {}).get("checked") or []
    if not stats:
        out += ["This run has no decontaminate stage (made by an older katdata): the queries were not checked.", ""]
    elif not checked:
        out += ["The queries were not checked against any evaluation set (no `decontaminate:` benchmarks).", ""]
    else:
        dropped = ", ".join(f"{n} {b}" for b, n in stats.get("dropped_by_benchmark", {}).items())
        out += [f"Checked against {', '.join(checked)} (exact match, or at least {stats.get('threshold')} of a "
                f"query's word {stats.get('ngram')}-grams in one benchmark): {stats.get('dropped', 0)} of "
                f"{stats.get('queries_in', 0)} queries dropped ({dropped}; contaminated.jsonl names each).", ""]
    for name, bench in PACKAGED.items():
        held = sum(n for s, n in sources.items() if s in bench.indexed)
        if held and name not in checked:
            out += [f"**Warning:** {held} queries are {name} items ({', '.join(s for s in bench.indexed if s in sources)}"
                    f"), not decontaminated: a model adapted on this dataset cannot be evaluated on {name}.", ""]
    return out


def _stage_run(ctx: Context) -> dict:
    cfg = ctx.cfg
    if not cfg.active:
        logger.warning("decontaminate: no benchmarks listed (decontaminate.benchmarks / files): the queries are "
                       "not checked against any evaluation set")
    return run(cfg, ctx.folder.loaded, ctx.folder.queries, ctx.folder.contaminated, benchmarks=ctx.prepared)


STAGE = Stage("decontaminate", "drop queries that overlap evaluation sets (exact match, word n-grams)", _stage_run,
              DecontaminateConfig, reads=("loaded",), writes=("queries", "contaminated"),
              when_absent=lambda: DecontaminateConfig(benchmarks=[]),
              prepare=lambda recipe: build_indexes(recipe.decontaminate) if recipe.decontaminate.active else [])


__all__ = ["BENCHMARK_NAMES", "PACKAGED", "BenchmarkIndex", "DecontaminateConfig", "FileBenchmark", "Match",
           "benchmark_of", "build_indexes", "derived_sources", "dropped_row", "find_overlaps", "match_text",
           "ngrams", "packaged_items", "run", "words"]
