"""The assemble stage's record rows, written faster and byte for byte as `runfiles.RowWriter` writes them.

RowWriter writes ``json.dumps(row.model_dump(mode="json"), ensure_ascii=False)`` and flushes every row.
`line` gets the same bytes several times faster: pydantic-core serializes the model to compact JSON (the
same values as model_dump(mode="json"), the same string escapes as json.dumps with ensure_ascii=False),
and msgspec's formatter puts in json.dumps' separators (", " and ": "). The one place the two differ is
how a float is spelled: pydantic-core writes some small ones otherwise than Python's repr (1e-07 as 1e-7,
1e-05 as 0.00001; large ones and the rest as repr does: checked over every exponent by
tests/test_assemble.py). A cheap scan finds the text where such a float could stand ("e-" or "E-", as in a
negative exponent, or "0.0000"; in a KatRecord, only from its tags on: its earlier fields are strings); where it
fires, that text is decoded by msgspec with a hook that sees each float's own spelling (the numbers alone:
strings that look alike do not count), and a row with a float not spelled as repr spells it is written by
json.dumps itself, as is any row the fast path cannot serialize (the slow path then raises what RowWriter
raised).

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
from collections import Counter
from itertools import accumulate, chain, repeat
from operator import add, attrgetter
from pathlib import Path
from typing import Any, Optional

import msgspec
import pydantic_core
from pydantic import BaseModel, TypeAdapter

from katdata import written
from katdata.export_arrow import stratum
from katdata.records import KatRecord
from katdata.review_routing import waits_for_review
from katdata.runfiles import repair_tail, row_line

log = logging.getLogger(__name__)

# a KatRecord's fields before tags are strings or null: numbers can only stand after this key (the first
# time it occurs: no earlier value is an object, and a quote after a comma is no escaped one inside a string)
TAIL = b',"tags":'


# where pydantic-core may spell a float otherwise than Python's repr does, in numbers or strings alike (a quick scan;
# `exact` then looks at the numbers alone): a small number in decimals (0.00001 for repr's 1e-05), or a negative
# exponent ("e-" or "E-" and a digit: 1.5e-7 for repr's 1.5e-07), found with every digit made 0 by bytes.translate
# (far quicker than a regular expression), where "e-" or "E-" stands at all
DIGITS = bytes.maketrans(b"123456789E", b"000000000e")


def risky(raw: bytes) -> bool:
    """Whether JSON text may hold a float that pydantic-core spells otherwise than repr (see the module doc): a quick
    scan of the text, strings and all."""
    if b"0.0000" in raw:
        return True
    return (b"e-" in raw or b"E-" in raw) and b"e-0" in raw.translate(DIGITS)


def exact(tail: bytes) -> bool:
    """Whether every float in a row's JSON text (or its tail: from the comma before ``"tags"``) is spelled as repr
    spells it; the numbers alone are looked at (msgspec hands its float hook each float's text as written)."""
    return not _inexact([tail])


def _inexact(tails: list[bytes]) -> set[int]:
    """The indexes of the tails that hold a float not spelled as repr spells it (or text msgspec cannot read): all
    tails read at once by a decoder whose hook collects the floats' texts, compared with repr at once; a tail that
    holds the text of a float that differs is counted (a string holding that text too: at worst a row written the
    slow way)."""
    objects = [b"{" + t[1:] if t[:1] == b"," else t for t in tails]
    seen: list[str] = []
    decoder = msgspec.json.Decoder(float_hook=seen.append)
    try:
        decoder.decode(b"[" + b",".join(objects) + b"]")
    except msgspec.DecodeError:  # tail by tail, to find the one msgspec cannot read
        return {i for i, tail in enumerate(tails) if not exact(tail)} if len(tails) > 1 else {0}
    spelled = list(map(float.__repr__, map(float, seen)))
    if spelled == seen:
        return set()
    bad = {s.encode() for a, s in zip(spelled, seen) if a != s}
    return {i for i, text in enumerate(objects) if any(b in text for b in bad)}


def slow_line(row: BaseModel | dict[str, Any]) -> bytes:
    """RowWriter's line of ``row`` (without the newline), as RowWriter builds it."""
    return row_line(row).encode("utf-8")


def line(row: BaseModel | dict[str, Any]) -> bytes:
    """RowWriter's line of ``row`` (without the newline), byte for byte, the fast way where it is exact."""
    if isinstance(row, BaseModel):
        try:
            raw = row.__pydantic_serializer__.to_json(row)
            tail = raw[max(0, raw.find(TAIL)):] if type(row) is KatRecord else raw
            if not risky(tail) or exact(tail):
                return msgspec.json.format(raw, indent=0)
        except Exception:  # noqa: BLE001  (anything the fast path cannot do: the slow path, its own errors)
            pass
    return slow_line(row)


_PARTS = msgspec.json.Decoder(list[msgspec.Raw])
_KAT_ROWS = TypeAdapter(list[KatRecord])  # the same JSON as pydantic_core.to_json of the list, a little sooner
_SEP = 2  # the formatter's ", " between the list's elements


def lines(rows: list) -> list:
    """`line` of each row (without newlines; bytes-like: bytes or msgspec.Raw), the models of the batch serialized
    at once where that is exact."""
    if not rows or not all(isinstance(r, BaseModel) for r in rows):
        return list(map(line, rows))
    try:
        raw = _KAT_ROWS.dump_json(rows) if all(type(r) is KatRecord for r in rows) else pydantic_core.to_json(rows)
        text = msgspec.json.format(raw, indent=0)
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
    """The indexes of the tails with a float not spelled as repr spells it: none where the quick scan finds nothing
    `risky` in them all joined by "|" (which no pattern holds: a hit lies within one tail), else `_inexact`'s."""
    return _inexact(tails) if risky(b"|".join(tails)) else set()


_TAIL_FORMATTED = b', "tags": '  # TAIL as the formatter spaces it


_MODE, _TAGS, _VOTE = attrgetter("mode"), attrgetter("tags"), attrgetter("vote")
OBJECTS = {name: attrgetter(name) for name in written.OBJECTS}  # the objects whose keys the stamp lists
MAX_KEYS = 64  # more distinct keys than this in one of a file's objects: the writer does not record them


def _seen(facts: Optional[dict]) -> Optional[dict[str, set]]:
    """The keys an earlier writer recorded (a resumed file), None where it did not."""
    keys = written.keys(facts)
    return None if keys is None else {c: set(keys[c]) for c in OBJECTS}


class RecordWriter:
    """Append rows to a JSONL file as RowWriter does (same bytes), ``every`` rows per write and flush.

    A file that holds only KatRecords (validated models) when it is closed, and held only such rows before (new,
    empty, or stamped and unchanged), is stamped as katdata's own (katdata.written), with what export would count
    in a first read (rows per stratum, the ids the vote flagged for review) and the keys its tags, vote and
    provenance hold (up to MAX_KEYS each): export then reads it without checking each line again, without that first
    read, and only looks for the keys that are there."""

    def __init__(self, path: Path, every: int = 256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._own = new or written.unchanged(self.path)
        self._facts = {"strata": {}, "flagged": []} if new else written.counted(self.path)
        self._keys = {c: set() for c in OBJECTS} if new else _seen(self._facts)
        written.forget(self.path)  # not as stamped until this writer closes it
        repair_tail(self.path)
        self._f = open(self.path, "ab")
        self._buf: list = []
        self.every = max(1, every)

    def write(self, row: BaseModel | dict[str, Any]) -> None:
        if type(row) is not KatRecord:
            self._own = False
        self._buf.append(row)
        if len(self._buf) >= self.every:
            self.flush()

    def flush(self) -> None:
        try:
            self._flush()
        except BaseException:  # the file may hold a torn or partial batch: no stamp
            self._own = False
            raise

    def _flush(self) -> None:
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
            if self._own and self._facts is not None:
                self._count(rows)
        self._f.flush()

    def _count(self, rows: list) -> None:
        """Add a written batch to the facts: rows per (mode, domain) stratum, export's names; the flagged ids."""
        try:
            pairs = Counter(zip(map(_MODE, rows), map(dict.get, map(_TAGS, rows), repeat("domain"))))
        except TypeError:  # an unhashable domain: export counts it itself
            self._facts = None
            return
        strata = self._facts["strata"]
        for (mode, domain), n in pairs.items():
            name = stratum(mode, {"domain": domain})
            strata[name] = strata.get(name, 0) + n
        if self._keys is not None:
            for name, get in OBJECTS.items():
                keys = self._keys[name]
                keys.update(chain.from_iterable(map(get, rows)))  # (iterating a dict gives its keys)
                if len(keys) > MAX_KEYS:
                    self._keys = None
                    break
        reviews = list(map(dict.get, map(_VOTE, rows), repeat("review")))
        if True in reviews:  # (== True: a 1 too; the rule itself looks closer)
            for r, review in zip(rows, reviews):
                if waits_for_review(review, r.provenance.get("review")):
                    self._facts["flagged"].append([r.id, stratum(r.mode, r.tags)])

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.flush()
            finally:
                self._f.close()
            if self._own:
                if self._facts is not None:
                    self._facts.pop("keys", None)
                    if self._keys is not None:
                        self._facts["keys"] = {name: sorted(keys) for name, keys in self._keys.items()}
                written.stamp(self.path, self._facts)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
