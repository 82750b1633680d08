"""katdata export: a run's records as a Hub dataset folder (README.md card + data/*.parquet).

Input: ``review/merged.jsonl`` when a human review was merged, else ``records.jsonl`` (KatRecord rows).
Two streaming passes keep memory flat in the number of rows:

1. count the rows of each stratum (mode, domain), reading only the JSON;
2. validate each row, put it in train or test by selection sampling (an exact, seeded, stratified
   split that holds one pair of counters per stratum), and write parquet row groups of
   ``batch_rows`` rows, ``shard_rows`` rows per file.

Everything is written to a temporary folder next to the target and renamed into place at the end,
so a failure never leaves a partial dataset. ``--push-to-hub`` uploads the finished folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from katdata import card
from katdata.errors import InputError, KatdataError, require
from katdata.records import Change, KatRecord

log = logging.getLogger(__name__)

Format = Literal["hf", "trl", "llamafactory"]
SPLITS = ("train", "test")

# Typed struct fields of the tags and vote dicts; any other key (or a value of another type) is
# kept, JSON-encoded, in the struct's ``extra`` field, so no information is dropped.
TAG_TYPES = {"domain": "string", "task_type": "string", "difficulty": "int32", "needs_reasoning": "bool",
             "p_reasoning": "float64", "verifiability": "string", "language": "string",
             "think_off_candidate": "bool", "source": "string"}
VOTE_TYPES = {"label": "string", "reason": "string", "explored": "bool", "n_on": "int32", "n_off": "int32",
              "p_on": "float64", "p_off": "float64", "margin": "float64", "delta": "float64",
              "entropy_on": "float64", "entropy_off": "float64", "tokens_on": "float64", "tokens_off": "float64",
              "samples_used": "int32", "samples_saved": "int32", "chosen_index": "int32",
              "chosen_source": "string", "review": "bool"}


class ExportConfig(BaseModel):
    """Settings of the export stage (the ``export:`` section of a recipe, or `katdata export` flags)."""

    model_config = ConfigDict(extra="forbid")

    out: Optional[Path] = Field(None, description="output folder; default RUN_DIR/export")
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


# ---------------------------------------------------------------- features and rows

def features(fmt: Format = "hf"):
    """The explicit datasets.Features of each export format."""
    ds = require("datasets", "local")
    V, L = ds.Value, ds.List
    msg = L({"role": V("string"), "content": V("string")})
    if fmt == "trl":
        return ds.Features({"id": V("string"), "prompt": msg, "completion": msg, "mode": V("string")})
    if fmt == "llamafactory":
        return ds.Features({"id": V("string"), "messages": msg, "mode": V("string")})
    change = {"field": V("string"), "old": V("string"), "new": V("string"), "annotator": V("string"), "at": V("string")}
    return ds.Features({
        "id": V("string"), "query": V("string"), "system": V("string"), "messages": msg,
        "response": V("string"), "mode": V("string"), "judge": V("string"), "think": V("string"),
        "answer": V("string"), "reference": V("string"), "kind": V("string"),
        "tags": {**{k: V(t) for k, t in TAG_TYPES.items()}, "extra": V("string")},
        "vote": {**{k: V(t) for k, t in VOTE_TYPES.items()}, "extra": V("string")},
        "provenance": {"models": L({"role": V("string"), "model": V("string")}), "changes": L(change),
                       "extra": V("string")},
    })


def _fits(value: Any, dtype: str) -> bool:
    if value is None:
        return True
    if dtype == "string":
        return isinstance(value, str)
    if dtype == "bool":
        return isinstance(value, bool)
    if dtype == "int32":
        return isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _typed(d: dict, types: dict[str, str]) -> dict:
    out = {k: (d.get(k) if _fits(d.get(k), t) else None) for k, t in types.items()}
    extra = {k: v for k, v in d.items() if k not in types or not _fits(v, types[k])}
    out["extra"] = _dumps(extra) if extra else None
    return out


def _untyped(s: dict) -> dict:
    out = {k: v for k, v in s.items() if k != "extra" and v is not None}
    return out | (json.loads(s["extra"]) if s.get("extra") else {})


def hf_row(rec: KatRecord) -> dict:
    """One KatRecord as a row of the hf format (lossless up to null-valued keys in tags/vote)."""
    prov = dict(rec.provenance)
    models = prov.pop("models", None)
    if not (isinstance(models, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in models.items())):
        if models is not None:
            prov["models"] = models
        models = {}
    changes = [{"field": c.field, "old": _dumps(c.old), "new": _dumps(c.new), "annotator": c.annotator, "at": c.at}
               for c in rec.changes]
    return {
        "id": rec.id, "query": rec.query, "system": rec.system, "messages": rec.messages(),
        "response": rec.response, "mode": rec.mode, "judge": rec.judge, "think": rec.think,
        "answer": rec.answer, "reference": rec.reference, "kind": rec.kind,
        "tags": _typed(rec.tags, TAG_TYPES), "vote": _typed(rec.vote, VOTE_TYPES),
        "provenance": {"models": [{"role": r, "model": m} for r, m in models.items()], "changes": changes,
                       "extra": _dumps(prov) if prov else None},
    }


def from_hf_row(row: dict) -> KatRecord:
    """The KatRecord back from an hf-format row (the inverse of hf_row)."""
    p = row["provenance"]
    prov = json.loads(p["extra"]) if p.get("extra") else {}
    if p["models"]:
        prov["models"] = {m["role"]: m["model"] for m in p["models"]}
    changes = [Change(field=c["field"], old=json.loads(c["old"]), new=json.loads(c["new"]),
                      annotator=c["annotator"], at=c["at"]) for c in p["changes"]]
    keep = ("id", "query", "system", "mode", "judge", "think", "answer", "response", "reference", "kind")
    return KatRecord(**{k: row[k] for k in keep}, tags=_untyped(row["tags"]), vote=_untyped(row["vote"]),
                     provenance=prov, changes=changes)


def trl_row(rec: KatRecord) -> dict:
    msgs = rec.messages()
    return {"id": rec.id, "prompt": msgs[:-1], "completion": msgs[-1:], "mode": rec.mode}


def llamafactory_row(rec: KatRecord) -> dict:
    return {"id": rec.id, "messages": rec.messages(), "mode": rec.mode}


ROWS: dict[str, Callable[[KatRecord], dict]] = {"hf": hf_row, "trl": trl_row, "llamafactory": llamafactory_row}


# ---------------------------------------------------------------- reading and splitting

def input_file(run_dir: Path) -> Path:
    """review/merged.jsonl when a review was merged, else records.jsonl."""
    merged = Path(run_dir) / "review" / "merged.jsonl"
    return merged if merged.is_file() else Path(run_dir) / "records.jsonl"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not path.is_file():
        raise InputError(path, "file not found (run the earlier stages first)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def _stratum(mode: Any, tags: Any) -> str:
    domain = tags.get("domain") if isinstance(tags, dict) else None
    return f"{mode}|{domain if domain is not None else 'unknown'}"


def count_strata(path: Path) -> dict[str, int]:
    """Pass 1: rows per (mode, domain) stratum; broken JSON raises InputError with the line."""
    counts: dict[str, int] = {}
    for n, raw in _lines(path):
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(path, f"broken JSON ({exc})", line=n) from exc
        if not isinstance(d, dict):
            raise InputError(path, "not a JSON object", line=n)
        key = _stratum(d.get("mode"), d.get("tags"))
        counts[key] = counts.get(key, 0) + 1
    return counts


def allocate(counts: dict[str, int], test_size: float) -> dict[str, int]:
    """Test rows per stratum: round(total * test_size) shared out by largest remainder."""
    quota = {s: c * test_size for s, c in counts.items()}
    alloc = {s: math.floor(q) for s, q in quota.items()}
    rest = round(sum(counts.values()) * test_size) - sum(alloc.values())
    for s in sorted(quota, key=lambda s: (alloc[s] - quota[s], s))[:max(rest, 0)]:
        alloc[s] += 1
    return alloc


def read_records(path: Path) -> Iterator[KatRecord]:
    """Pass 2: validated KatRecord rows; a bad row raises InputError naming file, line and field."""
    for n, raw in _lines(path):
        try:
            yield KatRecord.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise InputError(path, err["msg"], line=n, field=field) from exc


def split_records(path: Path, test_size: float, seed: int,
                  counts: dict[str, int] | None = None) -> Iterator[tuple[str, KatRecord]]:
    """(split, record) pairs: an exact stratified split by selection sampling, seeded, in file order."""
    counts = count_strata(path) if counts is None else counts
    alloc = allocate(counts, test_size)
    left = {s: [counts[s], alloc[s]] for s in counts}  # rows left, test rows left
    rng = random.Random(seed)
    for rec in read_records(path):
        state = left[_stratum(rec.mode, rec.tags)]
        test = rng.random() * state[0] < state[1]
        state[0] -= 1
        state[1] -= test
        yield ("test" if test else "train"), rec


# ---------------------------------------------------------------- writing

def shard_path(fmt: Format, split: str, i: int, n: int) -> str:
    """data/{split}-i-of-n.parquet; LLaMA-Factory reads one file or folder per dataset: data/{split}/."""
    name = f"{split}-{i:05d}-of-{n:05d}.parquet"
    return f"data/{split}/{name}" if fmt == "llamafactory" else f"data/{name}"


def data_glob(fmt: Format, split: str) -> str:
    """The data_files pattern of a split in the card's configs."""
    return f"data/{split}/*.parquet" if fmt == "llamafactory" else f"data/{split}-*.parquet"


