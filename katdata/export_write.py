"""Export's parquet files: the shards of each split, written a row group at a time, on a background thread.

`SplitWriter` cuts a split's tables into row groups of ``batch_rows`` rows and shards of ``shard_rows``
rows. The parquet encoding and compression of each row group (pyarrow releases the GIL for it) runs on one
`Background` thread while the main thread decodes and builds the next rows: the calls reach pyarrow in the
same order with the same tables, so the files are byte for byte what writing inline gives. At most
``Background.DEPTH`` row groups wait for the thread (memory stays flat); an error on the thread is raised in
the main thread at its next call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from pathlib import Path
from typing import Callable, Literal, Optional

log = logging.getLogger(__name__)

Format = Literal["hf", "trl", "llamafactory"]


def shard_path(fmt: Format, split: str, i: int, n: int) -> str:
    """data/{split}-i-of-n.parquet; LLaMA-Factory reads one file or folder per dataset: data/{split}/."""
    name = f"{split}-{i:05d}-of-{n:05d}.parquet"
    return f"data/{split}/{name}" if fmt == "llamafactory" else f"data/{name}"


def data_glob(fmt: Format, split: str) -> str:
    """The data_files pattern of a split in the card's configs."""
    return f"data/{split}/*.parquet" if fmt == "llamafactory" else f"data/{split}-*.parquet"


class Background:
    """One thread that runs the calls it is given, in order; ``inline=True`` runs them at once instead."""

    DEPTH = 4  # calls waiting at most (each holds a row group)

    def __init__(self, inline: bool = False):
        self.error: Optional[BaseException] = None
        self.thread = None
        if not inline:
            self.calls: queue.Queue = queue.Queue(self.DEPTH)
            self.thread = threading.Thread(target=self._loop, name="katdata-export-write", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            call = self.calls.get()
            if call is None:
                return
            if self.error is None:  # after an error the rest is dropped (the main thread raises it)
                try:
                    call()
                except BaseException as exc:  # noqa: BLE001  (carried to the main thread)
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc

    def submit(self, call: Callable[[], None]) -> None:
        self._raise()
        if self.thread is None:
            call()
        else:
            self.calls.put(call)

    def close(self, quiet: bool = False) -> None:
        """Wait for every call given so far; raise the error of one that failed (``quiet``: drop it, when
        another error is on its way out already)."""
        if self.thread is not None:
            self.calls.put(None)
            self.thread.join()
            self.thread = None
        if quiet:
            self.error = None
        self._raise()


class SplitWriter:
    """Parquet shards of one split: tables buffered, written as row groups of ``batch_rows`` rows by
    ``background``."""

    def __init__(self, root: Path, fmt: Format, split: str, total: int, schema, shard_rows: int, batch_rows: int,
                 background: Background):
        self.root, self.fmt, self.split, self.schema = root, fmt, split, schema
        self.shard_rows, self.batch_rows = shard_rows, batch_rows
        self.n_shards = max(1, math.ceil(total / shard_rows))
        self.buf: list = []
        self.buffered, self.shard, self.in_shard, self.rows, self.nbytes = 0, 0, 0, 0, 0
        self.writer = None
        self.background = background

    def _room(self) -> int:
        return min(self.batch_rows, self.shard_rows - self.in_shard)

    def add(self, table) -> None:
        if table.num_rows:
            self.buf.append(table)
            self.buffered += table.num_rows
        while self.buffered and self.buffered >= self._room():
            self._write(self._room())

    def _write(self, k: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pa.concat_tables(self.buf) if len(self.buf) > 1 else self.buf[0]
        head, rest = t.slice(0, k), t.slice(k)
        self.buf, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        if self.writer is None:
            path = self.root / shard_path(self.fmt, self.split, self.shard, self.n_shards)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema)
        writer = self.writer
        self.background.submit(lambda: writer.write_table(head.combine_chunks(), row_group_size=k))
        self.in_shard += k
        self.rows += k
        self.nbytes += head.nbytes
        if self.in_shard >= self.shard_rows:
            self.background.submit(writer.close)
            self.writer, self.shard, self.in_shard = None, self.shard + 1, 0

    def close(self) -> None:
        if self.buffered:
            self._write(self.buffered)
        if self.writer is not None:
            self.background.submit(self.writer.close)
            self.writer = None
