"""The assemble stage's record rows, written faster and byte for byte as `runfiles.RowWriter` writes them.

RowWriter writes ``json.dumps(row.model_dump(mode="json"), ensure_ascii=False)`` and flushes every row.
`line` gets the same bytes several times faster: pydantic-core serializes the model to compact JSON (the
same values as model_dump(mode="json"), the same string escapes as json.dumps with ensure_ascii=False),
and msgspec's formatter puts in json.dumps' separators (", " and ": "). The one place the two differ is
how a float is spelled where Python's repr uses an exponent (1e-05, 1e+16): a line that holds a digit
followed by e/E, "0.0000" or sixteen digits in a row (in a number or not; in a KatRecord, only from its
tags on: its earlier fields are strings) is written by json.dumps itself, as is any row the fast path
cannot serialize (the slow path then raises what RowWriter raised).

`RecordWriter` gathers the lines and writes them ``every`` rows at a time (and at close), instead of a
flush per row: a crash loses at most the last batch, which a resumed run writes again (a torn last line
is cut by `runfiles.repair_tail`, as RowWriter does when it opens the file). (Writing on a background
thread instead won nothing measurable on the shared 2-core machine: the serializing holds the GIL.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel

from katdata.records import KatRecord
from katdata.runfiles import repair_tail, row_line

log = logging.getLogger(__name__)

# where pydantic-core may spell a float otherwise than Python's repr does (or could, for all we check)
# (checked with every digit made 0: bytes.translate and `in` are far quicker than a regular expression here)
DIGITS = bytes.maketrans(b"123456789", b"000000000")
# a KatRecord's fields before tags are strings or null: numbers can only stand after this key (the first
# time it occurs: no earlier value is an object, and a quote after a comma is no escaped one inside a string)
TAIL = b',"tags":'


def risky(raw: bytes) -> bool:
    """Whether JSON text may hold a float that pydantic-core spells otherwise than repr (see the module doc)."""
    z = raw.translate(DIGITS)
    return b"0e" in z or b"0E" in z or b"0.0000" in z or b"0000000000000000" in z


def slow_line(row: BaseModel | dict[str, Any]) -> bytes:
    """RowWriter's line of ``row`` (without the newline), as RowWriter builds it."""
    return row_line(row).encode("utf-8")


def line(row: BaseModel | dict[str, Any]) -> bytes:
    """RowWriter's line of ``row`` (without the newline), byte for byte, the fast way where it is exact."""
    if isinstance(row, BaseModel):
        try:
            raw = row.__pydantic_serializer__.to_json(row)
            tail = raw[max(0, raw.find(TAIL)):] if type(row) is KatRecord else raw
            if not risky(tail):
                return msgspec.json.format(raw, indent=0)
        except Exception:  # noqa: BLE001  (anything the fast path cannot do: the slow path, its own errors)
            pass
    return slow_line(row)


class RecordWriter:
    """Append rows to a JSONL file as RowWriter does (same bytes), ``every`` rows per write and flush."""

    def __init__(self, path: Path, every: int = 256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = open(self.path, "ab")
        self._buf: list[bytes] = []
        self.every = max(1, every)

    def write(self, row: BaseModel | dict[str, Any]) -> None:
        self._buf.append(line(row) + b"\n")
        if len(self._buf) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.flush()
            finally:
                self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
