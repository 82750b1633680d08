"""katdata export: a run's records as a Hub dataset folder (README.md card + data/*.parquet).

Reads review/merged.jsonl when a review was merged, else records.jsonl, in two streaming passes a block
at a time (memory flat in the row count; katdata.export_arrow decodes each line once): 1. rows per
(mode, domain) stratum (counted in the same read as the hold-back scan when nothing is held back);
2. validate each row, assign it to train/test by selection sampling (exact, seeded, stratified; one pair of
counters per stratum), build the columns as Arrow arrays a row group at a time (katdata.export_columns),
write parquet row groups (katdata.export_write: encoded on a background thread). The reading is done span
by span (katdata.export_spans), in worker processes when KATDATA_EXPORT_WORKERS allows. A records file that
assemble's writer stamped and nobody changed since (katdata.written) is read by DuckDB instead, column-wise
(katdata.export_duck), with the rows per stratum the writer counted; whatever DuckDB could read otherwise
sends the export back to the Python reader, from the start. All goes to a temporary
folder renamed into place at the end; the place must be new, an empty folder or katdata's own earlier
export (katdata.output_paths), nothing else is replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata import card, export_arrow, export_duck, export_spans, kat_bulk, output_paths, review_routing, written
from katdata.card import features, from_hf_row  # noqa: F401  (re-exported: the layout of an export)
from katdata.export_columns import Batch, _provenance  # noqa: F401  (re-exported)
from katdata.export_write import Background, Format, SplitWriter, data_glob
from katdata.errors import EngineError, InputError, KatdataError, require
from katdata.stage import Stage
from katdata.run_folder import RunFolder

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


class ExportConfig(BaseModel):
    """Settings of the export stage (the ``export:`` section of a recipe, or `katdata export` flags)."""

    model_config = ConfigDict(extra="forbid")

    out: Optional[Path] = Field(None, description="output folder; default RUN_DIR/export. It must be new, empty or an "
                                "earlier katdata export (marked by .katdata-export.json), which it replaces; any "
                                "other folder, a file or a run folder is refused")
    format: Format = Field("hf", description="hf: all columns; trl: prompt/completion chat columns; "
                                             "llamafactory: sharegpt-style messages plus dataset_info.json")
    test_size: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows in the test split, per stratum")
    seed: int = Field(0, description="seed of the stratified train/test split")
    shard_rows: int = Field(500_000, ge=1, description="rows per parquet file")
    batch_rows: int = Field(2_000, ge=1, description="rows per parquet row group (rows held in memory at once)")
    license: str = Field("other", description="licence id for the card header (the sources' licences are listed "
                                              "in the card body)")
    pretty_name: Optional[str] = Field(None, description="dataset title in the card; default from the run folder")
    plot: bool = Field(True, description="draw the think-on share by difficulty as a PNG in the folder")
    push_to_hub: Optional[str] = Field(None, description="Hub dataset repo (user/name) to upload to; "
                                                         "the token comes from HF_TOKEN")
    private: bool = Field(False, description="create the Hub repo as private")
    require_review: bool = Field(True, description="leave out records routed to review (the vote's review flag or a "
                                 "rule in review.blocking) until a reviewer answered them; false includes them "
                                 "unreviewed (the card says how many)")


# ---------------------------------------------------------------- reading and splitting

def input_file(run_dir: Path) -> Path:
    """review/merged.jsonl when a review was merged, else records.jsonl."""
    merged = RunFolder(run_dir).merged
    return merged if merged.is_file() else RunFolder(run_dir).records


def _stratum(mode: Any, tags: Any) -> str:
    return export_arrow.stratum(mode, tags)


def count_strata(path: Path, skip: frozenset | set = frozenset()) -> dict[str, int]:
    """Pass 1: rows per (mode, domain) stratum, ids in ``skip`` left out; broken JSON raises InputError
    with the line (katdata.export_arrow: a block at a time)."""
    return export_arrow.count_strata(path, skip)


def allocate(counts: dict[str, int], test_size: float) -> dict[str, int]:
    """Test rows per stratum: round(total * test_size) shared out by largest remainder."""
    quota = {s: c * test_size for s, c in counts.items()}
    alloc = {s: math.floor(q) for s, q in quota.items()}
    rest = round(sum(counts.values()) * test_size) - sum(alloc.values())
    for s in sorted(quota, key=lambda s: (alloc[s] - quota[s], s))[:max(rest, 0)]:
        alloc[s] += 1
    return alloc


def read_records(path: Path) -> Iterator:
    """Pass 2: validated records (KatRecord's attributes), in file order; a bad row raises InputError naming
    file, line and field."""
    for recs in export_arrow.record_blocks(path):
        yield from recs


def split_blocks(path: Path, test_size: float, seed: int, counts: dict[str, int] | None = None,
                 skip: frozenset | set = frozenset()) -> Iterator[tuple[list, list[bool]]]:
    """(records, their test flags) a block at a time: an exact stratified split by selection sampling, seeded,
    in file order; the ids in ``skip`` are left out."""
    counts = count_strata(path, skip) if counts is None else counts
    alloc = allocate(counts, test_size)
    left = {s: [counts[s], alloc[s]] for s in counts}  # rows left, test rows left
    rand = random.Random(seed).random
    for recs in export_arrow.record_blocks(path):
        keep, tests = [], []
        for rec in recs:
            if skip and rec.id in skip:
                continue
            domain = rec.tags.get("domain")
            state = left.get(f"{rec.mode}|{domain if domain is not None else 'unknown'}")
            if state is None or state[0] <= 0:
                raise InputError(path, f"record {rec.id} not seen in the first pass: the file changed during export")
            test = rand() * state[0] < state[1]
            state[0] -= 1
            state[1] -= test
            keep.append(rec)
            tests.append(test)
        yield keep, tests


def split_records(path: Path, test_size: float, seed: int, counts: dict[str, int] | None = None,
                  skip: frozenset | set = frozenset()) -> Iterator[tuple[str, Any]]:
    """(split, record) pairs of `split_blocks`."""
    for recs, tests in split_blocks(path, test_size, seed, counts, skip):
        for rec, test in zip(recs, tests):
            yield ("test" if test else "train"), rec


# ---------------------------------------------------------------- writing (katdata.export_write)

def _write_dataset(tmp: Path, src: Path, run_dir: Path, cfg: ExportConfig, waits: set[str], recipe=None,
                   reader=None, per_span: Optional[list[Counter]] = None) -> dict:
    """Pass 1 (rows per stratum; ``per_span``: its rows per span as the hold-back scan or DuckDB's plan counted
    them, None: read them here), pass 2 (split and write), the card."""
    hf_schema, schema = features("hf").arrow_schema, features(cfg.format).arrow_schema
    skip = waits if cfg.require_review else frozenset()
    export_arrow._check(src)
    reader = reader or export_spans.Reader(src, workers=1)
    counts: Counter = Counter()
    starts = [0]  # kept records before each span
    for part in (per_span if per_span is not None else reader.map(export_spans.count_span, skip)):
        counts.update(part)
        starts.append(starts[-1] + sum(part.values()))
    hinted = isinstance(reader, export_duck.Reader)  # counts not read from the file itself: checked as it is read
    if hinted:
        parts = reader.tables(hf_schema, cfg.batch_rows)
    else:
        each = [(start, cfg.batch_rows) for start in starts[:-1]]
        parts = reader.map(export_spans.table_span, skip, hf_schema, each=each)
    total = sum(counts.values())
    if total == 0:
        why = f"all {len(skip)} records wait for review ({review_routing.WAIT_HINT})" if skip else "no records to export"
        raise InputError(src, why)
    alloc = allocate(counts, cfg.test_size)
    n_test = sum(alloc.values())
    sizes = {"train": total - n_test, "test": n_test}
    background = Background()  # the parquet encoding, beside the decoding
    try:
        writers = {s: SplitWriter(tmp, cfg.format, s, sizes[s], schema, cfg.shard_rows, cfg.batch_rows, background)
                   for s in SPLITS if sizes[s]}
        stats = _split(src, cfg, parts, counts, alloc, writers, schema, hinted)
        for w in writers.values():
            w.close()
        # the card (its counters, plot and text) while the thread encodes the last row groups: it reads no parquet
        splits = {s: {"rows": w.rows, "bytes": w.nbytes, "files": w.n_shards, "pattern": data_glob(cfg.format, s)}
                  for s, w in writers.items()}
        if cfg.format == "llamafactory":
            card.llamafactory_info(tmp, splits)
        stats.review_note = _review_note(len(waits), cfg.require_review)
        card.write_card(tmp, run_dir, src, stats, splits, features(cfg.format), cfg, recipe)
        background.close()
    finally:
        background.close(quiet=True)
    return {"rows_in": total + len(skip), "rows_out": stats.n, "splits": {s: v["rows"] for s, v in splits.items()},
            "on": stats.modes["on"], "off": stats.modes["off"], "format": cfg.format}


def _split(src: Path, cfg: ExportConfig, parts: Iterator[tuple[list[str], list]], counts: Counter, alloc: dict,
           writers: dict, schema, hinted: bool = False) -> card.CardStats:
    """Pass 2: each kept record (``parts``: the strata and hf tables of the kept records, in file order) to train or
    test (exact, stratified selection sampling in file order: rows left, test rows left per stratum), its row group
    counted for the card and written."""
    import pyarrow as pa

    stats = card.CardStats()

    def flush(table, tests: list[bool]) -> None:
        table = table.combine_chunks()  # one chunk per row group, as the writers always got it
        test = pa.array(tests, pa.bool_())
        stats.add_table(table, test)
        table = card.view(table, cfg.format, schema)
        for split, mask in (("train", pa.compute.invert(test)), ("test", test)):
            if split in writers:
                writers[split].add(table.filter(mask))

    left = {s: [counts[s], alloc[s]] for s in counts}
    rand = random.Random(cfg.seed).random
    pieces, rows, tests = [], 0, []  # the row group being gathered
    for strata, tables in parts:
        for i, key in enumerate(strata):
            state = left.get(key)
            if state is None or state[0] <= 0:
                if hinted:
                    raise export_duck.Fallback(f"more {key} records than counted")
                raise InputError(src, f"record {_id(tables, i)} not seen in the first pass: the file changed during "
                                 "export")
            test = rand() * state[0] < state[1]
            state[0] -= 1
            state[1] -= test
            tests.append(test)
        for table in tables:  # cut at row group ends by the span (pass 1 counted the rows before it)
            while table.num_rows:
                take = min(table.num_rows, cfg.batch_rows - rows)
                pieces.append(table if take == table.num_rows else table.slice(0, take))
                table, rows = table.slice(take), rows + take
                if rows == cfg.batch_rows:
                    flush(pa.concat_tables(pieces), tests[:rows])
                    pieces, tests, rows = [], tests[rows:], 0
    if rows:
        flush(pa.concat_tables(pieces), tests)
    if hinted and any(state[0] for state in left.values()):
        raise export_duck.Fallback("fewer records than counted")
    return stats


def _id(tables: list, i: int) -> str:
    for t in tables:
        if i < t.num_rows:
            return t.column("id")[i].as_py()
        i -= t.num_rows
    return "?"


def _waiting(reader: export_spans.Reader, run_dir: Path, src: Path, policy: review_routing.ReviewConfig,
             held_back: bool) -> tuple[set[str], Optional[list[Counter]]]:
    """review_routing.waiting, and pass 1's rows per span where the same read gave them (without the waiting ids
    when ``held_back``; None when the scan could not tell): with the vote's flag alone (no blocking rules), the
    flagged ids and the strata, read span by span (bad rows fail here)."""
    if policy.blocking:
        return review_routing.waiting(run_dir, src, policy), None
    scans = list(reader.map(export_spans.flag_count_span))
    waits = set().union(*(s.flags for s in scans))
    return waits, export_spans.held_counts(scans, waits) if held_back else [s.all for s in scans]


def _fast(src: Path, run_dir: Path, policy: review_routing.ReviewConfig, held_back: bool):
    """(DuckDB's reader, the waiting ids, its rows per stratum) for a records file katdata wrote and nobody changed
    since (katdata.export_duck), or (None, None, None): the file is read in Python. The rows per stratum and the
    flagged ids come from what the writer counted (katdata.written) where it did and no blocking rule holds records
    back, else from a first read."""
    if not export_duck.available(src):
        return None, None, None
    facts = written.counted(src)
    reader = export_duck.Reader(src, keys=written.keys(facts))
    try:
        if facts is not None and not policy.blocking:
            waits = {i for i, _ in facts["flagged"]}
            counts = Counter(facts["strata"])
            if held_back:
                counts.subtract(s for _, s in facts["flagged"])
                reader.set_skip(waits)
        else:
            waits = review_routing.waiting(run_dir, src, policy) if policy.blocking else set()
            reader.set_skip(waits if held_back else frozenset())
            counts, n_flagged = reader.plan()
            if n_flagged and not policy.blocking:
                waits = reader.flags()
                if held_back:
                    reader.set_skip(waits)
                    counts, _ = reader.plan()
    except export_duck.Fallback as why:
        log.info("%s: %s: export reads it in Python", src, why)
        reader.close()
        return None, None, None
    except BaseException:
        reader.close()
        raise
    log.debug("reading %s with DuckDB (katdata wrote it, unchanged since)", src)
    return reader, waits, [+counts]


def _review_note(waits: int, required: bool) -> str:
    """The card's line on records that wait for a reviewer."""
    if required:
        return (f"Held back for review: {waits} records routed to review (the vote's review flag or a blocking "
                "rule) have no reviewer's answer yet and are not in this dataset.")
    return (f"export.require_review is false: {waits} records routed to review without a reviewer's answer "
            "are included unreviewed.")


def _replace(tmp: Path, out: Path, run_dir: Path, label: str) -> None:
    """Move the finished folder into place. Checked again first (export may have run for minutes): only a new
    path, an empty folder or katdata's own earlier export is replaced; that export is removed after the rename."""
    if output_paths.check_replaceable(out, run_dir=run_dir, kind="export", label=label) == "own":
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)  # a new path, or an empty folder (a rename replaces an empty folder)


