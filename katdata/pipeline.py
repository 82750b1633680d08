"""The pipeline: one stage after another, each reading the previous file and writing its own.

    load -> tag -> solve -> sample -> vote -> judge -> assemble -> review -> export -> train -> eval

Every stage appends rows to its file in the run folder and skips ids it already wrote, so a rerun
of the same command after a crash (even kill -9) continues where it stopped. ``summary.json``
records, per stage, rows in and out, rejects by reason, time and tokens; ``recipe.yaml`` is the
resolved recipe.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from katdata.errors import KatdataError
from katdata.recipe import Recipe, dump_recipe, load_recipe

log = logging.getLogger(__name__)

# stage name -> module with `run(cfg, run_dir, engine) -> dict` (None: built in)
STAGE_MODULES = {
    "load": None,
    "tag": "katdata.tag",
    "solve": "katdata.solve",
    "sample": "katdata.sample",
    "vote": "katdata.vote",
    "judge": "katdata.judge",
    "assemble": "katdata.assemble",
    "review": "katdata.review",
    "export": "katdata.export",
    "train": "katdata.train",
    "eval": "katdata.evaluate",
}
STAGES = list(STAGE_MODULES)
# what each stage writes in the run folder
STAGE_FILES = {
    "load": ["queries.jsonl"], "tag": ["tags.jsonl"], "solve": ["solve.jsonl"], "sample": ["samples.jsonl"],
    "vote": ["votes.jsonl"], "judge": ["judges.jsonl"], "assemble": ["records.jsonl", "rejects.jsonl"],
    "review": ["review"], "export": ["export"], "train": ["train"], "eval": ["eval"],
}
OPTIONAL = {"review", "train", "eval"}


class Engines:
    """The recipe's named engines, built on first use and cached (with the request cache)."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.recipe, self.run_dir, self._built = recipe, run_dir, {}

    def __call__(self, name: str = "default"):
        if name not in self._built:
            if name not in self.recipe.engines:
                raise KatdataError(f"recipe: no engine named '{name}' under engines: (have {', '.join(self.recipe.engines)})")
            from katdata.backends import get_backend
            from katdata.cache import CachedBackend

            cfg = self.recipe.engines[name]
            backend = get_backend(cfg.backend, cfg.backend_config())
            if cfg.cache:
                backend = CachedBackend(backend, self.run_dir / "cache" / f"{name}.jsonl")
            self._built[name] = backend
        return self._built[name]

    def close(self) -> None:
        for backend in self._built.values():
            backend.close()
        self._built.clear()


def load_queries(recipe: Recipe):
    """The recipe's queries (file and packaged sources), validated before any model loads."""
    from katdata import sources
    from katdata.inputs import read_queries

    if recipe.data is None:
        raise KatdataError("recipe: the load stage needs a 'data' section (data.path or data.sources)")
    queries = []
    if recipe.data.path:
        if not Path(recipe.data.path).exists():
            raise KatdataError(f"recipe key data.path: input not found: {recipe.data.path}")
        queries += read_queries(recipe.data.path, recipe.data.fields)
    for spec in recipe.data.sources:
        queries += sources.load(spec.name, spec.limit, seed=recipe.seed)
    if recipe.data.limit:
        queries = queries[: recipe.data.limit]
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise KatdataError("data: the same query id comes from two inputs; give them distinct ids")
    return queries


def _copy_round(previous: Path, run_dir: Path, stage: str) -> dict:
    """``previous_round``: the previous round's file of ``stage`` (queries, tags, solver traces) copied in."""
    name = STAGE_FILES[stage][0]
    if not (previous / name).is_file():  # a previous round without a solve stage
        return {"rows_in": 0, "rows_out": 0, "copied_from": str(previous)}
    tmp = run_dir / f"{name}.tmp"
    shutil.copyfile(previous / name, tmp)
    os.replace(tmp, run_dir / name)
    rows = sum(1 for line in open(run_dir / name, "rb") if line.strip())
    return {"rows_in": rows, "rows_out": rows, "copied_from": str(previous)}


def _load(recipe: Recipe, run_dir: Path, queries) -> dict:
    tmp = run_dir / "queries.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(q.model_dump_json() + "\n")
    os.replace(tmp, run_dir / "queries.jsonl")
    return {"rows_in": len(queries), "rows_out": len(queries)}


