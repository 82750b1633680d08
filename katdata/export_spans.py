"""Export's reading work, a span of whole lines at a time, in worker processes when the file is large.

Each of the three reads of the records file (the hold-back flags, pass 1's rows per stratum, pass 2's
typed records and their hf columns) is done per span: `spans` cuts the file at line ends every
``BLOCK`` bytes, a span's work is a plain function of its bytes, and the results are taken in file order.
Large files go to a pool of worker processes (loky's: fresh interpreters that leave the caller's
``__main__`` alone; one per CPU, at most ``MAX_WORKERS``, a few spans in flight so memory stays flat; they run
without the cyclic garbage collector, as export's loop does); small ones are read in this process. Either way
the results, and so the exported bytes, are the same. A bad line is reported by the first span that holds one, with
its line number in the file.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter, deque
from concurrent.futures.process import BrokenProcessPool  # loky's errors for a dead worker derive from it
from itertools import repeat
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from katdata import export_arrow, review_routing
from katdata.errors import InputError, KatdataError

log = logging.getLogger(__name__)

BLOCK = export_arrow.BLOCK
# worker processes at most (KATDATA_EXPORT_WORKERS; 1: all in this process). Measured on the 2-core machine (issue 29,
# bench/export_scale.py --workers): 2 workers export 1M records 15-20% faster than none, 100k no faster (start-up)
MAX_WORKERS = int(os.environ.get("KATDATA_EXPORT_WORKERS", "4") or 1)
MIN_SPANS = 48  # fewer spans than this (about 200 MB): no worker processes (starting them costs more than they win)
IN_FLIGHT = 2  # spans submitted ahead per worker


def spans(path: Path, size: int = BLOCK) -> list[tuple[int, int]]:
    """(offset, length) of each span: ``size`` bytes, extended to the end of the line they stop in."""
    if not Path(path).is_file():
        return []
    total = os.path.getsize(path)
    out, off = [], 0
    with open(path, "rb") as f:
        while off < total:
            end = off + size
            if end < total:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.readline()
                end = f.tell()
            end = min(end, total)
            out.append((off, end - off))
            off = end
    return out


def _block(path: str, off: int, length: int) -> tuple[bytes, list[bytes]]:
    with open(path, "rb") as f:
        f.seek(off)
        block = f.read(length)
    lines = block.split(b"\n")
    if not lines[-1]:
        lines.pop()
    return block, lines


class _Failed:
    """An InputError carried back from a worker (its line counted from the span's first line)."""

    def __init__(self, exc: InputError):
        self.path, self.line, self.field = exc.path, exc.line, exc.field
        where = str(exc.path) + (f":{exc.line}" if exc.line is not None else "") + \
            (f" field '{exc.field}'" if exc.field else "")
        self.message = str(exc)[len(where) + 2:]

    def raise_at(self, first: int) -> None:
        line = None if self.line is None else self.line + first - 1
        raise InputError(self.path, self.message, line=line, field=self.field)


def _run(fn: Callable, path: str, off: int, length: int, *args) -> tuple[int, Any]:
    """(lines in the span, fn(path, block, lines, *args) or the _Failed of its InputError)."""
    block, lines = _block(path, off, length)
    try:
        return len(lines), fn(Path(path), block, lines, *args)
    except InputError as exc:
        return len(lines), _Failed(exc)


def _flags(path: Path, block: bytes, lines: list[bytes]) -> set[str]:
    out: set[str] = set()
    keys = block.count(b'"review"')
    if keys and keys != sum(map(block.count, export_arrow.SAFE)) and review_routing._FLAG.search(block):
        review_routing._flagged_lines(lines, out)
    return out


def _counts(path: Path, block: bytes, lines: list[bytes], skip) -> Counter:
    return export_arrow.count_lines(path, 1, block, lines, skip)


def _tables(path: Path, block: bytes, lines: list[bytes], skip, schema, start: int, size: int) -> tuple[list[str], list]:
    """The kept records' strata, and their hf tables (katdata.export_columns) cut where a row group of ``size``
    rows ends (``start``: how many kept records come before this span), so that each row group is built from
    fresh arrays exactly as when it is built at once."""
    from katdata.export_columns import Batch

    recs = export_arrow.decode_block(path, 1, lines)
    if skip:
        recs = [r for r in recs if r.id not in skip]
    strata = _strata(recs)
    tables, i = [], 0
    while i < len(recs):
        j = min(len(recs), i + size - (start + i) % size)
        batch = Batch()
        batch.extend(recs[i:j], [])
        tables.append(batch.table(schema))
        i = j
    return strata, tables


def _strata(recs: list) -> list[str]:
    """Each record's stratum ("mode|domain"), each distinct (mode, domain) spelled once."""
    both = list(zip(map(_MODE, recs), map(dict.get, map(_TAGS, recs), repeat("domain"))))
    try:
        names = {md: f"{md[0]}|{md[1] if md[1] is not None else 'unknown'}" for md in set(both)}
    except TypeError:  # an unhashable domain: spelled row by row
        return [f"{m}|{d if d is not None else 'unknown'}" for m, d in both]
    return list(map(names.__getitem__, both))


_MODE, _TAGS = attrgetter("mode"), attrgetter("tags")


class Scan:
    """What the hold-back scan and pass 1 take from one span in one read: its flagged ids, its rows per stratum
    (all, and without the rows whose id it flagged itself), how many rows that leaves out, and the hashes of
    its string ids (to see at the end whether any row shares an id another span flagged)."""

    def __init__(self, flags: set[str], ids: list, strata: list[str]):
        self.flags = flags
        self.all = Counter(strata)
        if flags:
            kept = [s for i, s in zip(ids, strata) if not (isinstance(i, str) and i in flags)]
            self.held, self.skipped = Counter(kept), len(strata) - len(kept)
        else:
            self.held, self.skipped = self.all, 0
        self.hashes = stable_hashes(ids if set(map(type, ids)) <= {str} else [i for i in ids if isinstance(i, str)])


def stable_hashes(ids):
    """64 bits per id, the same in every process (CRC-32 and Adler-32 of its UTF-8; str.__hash__ is salted per
    process, and the spans may be read in worker processes)."""
    import numpy as np

    raw = list(map(_UTF8, ids))
    crc = np.fromiter(map(zlib.crc32, raw), np.uint64, len(raw))
    adler = np.fromiter(map(zlib.adler32, raw), np.uint64, len(raw))
    return (crc << np.uint64(32)) | adler


_UTF8 = methodcaller("encode", "utf-8", "surrogatepass")


def flag_count_span(path: str, off: int, length: int):
    """The hold-back scan and pass 1 in one read of a span (a `Scan`)."""
    block, lines = _block(path, off, length)
    try:
        keys = export_arrow.key_columns(Path(path), 1, block, lines)
        return len(lines), Scan(_flags(Path(path), block, lines), *keys)
    except InputError as exc:
        return len(lines), _Failed(exc)


def held_counts(scans: list[Scan], waits: set[str]) -> Optional[list[Counter]]:
    """Pass 1's rows per span with the ids in ``waits`` (all the spans' flags) left out, from the scans alone where
    that is exact: where no row outside the spans' own flagged rows has a flagged id (checked by `stable_hashes`,
    which count every such row, and a colliding one besides: a collision only costs a second read); None
    otherwise (pass 1 reads the file again)."""
    import numpy as np

    if not waits:
        return [s.all for s in scans]
    flagged = stable_hashes(waits)
    rows = sum(int(np.isin(s.hashes, flagged).sum()) for s in scans)
    return [s.held for s in scans] if rows == sum(s.skipped for s in scans) else None


def flag_span(path: str, off: int, length: int):
    """The ids of a span the vote flagged and no reviewer answered (review_routing's rule)."""
    return _run(_flags, path, off, length)


def count_span(path: str, off: int, length: int, skip):
    """Pass 1 over a span: rows per stratum, ids in ``skip`` left out."""
    return _run(_counts, path, off, length, skip)


def table_span(path: str, off: int, length: int, skip, schema, start: int, size: int):
    """Pass 2 over a span: the kept records' strata and their hf tables, cut at row group ends."""
    return _run(_tables, path, off, length, skip, schema, start, size)


def _worker_start() -> None:
    """A worker process runs without the cyclic garbage collector, as export's own loop does (kat_bulk.gc_paused:
    the decoded rows hold no cycles)."""
    import gc

    gc.disable()


class Reader:
    """The spans of one file, mapped through a span function in order, by a process pool or here."""

    def __init__(self, path: Path, workers: Optional[int] = None):
        self.path = Path(path)
        self.spans = spans(self.path, BLOCK)
        n = workers if workers is not None else min(MAX_WORKERS, len(os.sched_getaffinity(0)))
        self.pool = None
        if n > 1 and len(self.spans) >= MIN_SPANS:
            # loky's processes are fresh interpreters that do not import the caller's __main__ (the standard library's
            # spawn runs a script's top level again in each worker, and fails on a script without a main guard)
            from loky import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(n, initializer=_worker_start)
            self.ahead = IN_FLIGHT * n
            log.debug("reading %s in %d spans with %d worker processes", self.path, len(self.spans), n)

    def map(self, fn: Callable, *args, each: Optional[list[tuple]] = None) -> Iterator:
        """fn's result per span, in file order (``each``: further arguments per span); a span's InputError is
        raised with its line in the file."""
        first = 1
        for n_lines, out in self._results(fn, args, each or [()] * len(self.spans)):
            if isinstance(out, _Failed):
                out.raise_at(first)
            first += n_lines
            yield out

    def _results(self, fn: Callable, args: tuple, each: list[tuple]) -> Iterator:
        calls = ((str(self.path), off, length, *args, *more) for (off, length), more in zip(self.spans, each))
        if self.pool is None:
            for call in calls:
                yield fn(*call)
            return
        queue: deque = deque()
        for call in calls:
            queue.append(self.pool.submit(fn, *call))
            if len(queue) >= self.ahead:
                break
        while queue:
            try:
                result = queue.popleft().result()
            except BrokenProcessPool as exc:  # a worker killed (out of memory, a signal) or unable to start
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise KatdataError(f"a worker process reading {self.path} stopped ({type(exc).__name__}: {first}); "
                                   "KATDATA_EXPORT_WORKERS=1 reads the file in this process instead") from exc
            call = next(calls, None)
            if call is not None:
                queue.append(self.pool.submit(fn, *call))
            yield result

    def close(self, failed: bool = False) -> None:
        """Stop the worker processes (``failed``: at once, their pending spans dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, kill_workers=failed)
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(failed=exc[0] is not None)