class SplitWriter:
    """Parquet shards of one split, written a row group at a time."""

    def __init__(self, root: Path, fmt: Format, split: str, total: int, schema, shard_rows: int, batch_rows: int):
        self.root, self.fmt, self.split, self.schema = root, fmt, split, schema
        self.shard_rows, self.batch_rows = shard_rows, batch_rows
        self.n_shards = max(1, math.ceil(total / shard_rows))
        self.buf: list[dict] = []
        self.shard, self.in_shard, self.rows, self.nbytes = 0, 0, 0, 0
        self.writer = None

    def add(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.batch_rows or self.in_shard + len(self.buf) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buf:
            return
        if self.writer is None:
            path = self.root / shard_path(self.fmt, self.split, self.shard, self.n_shards)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema)
        table = pa.Table.from_pylist(self.buf, schema=self.schema)
        self.writer.write_table(table)
        self.nbytes += table.nbytes
        self.in_shard += len(self.buf)
        self.rows += len(self.buf)
        self.buf = []
        if self.in_shard >= self.shard_rows:
            self.close()
            self.shard, self.in_shard = self.shard + 1, 0

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_dataset(tmp: Path, src: Path, run_dir: Path, cfg: ExportConfig) -> dict:
    feats = features(cfg.format)
    schema = feats.arrow_schema
    counts = count_strata(src)
    total = sum(counts.values())
    if total == 0:
        raise InputError(src, "no records to export")
    n_test = sum(allocate(counts, cfg.test_size).values())
    sizes = {"train": total - n_test, "test": n_test}
    writers = {s: SplitWriter(tmp, cfg.format, s, sizes[s], schema, cfg.shard_rows, cfg.batch_rows)
               for s in SPLITS if sizes[s]}
    to_row = ROWS[cfg.format]
    stats = card.CardStats()
    for split, rec in split_records(src, cfg.test_size, cfg.seed, counts):
        writers[split].add(to_row(rec))
        stats.add(rec, split)
    for w in writers.values():
        w.close()
    splits = {s: {"rows": w.rows, "bytes": w.nbytes, "files": w.n_shards, "pattern": data_glob(cfg.format, s)}
              for s, w in writers.items()}
    if cfg.format == "llamafactory":
        _llamafactory_info(tmp, splits)
    card.write_card(tmp, run_dir, src, stats, splits, feats, cfg)
    return {"rows_in": total, "rows_out": stats.n, "splits": {s: v["rows"] for s, v in splits.items()},
            "on": stats.modes["on"], "off": stats.modes["off"], "format": cfg.format}


