"""Query input: JSONL, CSV, Parquet or a saved Hugging Face dataset, with a field mapping.

Every problem is an InputError naming the file, the line (or row) and the field, raised while
reading, before any model loads. Nothing is skipped silently.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field

from katdata.errors import InputError, require
from katdata.records import Kind, Query, stable_id

KINDS = get_args(Kind)


class FieldMap(BaseModel):
    """Which input column holds what (recipe key ``data.fields``)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field("id", description="column with a unique id; missing ids become a hash of the query")
    query: str = Field("query", description="column with the query text (required)")
    reference: Optional[str] = Field("reference", description="column with the reference answer, if any")
    kind: Optional[str] = Field("kind", description="column with the verifier kind (math, numeric, choice, exact, code, open)")
    system: Optional[str] = Field("system", description="column with a system prompt, if any")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 (byte 0x{data[exc.start]:02x})", line=line) from exc


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(_decode(path, path.read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"broken JSON ({exc.msg}, column {exc.colno})", line=n) from exc


def _csv(path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    for row in reader:
        if None in row:
            raise InputError(path, "more values than header columns", line=reader.line_num)
        yield reader.line_num, {k: v for k, v in row.items() if v not in ("", None)}


def _parquet(path: Path) -> Iterator[tuple[int, Any]]:
    pq = require("pyarrow.parquet", "local")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(path, f"not a readable Parquet file ({exc})") from exc
    for n, row in enumerate(table.to_pylist(), 1):
        yield n, row


def _hf_dataset(path: Path) -> Iterator[tuple[int, Any]]:
    datasets = require("datasets", "local")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for n, row in enumerate(ds, 1):
        yield n, row


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _hf_dataset(path)
        raise InputError(path, "a folder that is not a saved Hugging Face dataset (save_to_disk)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _csv(path)
    if suffix == ".parquet":
        return _parquet(path)
    raise InputError(path, f"unknown input format '{suffix}' (use .jsonl, .csv, .parquet or a saved dataset folder)")


def read_queries(path: str | Path, fields: FieldMap | None = None) -> list[Query]:
    """All queries of an input file, validated; raises InputError at the first bad row."""
    path, fields = Path(path), fields or FieldMap()
    if not path.exists():
        raise InputError(path, "file not found")
    out: list[Query] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path):
        if not isinstance(row, dict):
            raise InputError(path, f"expected an object, got {type(row).__name__}", line=line)
        q = row.get(fields.query)
        if q is None:
            raise InputError(path, "missing required field", line=line, field=fields.query)
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, "empty or non-text query", line=line, field=fields.query)
        kind = row.get(fields.kind) if fields.kind else None
        if kind is not None and kind not in KINDS:
            raise InputError(path, f"unknown kind {kind!r}; one of {', '.join(KINDS)}", line=line, field=fields.kind)
        ref = row.get(fields.reference) if fields.reference else None
        qid = row.get(fields.id)
        qid = stable_id(q) if qid in (None, "") else str(qid)
        if qid in seen:
            raise InputError(path, f"duplicate id {qid!r} (first on line {seen[qid]})", line=line, field=fields.id)
        seen[qid] = line
        used = {fields.id, fields.query, fields.reference, fields.kind, fields.system}
        meta = {k: v for k, v in row.items() if k not in used}
        out.append(Query(id=qid, query=q, reference=None if ref is None else str(ref), kind=kind,
                         system=row.get(fields.system) if fields.system else None, source=path.name,
                         meta=json.loads(json.dumps(meta, default=str))))
    if not out:
        raise InputError(path, "no queries in the file")
    return out
