"""Benchmarks by name for `katdata eval` (recipe ``eval.benchmarks``, flag ``--benchmark``).

A benchmark is a packaged evaluation set (gsm8k: GSM8K test; aime2025: AIME 2025 I and II; humaneval;
fanoutqa: FanOutQA dev multi-hop questions) or any file the inputs layer reads, with a field map. Each is
answered by every model eval runs (base, the SFT adapter, the RL adapter) in the settings asked for (auto,
forced on, forced off), ``k`` samples per item, each with its own seed when sampled (the item's seed + i, as
vLLM seeds sample i of a request; the transformers backend seeds a batch, so sampled items go one per batch
there, which keeps a resumed run's samples the same). Rows go to ``eval/benchmarks.jsonl`` as they come in, so a killed eval resumes where
it stopped; ``katdata.bench_figures`` turns them into pass@1, pass@k, maj@k, think-on rate and tokens.

Forced settings pre-fill the judge the tags writer gives a query of that task type and domain (the rule
tagger's tags: benchmark items are not tagged by the run), as eval's held-out forced settings do.
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from katdata.errors import InputError, KatdataError
from katdata.inputs import FieldMap

log = logging.getLogger(__name__)

PACKAGED = {"gsm8k": "gsm8k", "aime2025": "aime2025", "humaneval": "humaneval", "fanoutqa": "fanoutqa-multihop"}
SETTINGS = ("auto", "on", "off")


class BenchmarkConfig(BaseModel):
    """One benchmark of ``eval.benchmarks``: a packaged set by name, or a file (``path`` and ``fields``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a packaged set (gsm8k, aime2025, humaneval, fanoutqa), or the name of the file "
                      "benchmark given by path (default: the file name without its suffix)")
    path: Optional[str] = Field(None, description="a query file (.jsonl, .json, .csv, .tsv, .parquet, a saved "
                                "Hugging Face dataset) with a reference per row, read as data.path is")
    fields: FieldMap = Field(default_factory=FieldMap, description="the file's columns, as data.fields")
    limit: Optional[int] = Field(None, ge=1, description="at most this many items, a seeded sample; None = all")
    k: int = Field(1, ge=1, le=64, description="samples per item: pass@1 is their mean, pass@k and maj@k over them")
    settings: list[Literal[SETTINGS]] = Field(list(SETTINGS), description="auto (the model picks its mode), on and "
                                              "off (forced think-on / think-off)")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="sampling temperature; None = 0 (greedy) "
                                         "for k = 1, 0.6 for k > 1")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling when the temperature is above 0")
    max_tokens: Optional[int] = Field(None, ge=8, description="token limit of one reply; None = eval.max_tokens")
    seed: int = Field(0, description="seed of the item sample and of every reply (item seed + sample index)")

    @field_validator("settings")
    @classmethod
    def _settings(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("give each of auto, on, off at most once, and at least one")
        return value

    @model_validator(mode="after")
    def _known(self):
        if self.path is None and self.name not in PACKAGED:
            raise ValueError(f"unknown benchmark '{self.name}'; packaged: {', '.join(PACKAGED)} (or give a path)")
        if self.k > 1 and self.temperature == 0:
            raise ValueError("k > 1 at temperature 0 draws the same reply k times: raise the temperature or set k: 1")
        return self

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else (0.0 if self.k == 1 else 0.6)


def parse_flag(text: str) -> dict:
    """``--benchmark NAME[:KEY=VALUE,...]`` as a recipe entry: ``gsm8k:limit=8,k=2,settings=auto+on``; a NAME
    that is a file (has a suffix) is a file benchmark named by its stem."""
    head, _, rest = text.partition(":")
    entry: dict = {"name": head}
    if Path(head).suffix:
        entry = {"name": Path(head).stem, "path": head}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise KatdataError(f"--benchmark {text}: '{part}' is not KEY=VALUE (e.g. gsm8k:limit=8,k=2)")
        entry[key.strip()] = value.strip().split("+") if key.strip() == "settings" else value.strip()
    return entry


def items(spec: BenchmarkConfig) -> list:
    """The benchmark's items as eval items: the query as the user turn, its reference and kind, and the rule
    tagger's domain and task type (which the forced settings' judge is written from)."""
    from katdata import sources
    from katdata.eval_items import Item
    from katdata.inputs import read_queries
    from katdata.tag import TagConfig, rule_tags

    if spec.path is None:
        queries = sources.load(PACKAGED[spec.name], limit=spec.limit, seed=spec.seed)
    else:
        if not Path(spec.path).exists():
            raise InputError(spec.path, f"file not found (recipe key eval.benchmarks: {spec.name}.path)")
        queries = read_queries(spec.path, spec.fields)
        if spec.limit is not None and spec.limit < len(queries):
            queries = random.Random(spec.seed).sample(queries, spec.limit)
    tag_cfg = TagConfig()
    out = []
    for q in queries:
        tags = rule_tags(q, tag_cfg)
        meta = dict(q.meta)
        if q.kind == "code" and not meta.get("prompt"):
            meta["prompt"] = q.query  # HumanEval: the answer completes the prompt's signature
        messages = ([{"role": "system", "content": q.system}] if q.system else []) + [
            {"role": "user", "content": q.query}]
        out.append(Item(q.id, messages, None, tags["difficulty"], str(tags["domain"]), str(tags["task_type"]),
                        q.kind, q.reference, q.query, meta))
    return out


def row_key(bench: str, model: str, setting: str, item_id: str, sample: int) -> str:
    return f"{bench}:{model}:{setting}:{item_id}:{sample}"


def item_seed(spec: BenchmarkConfig, item_id: str) -> int:
    """The seed of an item's first sample (sample i: + i), from the benchmark's seed and the item id alone."""
    return (spec.seed * 1_000_003 + zlib.crc32(item_id.encode())) % (2 ** 31 - 128)


def generate(backend, model: str, spec: BenchmarkConfig, its: list, max_tokens: int, penalties: dict, writer,
             done: set, verifier) -> int:
    """Answer every item of one benchmark not yet done in its settings, ``spec.k`` samples each, all in one stream;
    write a row per sample as its request finishes. Returns the rows written."""
    from katdata.backends.base import Job, Request, SamplingParams
    from katdata.eval_items import prefix, verdict
    from katdata.template import STOP_STRINGS, parse

    params = SamplingParams(n=spec.k, temperature=spec.sampling_temperature, top_p=spec.top_p,
                            max_tokens=spec.max_tokens or max_tokens, stop=tuple(STOP_STRINGS), **penalties)
    todo = [(s, it) for s in spec.settings for it in its
            if any(row_key(spec.name, model, s, it.id, i) not in done for i in range(spec.k))]
    sampled = params.temperature > 0  # a seed per item: the same samples whatever else is in the batch (greedy
    # decoding needs none, and one shared seed keeps the items batched together on engines that batch by params)
    jobs = (Job((s, it), Request(it.messages, prefix(s, it)),
                params.with_(seed=item_seed(spec, it.id) if sampled else spec.seed)) for s, it in todo)
    written = 0
    for job, comps in backend.stream(jobs):
        (setting, it), seed = job.key, job.params.seed
        parsed = [parse(job.request.prefix + c.text, c.finish_reason) for c in comps]
        keys = answer_classes(verifier, it, parsed)
        for i, (c, p, (raw, cls)) in enumerate(zip(comps, parsed, keys)):
            key = row_key(spec.name, model, setting, it.id, i)
            if key not in done:  # a kill between the k rows of a request: the rest come now, same seeds
                writer.write(_row(key, spec, model, setting, it, i, seed + i if sampled else None,
                                  job.request.prefix, c, p, cls, verdict(verifier, it, p.answer, raw)))
                written += 1
    return written


def answer_classes(verifier, it, parsed: list) -> list[tuple]:
    """(key, class) of each sample's answer: its verifier key, merged with an earlier sample's where the verifier
    says they are the same answer (as the sample stage's classes: "1/2" and "0.5" vote together in maj@k);
    (None, None) for no answer or a verifier failure."""
    from katdata.verify import VerifyError, assign_class

    seen: list[str] = []
    out = []
    for p in parsed:
        try:
            raw = verifier.key(it.kind, p.answer, it) if p.answer is not None else None
            out.append((raw, assign_class(it.kind, raw, seen, verifier) if raw is not None else None))
        except VerifyError:
            out.append((None, None))
    return out


def _row(key, spec, model, setting, it, sample, seed, pre, c, p, answer_key, correct) -> dict:
    return {"key": key, "benchmark": spec.name, "model": model, "setting": setting, "id": it.id, "sample": sample,
            "k": spec.k, "seed": seed, "prefix": pre, "text": c.text, "finish_reason": c.finish_reason,
            "tokens": c.completion_tokens, "prompt_tokens": c.prompt_tokens, "ok": p.ok, "errors": p.errors,
            "mode": p.mode if setting == "auto" else setting, "answer_key": answer_key, "correct": correct,
            "error": c.error}


def contamination(name: str, its: list, texts: list[str], cfg=None) -> dict:
    """How many of a benchmark's evaluated items appear in the training queries, by the decontaminate stage's
    matcher (exact, or word n-grams over its threshold; the recipe's decontaminate settings when given)."""
    return contaminations({name: its}, texts, cfg)[name]


def contaminations(its: dict[str, list], texts: list[str], cfg=None) -> dict[str, dict]:
    """`contamination` of each benchmark of ``its`` (name: items), each training text split into words and n-grams
    once for them all."""
    from katdata.decontaminate import BenchmarkIndex, DecontaminateConfig, match_words, ngrams, words

    cfg = cfg or DecontaminateConfig()
    indexes = {name: [BenchmarkIndex(name, ((it.id, it.query) for it in items), cfg.ngram)]
               for name, items in its.items()}
    found: dict[str, dict] = {name: {} for name in its}
    for text in texts:
        ws = words(text)
        grams = ngrams(ws, cfg.ngram)
        for name, index in indexes.items():
            m = match_words(ws, grams, index, cfg)
            if m is not None:
                found[name].setdefault(m.item_id, m.kind)
    method = f"decontaminate matcher: exact, or {cfg.ngram}-gram share >= {cfg.threshold}"
    return {name: {"items": len(its[name]), "in_training": len(found[name]), "ids": sorted(found[name]),
                   "method": method} for name in its}


def read_rows(path: Path, keys: list[str]) -> list[dict]:
    """The rows of ``path`` for ``keys``, in their order (so a resumed run reads the same), the first of each key."""
    rows: dict[str, dict] = {}
    wanted = set(keys)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    r = json.loads(line)
                    if r["key"] in wanted:
                        rows.setdefault(r["key"], r)
    return [rows[k] for k in keys if k in rows]


def results(specs: list[BenchmarkConfig], its: dict[str, list], rows: list[dict], texts: list[str],
            plot_to: Optional[Path], decontaminate=None) -> dict:
    """eval.json's ``benchmarks`` (per benchmark: its settings, the figures per model and setting, the token saving
    and the contamination count against the training queries ``texts``, by ``decontaminate``'s n-gram settings when
    given) and ``benchmark_plot`` when ``plot_to`` is a folder."""
    from katdata import bench_figures

    figs = bench_figures.figures(rows)
    found = contaminations({s.name: its[s.name] for s in specs}, texts, decontaminate)
    out = {"benchmarks": {s.name: {"items": len(its[s.name]), "k": s.k, "temperature": s.sampling_temperature,
                                   "settings": list(s.settings), **figs.get(s.name, {}),
                                   "contamination": found[s.name]}
                      for s in specs}}
    if plot_to is not None and figs:
        out["benchmark_plot"] = bench_figures.plot(figs, plot_to)
    return out


def wanted_keys(specs: list[BenchmarkConfig], its: dict[str, list], models: list[str]) -> list[str]:
    return [row_key(s.name, m, setting, it.id, i) for s in specs for m in models for setting in s.settings
            for it in its[s.name] for i in range(s.k)]


def card_section(run_dir: Path) -> list[str]:
    """The dataset card's benchmark section, from an eval of the run with benchmarks (eval/eval.json), else
    nothing: an export written after eval (``katdata export RUN --out DIR``) shows it."""
    from katdata import bench_figures
    from katdata.run_folder import RunFolder

    path = RunFolder(run_dir).eval / "eval.json"
    data = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    if not data.get("benchmarks"):
        return []
    out = bench_figures.card_lines(data["benchmarks"], data.get("benchmark_plot"))
    seen = [f"{name}: {b['contamination']['in_training']} of {b['contamination']['items']}"
            for name, b in data["benchmarks"].items()]
    return out + [f"Evaluated items that appear in the training queries (decontaminate's matcher): {'; '.join(seen)}.",
                  ""]


def copy_plot(run_dir: Path, folder: Path) -> None:
    """Put eval's benchmark plot next to the card that shows it."""
    import shutil

    from katdata.run_folder import RunFolder

    src = RunFolder(run_dir).eval / "benchmarks.png"
    if src.is_file():
        shutil.copyfile(src, Path(folder) / src.name)