def _llamafactory_info(tmp: Path, splits: dict) -> None:
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {f"katdata_{s}": {"file_name": f"data/{s}", "formatting": "sharegpt",
                             "columns": {"messages": "messages"}, "tags": tags} for s in splits}
    (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an older export is removed only after the rename."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _network_errors(hub) -> tuple[type[BaseException], ...]:
    """What a failed upload raises: OS errors, Hub HTTP errors, and the HTTP client's own errors
    (huggingface_hub 1.x uses httpx, 2.x httpx2)."""
    errors: list[type[BaseException]] = [OSError, hub.errors.HfHubHTTPError]
    for name in ("httpx", "httpx2", "requests"):
        mod = sys.modules.get(name)
        err = getattr(mod, "HTTPError", None) or getattr(getattr(mod, "exceptions", None), "RequestException", None)
        if isinstance(err, type) and issubclass(err, BaseException):
            errors.append(err)
    return tuple(errors)


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
                                 commit_message="katdata export")
    except _network_errors(hub) as exc:
        raise KatdataError(f"upload to the Hub at {endpoint} failed ({type(exc).__name__}: {exc}); {keep}: "
                           f"rerun with --push-to-hub {repo} when the Hub is reachable") from exc
    return getattr(info, "commit_url", None) or f"{endpoint}/datasets/{repo}"


def run(cfg: ExportConfig, run_dir: Path, engine=None) -> dict:
    """The export stage: write RUN_DIR/export (or cfg.out) atomically, then push when asked."""
    run_dir = Path(run_dir)
    src = input_file(run_dir)
    out = Path(cfg.out) if cfg.out else run_dir / "export"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stats = _write_dataset(tmp, src, run_dir, cfg)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats |= {"input": str(src), "out": str(out)}
    log.info("exported %d rows from %s to %s", stats["rows_out"], src, out)
    if cfg.push_to_hub:
        stats["pushed"] = push(out, cfg.push_to_hub, cfg.private)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="katdata export", description="Write a run's records as a Hub dataset "
                                "folder (README.md card + data/*.parquet) and optionally upload it.")
    p.add_argument("run_dir", type=Path, help="the run folder (reads review/merged.jsonl or records.jsonl)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export)")
    p.add_argument("--format", choices=["hf", "trl", "llamafactory"], default="hf", help="column layout")
    p.add_argument("--test-size", type=float, default=0.1, help="share of rows in the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--license", default="other", help="licence id for the card header")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hub dataset repo (token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    a = p.parse_args(argv)
    if a.private and not a.push_to_hub:
        p.error("--private needs --push-to-hub REPO")
    try:
        cfg = ExportConfig(out=a.out, format=a.format, test_size=a.test_size, seed=a.seed, license=a.license,
                           push_to_hub=a.push_to_hub, private=a.private)
        stats = run(cfg, a.run_dir, None)
    except ValidationError as exc:
        print(f"katdata export: error: {exc}", file=sys.stderr)
        return 2
    except KatdataError as exc:
        print(f"katdata export: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0
