"""The pipeline: one stage after another, each reading the previous file and writing its own.

    load -> decontaminate -> tag -> solve -> sample -> vote -> judge -> assemble -> review -> export -> train -> rl -> eval

The stages and their order come from their declarations (katdata.stage, katdata.stages); this module
runs them.

Every stage appends rows to its file in the run folder and skips ids it already wrote, so a rerun
of the same command after a crash (even kill -9) continues where it stopped. ``summary.json``
records, per stage, rows in and out, rejects by reason, time and tokens, and the fingerprint of the
settings and input files that made its output: a rerun with other settings for a started or finished
stage stops before anything runs (``--from STAGE`` recomputes). ``recipe.yaml`` is the resolved
recipe that produced the files (only secrets redacted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from katdata import fingerprint
from katdata.errors import KatdataError
from katdata.recipe import Recipe, dump_recipe, load_recipe
from katdata.run_folder import FILES, RunFolder, Summary, check_inputs, holds_model_output
from katdata.stage import Context
from katdata.stages import all_stages, get, names

log = logging.getLogger(__name__)

STAGES = names()
OPTIONAL = {s.name for s in all_stages() if s.optional}
# what each stage writes in the run folder (from its declaration), and what it may leave unwritten
STAGE_FILES = {s.name: s.files(s.writes) for s in all_stages()}
MAYBE_WRITTEN = {name for s in all_stages() for name in s.files(s.maybe_writes)}
PRODUCERS = {name: stage for stage, files in STAGE_FILES.items() for name in files}
MODEL_FILES = [name for s in all_stages() if s.name not in ("load", "decontaminate") for name in STAGE_FILES[s.name]]
ROUND_COPIES = ("load", "decontaminate", "tag", "solve")  # what previous_round copies in place of running it


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
            backend = get_backend(cfg.backend, cfg)
            if cfg.cache:
                backend = CachedBackend(backend, self.run_dir / "cache" / f"{name}.jsonl")
            self._built[name] = backend
        return self._built[name]

    def settings(self, name: str) -> dict:
        """The settings of engine ``name`` that change its outputs (for the eval fingerprint)."""
        return fingerprint.engine_settings(self.recipe.engines[name]) if name in self.recipe.engines else {}

    def close(self) -> None:
        for backend in self._built.values():
            backend.close()
        self._built.clear()


def _copy_round(previous: Path, run_dir: Path, stage: str) -> dict:
    """``previous_round``: the previous round's files of ``stage`` (queries, tags, solver traces) copied in."""
    rows = 0
    for name in STAGE_FILES[stage]:
        if not (previous / name).is_file():  # a previous round without a solve stage, or made before the stage
            continue
        tmp = run_dir / f"{name}.tmp"
        shutil.copyfile(previous / name, tmp)
        os.replace(tmp, run_dir / name)
        rows = rows or sum(1 for line in open(run_dir / name, "rb") if line.strip())
    before = Summary(RunFolder(previous).summary).data["stages"].get(stage, {})  # what the stage said there
    before = {k: v for k, v in before.items() if k not in ("done", "seconds")}
    return {**before, "rows_in": rows, "rows_out": rows, "copied_from": str(previous)}


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
    queries = _ids(RunFolder(run_dir).queries)
    off = _ids(RunFolder(run_dir).tags, lambda t: t.get("think_off_candidate")) & queries
    if stage == "sample":
        skipped = off if recipe.sample.skip_on_for_off_candidates else set()
        return FileProgress(files, recipe.sample.n * (2 * len(queries) - len(skipped)), stage, unit="sample")
    if stage == "solve" and recipe.solve.queries == "not_off_candidates":
        queries -= off
    elif stage == "vote":
        queries = _ids(RunFolder(run_dir).samples, lambda a: a.get("source") == "vote")
    elif stage in ("judge", "assemble"):
        queries &= _ids(RunFolder(run_dir).votes, lambda v: stage == "assemble" or v.get("label") is not None)
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
    if start and until and STAGES.index(until) < STAGES.index(start):
        raise KatdataError(f"--until {until} comes before --from {start}; the stages run in this order: "
                           + " -> ".join(STAGES))
    if start in OPTIONAL and getattr(recipe, start) is None:
        raise KatdataError(f"--from {start}: the recipe has no '{start}' section")
    names = STAGES[STAGES.index(start) if start else 0: STAGES.index(until) + 1 if until else None]
    return [s for s in names if s not in OPTIONAL or getattr(recipe, s) is not None]