def _network_errors(hub) -> tuple[type[BaseException], ...]:
    """OS errors, Hub HTTP errors and the HTTP client's errors (huggingface_hub 1.x: httpx, 2.x: httpx2)."""
    clients = (getattr(sys.modules.get(m), "HTTPError", None) for m in ("httpx", "httpx2"))
    return (OSError, hub.errors.HfHubHTTPError, *(e for e in clients if isinstance(e, type)))


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload a finished export folder to the Hub (token from HF_TOKEN, endpoint from HF_ENDPOINT)."""
    hub = require("huggingface_hub", "hub")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    token = os.environ.get("HF_TOKEN") or hub.get_token()
    keep = f"the dataset folder {folder} is complete and unchanged"
    if not token:
        raise KatdataError(f"no Hub token: set HF_TOKEN to a write token ({keep})")
    api = hub.HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="dataset",
                                 commit_message="katdata export", ignore_patterns=[output_paths.MARKER])
    except _network_errors(hub) as exc:
        raise EngineError(f"upload to the Hub at {endpoint} failed ({type(exc).__name__}: {exc}); {keep}: "
                           f"rerun with --push-to-hub {repo} when the Hub is reachable") from exc
    return getattr(info, "commit_url", None) or f"{endpoint}/datasets/{repo}"


def run(cfg: ExportConfig, run_dir: Path, engine=None, *, label: Optional[str] = None,
        review: Optional[review_routing.ReviewConfig] = None, recipe: Optional[dict] = None) -> dict:
    """The export stage: write RUN_DIR/export (or cfg.out) atomically, then push when asked. ``review``: the
    policy records wait for review under (defaults: None); ``recipe``: the recipe as recipe.yaml holds it (secrets
    redacted), for the card.

    ``out`` must be new, an empty folder or an earlier export of katdata (katdata.output_paths); anything else
    is refused before anything is written. ``label`` names the setting in errors (default: export.out)."""
    run_dir = Path(run_dir)
    src = input_file(run_dir)
    out = Path(cfg.out) if cfg.out else run_dir / "export"
    label = label or ("export.out" if cfg.out else "export folder")
    output_paths.check_replaceable(out, run_dir=run_dir, kind="export", label=label)
    made = [p for p in Path(os.path.abspath(out)).parents if not p.exists()]  # removed again if export fails
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = reader = None
    policy = review or review_routing.ReviewConfig()
    try:
        with kat_bulk.gc_paused():
            # the records the review policy (the recipe's review: section, its defaults without one) holds back
            reader, waits, per_span = _fast(src, run_dir, policy, cfg.require_review)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            if reader is not None:
                try:
                    stats = _write_dataset(tmp, src, run_dir, cfg, waits, recipe, reader, per_span)
                except export_duck.Fallback as why:
                    log.info("%s: %s: export reads it in Python", src, why)
                    reader.close(failed=True)
                    reader = None
                    shutil.rmtree(tmp)
                    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            if reader is None:
                reader = export_spans.Reader(src)  # worker processes for a large file
                waits, per_span = _waiting(reader, run_dir, src, policy, cfg.require_review)
                stats = _write_dataset(tmp, src, run_dir, cfg, waits, recipe, reader, per_span)
        output_paths.write_marker(tmp, kind="export", run_dir=run_dir, format=cfg.format)
        output_paths.honour_umask(tmp)  # mkdtemp made it 0700
        reader.close()
        _replace(tmp, out, run_dir, label)
    except BaseException:
        if reader is not None:
            reader.close(failed=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    key = "held_back" if cfg.require_review else "unreviewed_included"
    stats |= {"input": str(src), "out": str(out), key: len(waits)}
    log.info("exported %d rows from %s to %s", stats["rows_out"], src, out)
    if waits and cfg.require_review:
        log.warning("%d records wait for review and were left out (%s; export.require_review: false includes "
                    "them)", len(waits), review_routing.WAIT_HINT)
    elif waits:
        log.warning("%d records routed to review were included unreviewed (export.require_review: false)", len(waits))
    if cfg.push_to_hub:
        stats["pushed"] = push(out, cfg.push_to_hub, cfg.private)
    return stats


def main(argv: list[str] | None = None) -> int:
    """`katdata export RUN_DIR`: the export stage as every stage command runs it (the run's recipe, its checks and
    fingerprints, --redo); with --out, a further copy outside the run (the run's files checked, nothing recorded);
    on a folder of records with no recipe.yaml, the records alone (defaults and flags)."""
    from katdata import stage_command
    from katdata.errors import report

    def extra(p):
        p.add_argument("--include-unreviewed", action="store_true", help="include records that wait for review "
                       "(as --no-require-review)")

    try:
        return stage_command.main("export", list(sys.argv[1:] if argv is None else argv), extra=extra,
                                  after=_side_export, bare=_bare_export)
    except KatdataError as exc:
        return report(exc, "katdata export")


def _checked(args) -> None:
    if args.setting_private and not args.setting_push_to_hub:
        raise KatdataError("--private needs --push-to-hub REPO")
    if args.include_unreviewed:
        args.setting_require_review = False


def _side_export(args, recipe, run_dir: Path) -> Optional[int]:
    """--out: a copy outside the run folder, from files the run's stages wrote and nobody changed since."""
    _checked(args)
    if args.setting_out is None:
        return None  # RUN/export: the stage, through the pipeline
    from katdata.pipeline import check_stage_files

    check_stage_files(recipe, run_dir, "export")
    stats = run(recipe.export, run_dir, review=recipe.review, label="--out", recipe=_shown(recipe))
    print(json.dumps(stats, indent=2))
    return 0


def _shown(recipe) -> dict:
    """The recipe as the card shows it: as recipe.yaml holds it (secrets redacted)."""
    import yaml

    from katdata.recipe import dump_recipe

    return yaml.safe_load(dump_recipe(recipe))


def _bare_export(args) -> int:
    """A folder of records that no recipe made: the export section from the flags, the review defaults."""
    from katdata import stage_command, stages

    _checked(args)
    cfg = stage_command.section(stages.get("export"), args)
    stats = run(cfg, args.run_dir, label="--out" if cfg.out else None)
    print(json.dumps(stats, indent=2))
    return 0


STAGE = Stage("export", "write the Hub dataset folder (and card) of a run",
              lambda ctx: run(ctx.cfg, ctx.folder.root, review=ctx.section("review"), recipe=_shown(ctx.recipe)),
              ExportConfig, reads=("records",), may_read=("merged",), writes=("export",), sections=("review",),
              inputs=lambda recipe, run_dir: [input_file(run_dir)])
