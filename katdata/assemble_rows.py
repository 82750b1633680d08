"""The assemble stage's record rows, written faster and byte for byte as `runfiles.RowWriter` writes them.

RowWriter writes ``json.dumps(row.model_dump(mode="json"), ensure_ascii=False)`` and flushes every row.
`line` gets the same bytes several times faster: pydantic-core serializes the model to compact JSON (the
same values as model_dump(mode="json"), the same string escapes as json.dumps with ensure_ascii=False),
and msgspec's formatter puts in json.dumps' separators (", " and ": "). The one place the two differ is
how a float is spelled where Python's repr uses an exponent (1e-05, 1e+16): a line that holds a digit
followed by e/E, "0.0000" or sixteen digits in a row (in a number or not; in a KatRecord, only from its
tags on: its earlier fields are strings) is written by json.dumps itself, as is any row the fast path
cannot serialize (the slow path then raises what RowWriter raised).

`RecordWriter` gathers the rows and writes them ``every`` rows at a time (and at close), instead of a
flush per row. A batch of models is serialized in one call (`lines`: pydantic-core's JSON of the list,
formatted once, cut back into its elements by msgspec; each element is the model's own JSON), and the
float check runs once over the batch's tails, row by row only where it fires. A crash loses at most the
last batch, which a resumed run writes again (a torn last line is cut by `runfiles.repair_tail`, as RowWriter
does when it opens the file); a row that cannot be written fails the flush after the rows before it are
written, as it did one row at a time. (Writing on a background
thread instead won nothing measurable on the shared 2-core machine: the serializing holds the GIL.)
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from itertools import accumulate
from operator import add
from pathlib import Path
from typing import Any

import msgspec
import pydantic_core
from pydantic import BaseModel

from katdata.records import KatRecord
from katdata.runfiles import repair_tail, row_line

log = logging.getLogger(__name__)

# where pydantic-core may spell a float otherwise than Python's repr does (or could, for all we check)
# (checked with every digit made 0: bytes.translate and `in` are far quicker than a regular expression here)
DIGITS = bytes.maketrans(b"123456789E", b"000000000e")  # (and E as e: one pattern fewer to look for)
# a KatRecord's fields before tags are strings or null: numbers can only stand after this key (the first
# time it occurs: no earlier value is an object, and a quote after a comma is no escaped one inside a string)
TAIL = b',"tags":'


PATTERNS = (b"0e", b"0.0000", b"0000000000000000")  # 0e: a digit, then e or E


def risky(raw: bytes) -> bool:
    """Whether JSON text may hold a float that pydantic-core spells otherwise than repr (see the module doc)."""
    z = raw.translate(DIGITS)
    return any(p in z for p in PATTERNS)


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


_PARTS = msgspec.json.Decoder(list[msgspec.Raw])
_SEP = 2  # the formatter's ", " between the list's elements


def lines(rows: list) -> list:
    """`line` of each row (without newlines; bytes-like: bytes or msgspec.Raw), the models of the batch serialized
    at once where that is exact."""
    if not rows or not all(isinstance(r, BaseModel) for r in rows):
        return list(map(line, rows))
    try:
        text = msgspec.json.format(pydantic_core.to_json(rows), indent=0)
        parts = _PARTS.decode(text)
    except Exception:  # noqa: BLE001  (what the batch cannot do: row by row, each row's own path and errors)
        return list(map(line, rows))
    sizes = list(map(len, parts))
    if len(parts) != len(rows) or len(text) != 2 + sum(sizes) + _SEP * (len(rows) - 1):
        return list(map(line, rows))
    starts = list(accumulate((s + _SEP for s in sizes[:-1]), initial=1))
    ends = list(map(add, starts, sizes))
    tails = [text[max(s, text.find(_TAIL_FORMATTED, s, e)) if type(r) is KatRecord else s:e]
             for s, e, r in zip(starts, ends, rows)]
    for i in _risky_tails(tails):
        parts[i] = slow_line(rows[i])
    return parts


def _risky_tails(tails: list[bytes]) -> set[int]:
    """The indexes of the tails that are `risky`, found in one pass over them all joined by "|" (which no pattern
    holds, so a hit lies within one tail, and every tail's hits are hits of the joined text)."""
    z = b"|".join(tails).translate(DIGITS)
    hits = [p for p in PATTERNS if p in z]
    if not hits:
        return set()
    bounds = list(accumulate((len(t) + 1 for t in tails[:-1]), initial=0))
    out = set()
    for pattern in hits:
        at = z.find(pattern)
        while at >= 0:
            out.add(bisect_right(bounds, at) - 1)
            at = z.find(pattern, at + len(pattern))  # an overlapping hit lies in the same tail
    return out


_TAIL_FORMATTED = b', "tags": '  # TAIL as the formatter spaces it


class RecordWriter:
    """Append rows to a JSONL file as RowWriter does (same bytes), ``every`` rows per write and flush."""

    def __init__(self, path: Path, every: int = 256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = open(self.path, "ab")
        self._buf: list = []
        self.every = max(1, every)

    def write(self, row: BaseModel | dict[str, Any]) -> None:
        self._buf.append(row)
        if len(self._buf) >= self.every:
            self.flush()

    def flush(self) -> None:
        rows, self._buf = self._buf, []
        if rows:
            try:
                text = lines(rows)
            except Exception:  # noqa: BLE001  (a row that cannot be written: the rows before it are, as one by one)
                text = []
                try:
                    for row in rows:
                        text.append(line(row))
                finally:
                    self._f.write(b"".join(t + b"\n" for t in text))
                    self._f.flush()
                return
            text.append(b"")
            self._f.write(b"\n".join(text))
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