def _outputs(recipe: Recipe, stage: str, run_dir: Path) -> list[Path]:
    """What a stage writes (export may write outside the run folder)."""
    if stage == "export" and recipe.export.out:
        return [Path(recipe.export.out)]
    return [run_dir / name for name in STAGE_FILES[stage]]


def _finished(recipe: Recipe, run_dir: Path, summary: Summary, stage: str, quiet: bool = False) -> bool:
    """Marked done in summary.json and its outputs are there (else it runs again)."""
    if not summary.done(stage):
        return False
    missing = [str(p) for p in _outputs(recipe, stage, run_dir) if not p.exists() and p.name not in MAYBE_WRITTEN]
    if missing and not quiet:
        log.warning("%s: marked done but %s is missing: running it again", stage, ", ".join(missing))
    return not missing


def _wrote(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 or path.is_dir() and any(path.iterdir())


def _check_unchanged(recipe: Recipe, run_dir: Path, summary: Summary, stages: list[str],
                     memo: Optional[dict] = None, redo_hint: Optional[str] = None) -> None:
    """Stop, before anything runs, when a started or finished stage was made with other settings or inputs."""
    stale, changes = [], []
    for stage in stages:
        old = summary.data["fingerprints"].get(stage)  # None: not started, or recorded by an older katdata
        outputs = _outputs(recipe, stage, run_dir)
        finished = summary.done(stage) and all(p.exists() or p.name in MAYBE_WRITTEN for p in outputs)
        # started but wrote nothing (e.g. its engine failed): nothing to mix with
        started = not summary.done(stage) and stage in summary.data["stages"] and any(_wrote(p) for p in outputs)
        if old is not None and (finished or started):
            diff = fingerprint.compare(old, fingerprint.stage_fingerprint(recipe, get(stage), run_dir, memo))
            if diff:
                stale.append(stage)
                changes += [f"{stage}: {d}" if d.startswith("input ") else d for d in diff if d not in changes]
        if not finished:
            break  # this stage runs now; when it starts, the outputs of the later ones move aside
    if stale:
        first = stale[0]
        state = "finished" if summary.done(first) else "started"
        raise KatdataError(
            f"{run_dir}: {first} ({state}) was made with other settings or inputs: {'; '.join(changes)}. "
            f"To recompute, rerun with {redo_hint or '--from ' + first} (its outputs and the later ones move to {run_dir / 'old'}); "
            f"to keep this run as it is, " + ("copy the run folder and run the stage in the copy" if redo_hint else
                                             "give a new folder with --run-dir"))


def _check_stage_inputs(recipe: Recipe, run_dir: Path, summary: Summary, stages: list[str], redo: list[str],
                        copied: list[str], memo: Optional[dict] = None) -> None:
    """Each stage that will run finds its run files made (by an earlier stage, or one running before it now)
    and unchanged since; checked before anything in the folder changes."""
    running: set[str] = set()
    for stage in stages:
        if stage not in redo and summary.done(stage) and _finished(recipe, run_dir, summary, stage, quiet=True):
            continue
        if stage not in copied:
            paths = fingerprint.stage_input_paths(recipe, get(stage), run_dir)
            check_inputs(summary, run_dir, stage, paths, running, PRODUCERS, get(stage).files(get(stage).reads), memo)
        running.add(stage)


def check_stage_files(recipe: Recipe, run_dir: Path, stage: str) -> None:
    """For a command that reads a stage's run files without running the stage (an export copied outside the
    run): every file it reads is there and as its stage wrote it (else one line naming the file)."""
    _check_stage_inputs(recipe, Path(run_dir), Summary(RunFolder(run_dir).summary), [stage], [stage], [])


def _recipe_file(recipe: Recipe, summary: Summary, stages: list[str], redo: list[str]) -> str:
    """recipe.yaml, or recipe.STAGE.yaml when earlier outputs in the folder came from other settings (--from).

    Only stages before the first selected one can survive a run: a stage that starts moves the later ones aside.
    """
    kept = [s for s in summary.data["fingerprints"] if STAGES.index(s) < STAGES.index(stages[0]) and s not in redo]
    recorded = summary.data["fingerprints"]
    mixed = [s for s in kept if recorded[s].get("settings") != fingerprint.stage_settings(recipe, get(s))]
    if mixed:
        log.info("the outputs of %s were made with other settings: this recipe is saved as recipe.%s.yaml",
                 ", ".join(mixed), stages[0])
        return f"recipe.{stages[0]}.yaml"
    return FILES["recipe"]


def _move_aside(recipe: Recipe, run_dir: Path, stages: list[str]) -> None:
    """Move the outputs of ``stages`` (those inside the run folder) to RUN/old/TIME/ (nothing is deleted)."""
    paths = [p for s in stages for p in _outputs(recipe, s, run_dir) if p.exists() and p.resolve().is_relative_to(
        run_dir.resolve())]
    if not paths:
        return
    keep = run_dir / "old" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while keep.exists():
        keep, n = keep.with_name(f"{keep.name.split('.')[0]}.{n}"), n + 1
    keep.mkdir(parents=True)
    for p in paths:
        (keep / p.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(p), keep / p.relative_to(run_dir))
    log.info("moved %s to %s", ", ".join(p.name for p in paths), keep)


def _begin(recipe: Recipe, run_dir: Path, summary: Summary, stage: str, redo: list[str], recipe_name: str) -> None:
    """A stage really starts: outputs it makes stale move aside and summary.json forgets them, the stage is
    recorded as started (not done) with its fingerprint, and the recipe is saved. Creates the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = {**summary.data["stages"], **summary.data["fingerprints"]}
    later = [s for s in STAGES[STAGES.index(stage) + 1:] if s in recorded]
    forget = list(dict.fromkeys(redo + later))
    _move_aside(recipe, run_dir, forget)
    summary.begin(stage, forget, fingerprint.stage_fingerprint(recipe, get(stage), run_dir))
    tmp = run_dir / f".{recipe_name}.tmp"
    tmp.write_text(dump_recipe(recipe), "utf-8")
    os.replace(tmp, run_dir / recipe_name)


def _check_isolation(recipe: Recipe, run_dir: Path, stages: list[str], queries) -> None:
    """Code answers are run in solve, sample and eval: when they cannot be isolated, refuse now,
    before the tag stage loads a model (``sandbox.allow_unisolated`` lets the run go on)."""
    if not {"solve", "sample", "eval"} & set(stages):
        return
    if queries is None:
        from katdata.records import Query
        from katdata.runfiles import read_rows

        path = RunFolder(run_dir).queries
        queries = read_rows(path, Query) if path.is_file() else []
    from katdata.verify import Verifier

    Verifier(sandbox=recipe.sandbox).code_isolation(queries)


def run(recipe: Recipe, run_dir: Path, start: Optional[str] = None, until: Optional[str] = None,
        on_stage: Optional[Callable[[str, dict], None]] = None, recompute: Optional[bool] = None,
        worker: bool = False, sync: Optional[Callable[[], None]] = None) -> dict:
    """Run (or resume) the recipe's stages in ``run_dir``; returns summary.json's content.

    Everything is checked before the run folder is touched: the stages, the input queries, and that
    no started or finished stage was made with other settings, and that every run file a stage reads
    is there, as its stage wrote it. A run folder this call created is removed again when the run fails
    before a model wrote anything into it (an engine that failed to load, a server that never answered).

    ``start`` recomputes from that stage on (``--from``); with ``recompute=False`` (a stage command
    without ``--redo``) it resumes there instead, under the same checks.

    Under a launch of several processes (``accelerate launch``, torchrun), rank 0 checks, moves aside and
    records; ``sync`` is the launch's barrier, passed once rank 0 has begun (or skipped) the first stage; the
    other ranks (``worker``) wait there and then run the stages' bodies only.
    """
    recompute = bool(start) if recompute is None else recompute
    stages = _selected(recipe, start, until)
    if worker:
        return _work(recipe, Path(run_dir), stages, sync)
    copied = [s for s in ROUND_COPIES if s in stages] if recipe.previous_round else []
    # each stage's own checks (the load stage reads and checks its input here): bad input fails now
    prepared = {s: get(s).prepare(recipe) for s in stages if s not in copied and get(s).prepare is not None}
    queries = prepared.get("load")
    run_dir = Path(run_dir)
    summary = Summary(RunFolder(run_dir).summary)
    redo = STAGES[STAGES.index(start):] if start and recompute else []
    memo: dict = {}  # file hashes, each file read once by the checks below
    _check_unchanged(recipe, run_dir, summary, [s for s in stages if s not in redo], memo,
                     redo_hint="--redo" if start and start == until and not recompute else None)
    _check_stage_inputs(recipe, run_dir, summary, stages, redo, copied, memo)
    if "export" in stages and recipe.export.out:  # a user's folder is refused now, not hours later
        from katdata.output_paths import check_replaceable

        check_replaceable(Path(recipe.export.out), run_dir=run_dir, kind="export", label="export.out")
    _check_isolation(recipe, run_dir, stages, queries)
    recipe_name = _recipe_file(recipe, summary, stages, redo) if stages else FILES["recipe"]
    fresh = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)  # what we create
    engines = Engines(recipe, run_dir)
    try:
        for stage in stages:
            done = stage not in redo and _finished(recipe, run_dir, summary, stage)
            if not done:
                _begin(recipe, run_dir, summary, stage, redo, recipe_name)
                redo = []
            if sync:  # the other ranks of a launch go on once rank 0 has begun (or skipped) the first stage
                sync()
                sync = None
            if done:
                log.info("%s: done already, skipped", stage)
                continue
            log.info("%s: running", stage)
            t0 = time.perf_counter()
            if stage in copied:
                stats = _copy_round(Path(recipe.previous_round), run_dir, stage)
            else:
                with _progress(recipe, run_dir, stage):
                    stats = get(stage).run(Context(recipe, RunFolder(run_dir), engines, get(stage), prepared.get(stage)))
            summary.record(stage, stats or {}, time.perf_counter() - t0,
                           [n for n in STAGE_FILES[stage] if n not in MAYBE_WRITTEN])
            if on_stage:
                on_stage(stage, summary.data["stages"][stage])
    except BaseException:
        if fresh is not None and fresh.is_dir() and not holds_model_output(run_dir, MODEL_FILES):
            shutil.rmtree(fresh, ignore_errors=True)
            log.info("removed %s: the run stopped before any model output", fresh)
        raise
    finally:
        engines.close()
    if sync:  # no stage selected: the other ranks still wait
        sync()
    return summary.data


def _work(recipe: Recipe, run_dir: Path, stages: list[str], sync: Optional[Callable[[], None]]) -> dict:
    """A rank other than 0 of a launch: after rank 0 has checked the folder and begun the stage, run the bodies
    of the stages rank 0 runs (not those it found done); write nothing of the pipeline's own."""
    if sync:
        sync()
    summary = Summary(RunFolder(run_dir).summary)
    engines = Engines(recipe, run_dir)
    try:
        for stage in stages:
            if summary.done(stage) and _finished(recipe, run_dir, summary, stage, quiet=True):
                continue
            get(stage).run(Context(recipe, RunFolder(run_dir), engines, get(stage), None))
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
