"""Export's limits on this machine, for bench/export_scale.py: the floor (export's C++ parts alone, one thread) and
the bound (a column-wise export's best case, every core). Each takes the run folder export_scale built and its
record count, and returns a dict export_scale prints."""

from __future__ import annotations

import queue
import resource
import tempfile
import threading
import time
from pathlib import Path


def cpu() -> float:
    """This process's CPU seconds (user and system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _typed_schema():
    """The columns pyarrow's JSON reader types itself, as the export types them: the flat strings, tags and vote with
    their typed fields (``extra`` reads as null: no record has that key), provenance with its source only."""
    import pyarrow as pa

    from katdata import card
    from katdata.export_columns import Batch

    hf = card.features("hf").arrow_schema
    source = hf.field("provenance").type.field("source")
    return pa.schema([hf.field(k) for k in (*Batch.FLAT, "tags", "vote")] + [("provenance", pa.struct([source]))])


def floor(run: Path, n: int) -> dict:
    """What export's C++ parts alone cost on one thread, on the same records and export: pyarrow's JSON reader
    over records.jsonl's typed columns (the flat strings, the typed fields of tags and vote, provenance.source;
    no validation, no extras, no second pass) and the parquet encoding of the export's row groups (read back
    untimed, written with the same writer and row groups). A lower bound of export's records per CPU-second:
    nothing of the split, the card, the review hold-back or the Python rows is in it."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    schema = _typed_schema()
    c = cpu()
    reader = pj.open_json(run / "records.jsonl", read_options=pj.ReadOptions(use_threads=False, block_size=1 << 22),
                          parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
    rows = sum(b.num_rows for b in reader)
    read = cpu() - c
    if rows != n:
        raise SystemExit(f"floor: read {rows} records, expected {n}")
    encode = 0.0
    with tempfile.TemporaryDirectory(dir=run) as tmp:
        for i, path in enumerate(sorted((run / "export" / "data").glob("*.parquet"))):
            src = pq.ParquetFile(path)
            with pq.ParquetWriter(Path(tmp) / f"{i}.parquet", src.schema_arrow) as w:
                for g in range(src.num_row_groups):
                    t = src.read_row_group(g)
                    c = cpu()
                    w.write_table(t, row_group_size=t.num_rows)
                    encode += cpu() - c
    return {"step": "floor", "n": n, "read_cpu_s": read, "encode_cpu_s": encode, "cpu_rate": n / (read + encode)}


def bound(run: Path, n: int) -> dict:
    """The best case of a column-wise export (issue 29's item 2) on this machine, wall time with every core: pyarrow's
    JSON reader (its threads) over what it can type itself (the flat strings, the typed fields of tags and vote,
    provenance.source), the hf columns built from its arrays (messages by index, null extras, empty models and
    changes), a seeded random split and the parquet encoding on a second thread. Left out, because the reader cannot
    do them or they come after it: pass 1, validation, the free-keyed parts (the extras' JSON, provenance.models),
    the card and the hold-back. Not the export's output, only its shape. Also times, on one thread, msgspec decoding
    just the free-keyed parts of these records (the vote's answer classes, provenance.models): pyarrow's reader
    cannot read a JSON object with free keys (no map type), so a column-wise export still decodes them in Python."""
    from typing import Optional

    import msgspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from katdata import card
    from katdata.export_columns import Batch

    hf = card.features("hf").arrow_schema
    prov = hf.field("provenance").type
    todo: queue.Queue = queue.Queue(4)

    def encode(folder: str) -> None:
        writers = {}
        while (item := todo.get()) is not None:
            split, table = item
            if split not in writers:
                writers[split] = pq.ParquetWriter(Path(folder) / f"{split}.parquet", hf)
            writers[split].write_table(table, row_group_size=table.num_rows)
        for w in writers.values():
            w.close()

    rng, rows = np.random.default_rng(0), 0
    with tempfile.TemporaryDirectory(dir=run) as tmp:
        writer = threading.Thread(target=encode, args=(tmp,))
        t, c = time.perf_counter(), cpu()
        writer.start()
        for rb in pj.open_json(run / "records.jsonl", read_options=pj.ReadOptions(block_size=1 << 22),
                               parse_options=pj.ParseOptions(explicit_schema=_typed_schema(),
                                                             unexpected_field_behavior="ignore")):
            for i in range(0, rb.num_rows, 2000):
                b = rb.slice(i, 2000)
                m, col = b.num_rows, dict(zip(b.schema.names, b.columns))
                texts = {"system": col["system"].fill_null(""), "query": col["query"], "response": col["response"]}
                kids = {"source": col["provenance"].field("source")}
                arrays = {**{k: col[k] for k in (*Batch.FLAT, "tags", "vote")},
                          "messages": Batch._messages(hf.field("messages").type, col["system"].to_pylist(), texts),
                          "provenance": pa.StructArray.from_arrays([kids.get(f.name, pa.nulls(m, f.type)) for f in prov],
                                                                   fields=list(prov))}
                table = pa.Table.from_arrays([arrays[f.name] for f in hf], schema=hf)
                test = pa.array(rng.random(m) < 0.1)
                todo.put(("train", table.filter(pa.compute.invert(test))))
                todo.put(("test", table.filter(test)))
                rows += m
        todo.put(None)
        writer.join()
        secs, used = time.perf_counter() - t, cpu() - c

    some = Optional[dict]
    classes = msgspec.defstruct("Classes", [("classes_on", some, None), ("classes_off", some, None)])
    models = msgspec.defstruct("Models", [("models", some, None)])
    free = msgspec.defstruct("Free", [("vote", Optional[classes], None), ("provenance", Optional[models], None)])
    decode, c = msgspec.json.Decoder(free).decode, cpu()
    with open(run / "records.jsonl", "rb") as f:
        while block := f.read(1 << 22):
            block += f.readline()
            list(map(decode, block.splitlines()))  # built and freed inside the timing, as a reader would
    if rows != n:
        raise SystemExit(f"bound: read {rows} records, expected {n}")
    return {"step": "bound", "n": n, "seconds": secs, "rate": n / secs, "cpu_s": used, "free_cpu_s": cpu() - c}