class Summary:
    """summary.json: one entry per stage; a stage marked done is skipped on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text("utf-8")) if path.is_file() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("done", False)

    def record(self, stage: str, stats: dict, seconds: float) -> None:
        prev = self.data["stages"].get(stage, {})
        stats = dict(stats, done=True, seconds=round(prev.get("seconds", 0.0) + seconds, 2))
        self.data["stages"][stage] = stats
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str), "utf-8")
        os.replace(tmp, self.path)

    def forget(self, stages: list[str]) -> None:
        for s in stages:
            self.data["stages"].pop(s, None)


def _progress(recipe: Recipe, run_dir: Path, stage: str):
    """The stage's progress bar, counting the rows it appends out of what it will process: every query
    (tag), the queries chosen for solving (solve), at most 2 x n samples per query (sample; fewer when a
    vote settles early, and the bar then closes at the count drawn), the queries with samples (vote), the
    labelled votes (judge), every vote (assemble). Stages that append no rows get no bar, and no stage
    gets one when stderr is not a terminal."""
    import sys
    from contextlib import nullcontext

    from katdata.report import FileProgress

    files = [run_dir / f for f in STAGE_FILES[stage] if f.endswith(".jsonl")]
    if not files or not sys.stderr.isatty():
        return nullcontext()
    queries = _ids(run_dir / "queries.jsonl")
    off = _ids(run_dir / "tags.jsonl", lambda t: t.get("think_off_candidate")) & queries
    if stage == "sample":
        skipped = off if recipe.sample.skip_on_for_off_candidates else set()
        return FileProgress(files, recipe.sample.n * (2 * len(queries) - len(skipped)), stage, unit="sample")
    if stage == "solve" and recipe.solve.queries == "not_off_candidates":
        queries -= off
    elif stage == "vote":
        queries = _ids(run_dir / "samples.jsonl", lambda a: a.get("source") == "vote")
    elif stage in ("judge", "assemble"):
        queries &= _ids(run_dir / "votes.jsonl", lambda v: stage == "assemble" or v.get("label") is not None)
    return FileProgress(files, len(queries), stage, unit="query")


def _ids(path: Path, keep: Callable[[dict], bool] = lambda row: True) -> set:
    """The ids of a run file's complete rows that ``keep`` accepts; none when the file is missing."""
    if not path.is_file():
        return set()
    with open(path, "rb") as f:
        return {row["id"] for row in (json.loads(raw) for raw in f if raw.endswith(b"\n")) if keep(row)}


def _selected(recipe: Recipe, start: Optional[str], until: Optional[str]) -> list[str]:
    for name, value in (("--from", start), ("--until", until)):
        if value and value not in STAGES:
            raise KatdataError(f"{name} {value}: unknown stage; stages: {', '.join(STAGES)}")
    names = STAGES[STAGES.index(start) if start else 0: STAGES.index(until) + 1 if until else None]
    return [s for s in names if s not in OPTIONAL or getattr(recipe, s) is not None]


def _archive_from(run_dir: Path, summary: Summary, stage: str) -> None:
    """--from STAGE: move the outputs of STAGE and later stages aside (nothing is deleted)."""
    later = STAGES[STAGES.index(stage):]
    keep = run_dir / "old" / time.strftime("%Y%m%d-%H%M%S")
    for name in (f for s in later for f in STAGE_FILES[s]):
        if (run_dir / name).exists():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir / name), keep / name)
    summary.forget(later)


def run(recipe: Recipe, run_dir: Path, start: Optional[str] = None, until: Optional[str] = None,
        on_stage: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Run (or resume) the recipe's stages in ``run_dir``; returns summary.json's content."""
    stages = _selected(recipe, start, until)
    copied = [s for s in ("load", "tag", "solve") if s in stages] if recipe.previous_round else []
    queries = load_queries(recipe) if "load" in stages and not copied else None  # bad input fails here
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), "utf-8")
    summary = Summary(run_dir / "summary.json")
    if start:
        _archive_from(run_dir, summary, start)
    engines = Engines(recipe, run_dir)
    try:
        for stage in stages:
            if summary.done(stage):
                log.info("%s: done already, skipped", stage)
                continue
            log.info("%s: running", stage)
            t0 = time.perf_counter()
            if stage in copied:
                stats = _copy_round(Path(recipe.previous_round), run_dir, stage)
            elif stage == "load":
                stats = _load(recipe, run_dir, queries)
            else:
                module = importlib.import_module(STAGE_MODULES[stage])
                with _progress(recipe, run_dir, stage):
                    stats = module.run(getattr(recipe, stage), run_dir, engines) or {}
            summary.record(stage, stats, time.perf_counter() - t0)
            if on_stage:
                on_stage(stage, summary.data["stages"][stage])
    finally:
        engines.close()
    return summary.data


def main_run(args) -> int:
    """`katdata run RECIPE [--set ...] [--run-dir DIR] [--from STAGE] [--until STAGE]`."""
    from katdata.report import print_summary

    recipe = load_recipe(args.recipe, args.set)
    run_dir = Path(args.run_dir or recipe.run_dir.format(name=recipe.name))
    t0 = time.perf_counter()
    data = run(recipe, run_dir, args.from_stage, args.until)
    print_summary(data, run_dir, time.perf_counter() - t0)
    return 0
