"""Run-folder files: append-only JSONL, one row a line, flushed row by row.

A crash (even kill -9) loses at most the line being written; on resume the torn last line is cut
off and the ids already written are skipped. Readers name the file and line of any bad row.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Type, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from katdata import fast_rows
from katdata.errors import InputError

T = TypeVar("T", bound=BaseModel)


def invalid_row(path: Path, line: int, exc: ValidationError) -> InputError:
    """The InputError for a row that failed validation: file, line and the first bad field."""
    err = exc.errors()[0]
    return InputError(path, err["msg"], line=line, field=".".join(str(p) for p in err["loc"]) or None)


def parse_row(path: Path, line: Optional[int], raw: bytes, model: Type[T]) -> T:
    """One line of a stage file as ``model``; a broken one raises InputError naming file, line and field. The JSON is
    read by msgspec (several times quicker, the same values); what it refuses (NaN, Infinity, out-of-range numbers,
    lone surrogates, broken text) is read by json.loads, which accepts some of it and names what is broken."""
    try:
        data = _JSON.decode(raw)
    except msgspec.DecodeError:
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(path, f"not UTF-8 ({exc.reason})", line=line) from exc
        except json.JSONDecodeError as exc:
            raise InputError(path, f"broken JSON ({exc.msg})", line=line) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_row(path, line, exc) from exc


_JSON = msgspec.json.Decoder()


def loads(raw: bytes):
    """The JSON value of one line: read by msgspec (several times quicker than json.loads, the same values), or by
    json.loads where msgspec refuses it (NaN, Infinity, out-of-range numbers, lone surrogates; broken JSON raises
    json.loads' ValueError)."""
    try:
        return _JSON.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


def check_row(path: Path, line: Optional[int], raw: bytes, model: Type[T]):
    """One line of a stage file checked as ``model`` would check it: its msgspec mirror (katdata.fast_rows, several
    times quicker) or, where that refuses the line or the model has none, the model itself (`parse_row`: the same
    InputError for a bad line). Returns the mirror's struct or the model's row (the same attributes and values)."""
    fast = fast_rows.decoder(model)
    if fast is not None:
        try:
            return fast.decode(raw)
        except msgspec.DecodeError:
            pass
    return parse_row(path, line, raw, model)


def count_rows(path: Path, model: Type[T]) -> int:
    """The rows of a stage file, each checked (`check_row`); a broken line raises InputError naming file, line and
    field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    n = 0
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                check_row(path, line, raw, model)
                n += 1
    return n


def read_rows(path: Path, model: Type[T], fast: bool = False) -> Iterator[T]:
    """Validated rows of a stage file; a broken line raises InputError naming file, line and field. ``fast``: each
    row as `check_row` gives it (the model's msgspec mirror where that reads the line; see `RowIndex`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    read = check_row if fast else parse_row
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield read(path, n, raw, model)


def repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) left by a crash mid-write."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end  # read back block by block to the last newline: the file itself is never held in memory
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            cut = f.read(step).rfind(b"\n")
            if cut >= 0:
                f.truncate(pos + cut + 1)
                return
        f.truncate(0)


def row_line(row: BaseModel | dict[str, Any]) -> str:
    """A row's line in a run file (without the newline): its JSON, non-ASCII kept as it is."""
    data = row.model_dump(mode="json") if isinstance(row, BaseModel) else row
    return json.dumps(data, ensure_ascii=False)


class RowWriter:
    """Append rows to a JSONL file, flushing each one; ``fsync=True`` also syncs it to disk."""

    def __init__(self, path: Path, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, row: BaseModel | dict[str, Any]) -> None:
        self._f.write(row_line(row) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def write_all(self, rows: Iterable[BaseModel | dict[str, Any]]) -> int:
        n = 0
        for row in rows:
            self.write(row)
            n += 1
        return n

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def done_keys(path: Path, key: str = "id") -> set:
    """The values of ``key`` already written to a stage file (for resume); tolerates a torn tail."""
    path = Path(path)
    keys = set()
    if not path.is_file():
        return keys
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                keys.add(loads(raw)[key])
    return keys


class RowIndex:
    """Rows of a stage file found by key without holding them: memory keeps where each row's line starts
    (a few dozen bytes a row), and a lookup reads its lines back (the key's lines in one read where they lie close
    together). Every line is checked once while the index is built (`check_row`), so a broken row is reported
    (file, line, field) before any work starts. ``fast``: a lookup gives the row as the model's msgspec mirror reads
    it (katdata.fast_rows: the same attributes and values, several times quicker; `dump` gives its JSON values)
    where the mirror reads the line, else the model's row."""

    def __init__(self, path: Path, model: Type[T], key: str = "id", fast: bool = False):
        self.path, self.model = Path(path), model
        self._at: dict[str, int | array] = {}  # key -> offset, or offsets when several rows share it
        self._f = None  # opened at the first lookup, read by os.pread (a file object: closed with the index too)
        self._fast = fast_rows.decoder(model) if fast else None
        if not self.path.is_file():
            return
        offset = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    k = getattr(check_row(self.path, n, raw, self.model), key)
                    if type(k) is str:
                        k = sys.intern(k)  # one string per id, shared by the run's indexes
                    have = self._at.get(k)
                    if have is None:
                        self._at[k] = offset
                    elif type(have) is int:
                        self._at[k] = array("q", (have, offset))  # 8 bytes an offset
                    else:
                        have.append(offset)
                offset += len(raw)

    def _parse(self, raw: bytes, line: int | None = None):
        if self._fast is not None:
            try:
                return self._fast.decode(raw)
            except msgspec.DecodeError:
                pass
        return parse_row(self.path, line, raw, self.model)

    def _lines(self, at: int | array) -> list[bytes]:
        """The lines that start at these offsets (in file order, as indexed)."""
        if self._f is None:
            self._f = open(self.path, "rb", buffering=0)
        fd = self._f.fileno()
        if type(at) is int:
            return [_line_at(fd, at)]
        lo = at[0]
        if at[-1] - lo > _NEAR:
            return [_line_at(fd, off) for off in at]
        block = os.pread(fd, at[-1] - lo + _READ, lo)
        out = []
        for off in at:
            end = block.find(b"\n", off - lo)
            out.append(block[off - lo:end + 1] if end >= 0 else _line_at(fd, off))
        return out

    def __contains__(self, key) -> bool:
        return key in self._at

    def __len__(self) -> int:
        return len(self._at)

    def keys(self):
        """The keys in the order they first appear in the file."""
        return self._at.keys()

    def get(self, key, default=None) -> list | None:
        """All rows with this key, in file order (``default`` when there are none)."""
        at = self._at.get(key)
        if at is None:
            return default
        return [self._parse(raw) for raw in self._lines(at)]  # checked when indexed

    def one(self, key):
        """The first row with this key, or None."""
        at = self._at.get(key)
        if at is None:
            return None
        return self._parse(self._lines(at if type(at) is int else at[0])[0])

    def first(self, key, **fields):
        """The first row with this key whose ``fields`` have the given values, or None. Each of the key's lines is read
        for those fields alone (msgspec skips the rest) and only a match is read whole: quick where a key has many
        rows (a query's samples). A line whose values are not plainly the given ones is read whole to decide."""
        at = self._at.get(key)
        if at is None:
            return None
        lines = self._lines(at)
        want = tuple(fields.values())
        try:  # the key's lines in one call, as a JSON array
            got = list(map(msgspec.structs.astuple, _light(tuple(fields)).decode(b"[" + b",".join(lines) + b"]")))
        except msgspec.DecodeError:
            got = [None] * len(lines)
        for raw, vals in zip(lines, got):
            if vals is not None and vals != want and all(type(v) is type(w) for v, w in zip(vals, want)):
                continue  # plainly another row (checked when indexed: a str, int or bool is read as it is)
            row = self._parse(raw)
            if all(getattr(row, k) == v for k, v in fields.items()):
                return row
        return None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


_NEAR = 1 << 18  # a key's lines within this many bytes of each other are read at once
_READ = 1 << 11  # bytes read past the last line's start (more, doubling, where the line is longer)


def _line_at(fd: int, offset: int) -> bytes:
    """The line that starts at ``offset`` (its newline included; to the end of the file for a last line without)."""
    block = os.pread(fd, _READ, offset)
    end = block.find(b"\n")
    while end < 0:
        more = os.pread(fd, max(_READ, len(block)), offset + len(block))
        if not more:
            return block
        start, block = len(block), block + more
        end = block.find(b"\n", start)
    return block[:end + 1]


def dump(row) -> dict:
    """A row's JSON values, as ``model_dump(mode="json")`` gives them: the model's own, or a `fast_rows` mirror's
    (the same keys in the same order with the same values)."""
    return row.model_dump(mode="json") if isinstance(row, BaseModel) else msgspec.to_builtins(row)


@lru_cache(maxsize=None)
def _light(names: tuple[str, ...]) -> msgspec.json.Decoder:
    """A decoder of a JSON array of objects, each read for just these fields (`fast_rows.fields`)."""
    return msgspec.json.Decoder(list[fast_rows.fields(names)])


def query_meta(run_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """Per held-out id, the verifier's view of the query: the run's queries.jsonl meta ("prompt": a
    HumanEval signature); a code query missing from it keeps its own text, which is that prompt."""
    from katdata.records import Query
    from katdata.run_folder import RunFolder

    path = RunFolder(run_dir).queries
    known = {q.id: q.meta for q in read_rows(path, Query)} if path.is_file() else {}
    out = {}
    for r in rows:
        meta = dict(known.get(r["id"]) or {})
        if r["kind"] == "code" and not meta.get("prompt"):
            meta["prompt"] = r["query"]
        out[r["id"]] = meta
    return out
