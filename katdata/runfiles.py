"""Run-folder files: append-only JSONL, one row a line, flushed row by row.

A crash (even kill -9) loses at most the line being written; on resume the torn last line is cut
off and the ids already written are skipped. Readers name the file and line of any bad row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Type, TypeVar

from pydantic import BaseModel, ValidationError

from katdata.errors import InputError

T = TypeVar("T", bound=BaseModel)


def invalid_row(path: Path, line: int, exc: ValidationError) -> InputError:
    """The InputError for a row that failed validation: file, line and the first bad field."""
    err = exc.errors()[0]
    return InputError(path, err["msg"], line=line, field=".".join(str(p) for p in err["loc"]) or None)


def parse_row(path: Path, line: Optional[int], raw: bytes, model: Type[T]) -> T:
    """One line of a stage file as ``model``; a broken one raises InputError naming file, line and field."""
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


def read_rows(path: Path, model: Type[T]) -> Iterator[T]:
    """Validated rows of a stage file; a broken line raises InputError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield parse_row(path, n, raw, model)


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
                keys.add(json.loads(raw)[key])
    return keys


class RowIndex:
    """Rows of a stage file found by key without holding them: memory keeps where each row's line starts
    (a few dozen bytes a row), and a lookup reads its lines back. Every line is validated once while the
    index is built, so a broken row is reported (file, line, field) before any work starts."""

    def __init__(self, path: Path, model: Type[T], key: str = "id"):
        self.path, self.model = Path(path), model
        self._at: dict[str, int | list[int]] = {}  # key -> offset, or offsets when several rows share it
        self._f = None
        if not self.path.is_file():
            return
        offset = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    k = getattr(self._parse(raw, n), key)
                    have = self._at.get(k)
                    self._at[k] = offset if have is None else (have if isinstance(have, list) else [have]) + [offset]
                offset += len(raw)

    def _parse(self, raw: bytes, line: int | None = None):
        return parse_row(self.path, line, raw, self.model)

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
        if self._f is None:
            self._f = open(self.path, "rb")
        rows = []
        for offset in at if isinstance(at, list) else [at]:
            self._f.seek(offset)
            rows.append(self._parse(self._f.readline()))  # checked when indexed
        return rows

    def one(self, key):
        """The first row with this key, or None."""
        rows = self.get(key)
        return rows[0] if rows else None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


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
