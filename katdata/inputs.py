"""Query input: JSONL, CSV, Parquet or a saved Hugging Face dataset, with a field mapping.

Every problem is an InputError naming the file, the line (or row) and the field, raised while
reading, before any model loads. Nothing is skipped silently.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    """UTF-8 text; a leading byte-order mark (Excel writes one) is dropped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 (byte 0x{data[exc.start]:02x})", line=line) from exc


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        yield from _json_array(path, text)
        return
    # split on \n only: JSON strings may hold U+2028, U+2029 or U+0085, which str.splitlines() breaks on
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            hint = "; a .json file holds one JSON array or JSON Lines" if path.suffix.lower() == ".json" else ""
            raise InputError(path, f"broken JSON ({exc.msg}, column {exc.colno}){hint}", line=n) from exc


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The items of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise InputError(path, "text after the closing ]", line=text.count("\n", 0, pos) + 1)
            return
        line = text.count("\n", 0, pos) + 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"broken JSON ({exc.msg}, column {exc.colno})", line=exc.lineno) from exc
        yield line, item


def _csv(path: Path, fields: FieldMap) -> Iterator[tuple[int, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    shown = "tab" if delimiter == "\t" else "','"
    reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""), delimiter=delimiter, strict=True)
    rows = 0
    try:
        header = reader.fieldnames
        if not header:
            raise InputError(path, "empty file: no header line")
        _check_header(path, header, fields)
        for row in reader:
            rows += 1
            if None in row:
                raise InputError(path, "more values than header columns", line=reader.line_num)
            yield reader.line_num, {k: v for k, v in row.items() if v not in ("", None)}
    except csv.Error as exc:  # e.g. a quote that is never closed
        raise InputError(path, f"not valid CSV ({exc}; delimiter {shown})", line=reader.line_num) from None
    if not rows:
        raise InputError(path, f"only a header line ({', '.join(header)}), no rows (delimiter {shown})", line=1)


def _check_header(path: Path, header: list[str], fields: FieldMap) -> None:
    if fields.query in header:
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    other = next((d for d in (";", "\t", "|", ",") if d != delimiter and any(d in h for h in header)), None)
    hint = f"; the header looks delimited by {other!r}" if other else ""
    raise InputError(path, f"the header ({', '.join(header)}) has no column '{fields.query}' (delimiter "
                     f"{'tab' if delimiter == chr(9) else repr(delimiter)}){hint}", line=1, field=fields.query)


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
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # broken dataset_info.json, missing arrow files, ...: many exception types
        why = " ".join(str(exc).split())[:300]
        raise InputError(path, f"not a readable saved dataset ({type(exc).__name__}: {why})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for n, row in enumerate(ds, 1):
        yield n, row


def _rows(path: Path, fields: FieldMap) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _hf_dataset(path)
        raise InputError(path, "a folder that is not a saved Hugging Face dataset (save_to_disk)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _csv(path, fields)
    if suffix == ".parquet":
        return _parquet(path)
    raise InputError(path, f"unknown input format '{suffix}' (use .jsonl, .csv, .parquet or a saved dataset folder)")


def _plain(path: Path, line: int, field: str, value: Any) -> Optional[str]:
    """An id or reference as text: strings and finite numbers only (no booleans, lists, objects, NaN)."""
    if value is None:
        return None
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return str(value)
    raise InputError(path, f"must be a string or a number, got {type(value).__name__} {str(value)[:60]}", line=line, field=field)


def read_queries(path: str | Path, fields: FieldMap | None = None) -> list[Query]:
    """All queries of an input file, validated; raises InputError at the first bad row."""
    path, fields = Path(path), fields or FieldMap()
    if not path.exists():
        raise InputError(path, "file not found")
    out: list[Query] = []
    seen: dict[str, int] = {}
    columns: dict[str, None] = {}  # every column any row has, in order of first sight
    for line, row in _rows(path, fields):
        if not isinstance(row, dict):
            raise InputError(path, f"expected an object, got {type(row).__name__}", line=line)
        columns.update(dict.fromkeys(row))
        q = row.get(fields.query)
        if q is None:
            raise InputError(path, "missing required field", line=line, field=fields.query)
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, "empty or non-text query", line=line, field=fields.query)
        kind = row.get(fields.kind) if fields.kind else None
        if kind is not None and (not isinstance(kind, str) or kind not in KINDS):
            raise InputError(path, f"unknown kind {kind!r}; one of {', '.join(KINDS)}", line=line, field=fields.kind)
        ref = _plain(path, line, fields.reference, row.get(fields.reference)) if fields.reference else None
        qid = _plain(path, line, fields.id, row.get(fields.id))
        qid = stable_id(q) if qid in (None, "") else qid
        if qid in seen:
            raise InputError(path, f"duplicate id {qid!r} (first on line {seen[qid]})", line=line, field=fields.id)
        seen[qid] = line
        system = row.get(fields.system) if fields.system else None
        if system is not None and not isinstance(system, str):
            raise InputError(path, f"must be text, got {type(system).__name__} {str(system)[:60]}", line=line,
                             field=fields.system)
        used = {fields.id, fields.query, fields.reference, fields.kind, fields.system}
        meta = {k: v for k, v in row.items() if k not in used}
        try:
            out.append(Query(id=qid, query=q, reference=ref, kind=kind, system=system, source=path.name,
                             meta=json.loads(json.dumps(meta, default=str))))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise InputError(path, err["msg"], line=line, field=".".join(str(p) for p in err["loc"])) from None
    if not out:
        raise InputError(path, "no queries in the file")
    _check_mapped_columns(path, fields, list(columns))
    return out


def _check_mapped_columns(path: Path, fields: FieldMap, columns: list[str]) -> None:
    """A column the field map renames (``data.fields.reference: solution``) that no row has is an error: left
    alone it would load every reference as null, or hash every id, and nothing would say so. The default
    names (``reference``, ``id``...) stay optional columns."""
    for key, spec in FieldMap.model_fields.items():
        column = getattr(fields, key)
        if column is not None and column != spec.default and column not in columns:
            raise InputError(path, f"the field map names column '{column}' (data.fields.{key}), which no row has; "
                             f"the file's columns: {', '.join(columns)}", field=column)
