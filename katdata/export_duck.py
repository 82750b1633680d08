"""Export's reader for a records file katdata wrote and nobody changed since: DuckDB's JSON reader, column-wise.

Every line of such a file is a KatRecord that pydantic validated before assemble's writer wrote it
(`katdata.written` says whether the file is unchanged since), so export need not decode and check each line in
Python again. DuckDB (in the ``local`` extra; without it export reads in Python) reads the file on all cores
straight into Arrow columns, and the hf columns are built from them as `export_columns.Batch` builds them from
decoded records: the same values, the same arrays, the same bytes. The writer also counted the rows per stratum
and the flagged ids (the stamp's facts), so one read is enough; without them `Reader.plan` reads the file once more.

Where DuckDB's reading could differ from the Python reader's, the file is read in Python instead (`Fallback`,
raised as soon as such a record comes up; export then starts over):
- a typed key of tags or vote (card.TAG_TYPES, card.VOTE_TYPES) whose value does not fit its column (the Python
  reader moves it to ``extra``), or a float column holding an integer beyond 2**53 (or a float that large);
- provenance whose ``source`` is not a string or whose ``models`` is not a non-empty object of strings;
- reviewer changes (only review/merged.jsonl has them, and no katdata writer stamps it);
- counts that do not match the records read (a held-back id shared by a record the vote did not flag).
The ``extra`` JSON of tags, vote and provenance (the keys without a column, in the line's order) comes from
DuckDB; where its spelling could differ from pydantic-core's (a number with a fraction or an exponent, a
backslash escape, a DEL) the value is spelled by pydantic-core from the text instead. Where the stamp lists the
keys the writer saw in each object, an object with no key beyond its columns needs no extra at all, and one with a
single such key gets it with a JSON path instead of merging the whole object (that merge was a third of DuckDB's
work). Provenance's models come as JSON text, each distinct text decoded once.

Files under ``MIN_BYTES`` are read in Python: starting DuckDB costs more than it saves there.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import pydantic_core

from katdata import card, written
from katdata.export_columns import Batch, dumps_many

log = logging.getLogger(__name__)

SQL_TYPES = {"string": "VARCHAR", "int32": "INTEGER", "bool": "BOOLEAN", "float64": "DOUBLE"}
MAX_EXACT = 2 ** 53  # the largest integer a float64 column holds exactly (Arrow refuses larger ones there)
RESPELL = r'[0-9][.eE]|\\|\x7f'  # extra JSON that pydantic-core may spell otherwise than DuckDB
# smaller files are read in Python (bench/export_scale.py: DuckDB's export x0.73 the Python reader's at 5,000 records,
# x1.48-1.65 at 100,000)
MIN_BYTES = 32 << 20


def available(path: Path) -> bool:
    """Whether this reader may read ``path``: katdata wrote the file, unchanged since, it holds ``MIN_BYTES`` or more,
    its path holds no glob character, and DuckDB is installed (KATDATA_EXPORT_DUCKDB=0: never)."""
    if os.environ.get("KATDATA_EXPORT_DUCKDB", "1") == "0" or not written.unchanged(path):
        return False
    if set(str(path)) & set("*?[{"):  # read_json takes its path as a glob pattern
        return False
    if os.path.getsize(path) < MIN_BYTES:
        return False
    try:
        import duckdb  # noqa: F401
    except ImportError:
        log.info("%s: DuckDB is not installed (pip install katdata[fast]): export reads it in Python", path)
        return False
    return True


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _paths(types: dict[str, str]) -> str:
    return "[" + ", ".join(_lit(f"$.{k}") for k in types) + "]"


def _structure(types: dict[str, str]) -> str:
    return _lit(json.dumps({k: SQL_TYPES[t] for k, t in types.items()}))


def _fit(types: dict[str, str], kinds: str, values: str) -> str:
    """SQL: every typed key of an object is absent, null or a value its column takes as the Python reader does
    (``kinds``: the keys' JSON types, a list; ``values``: the object as a struct of its typed keys). A float column
    takes an integer up to 2**53 (Arrow refuses larger ones there); a float of that size or more counts as not
    fitting too (DuckDB types an integer beyond 64 bits as a float: the Python reader would not)."""
    conds = []
    for i, (k, t) in enumerate(types.items(), 1):
        jt = f"coalesce({kinds}[{i}], 'NULL')"
        if t == "string":
            conds.append(f"{jt} IN ('NULL', 'VARCHAR')")
        elif t == "bool":
            conds.append(f"{jt} IN ('NULL', 'BOOLEAN')")
        elif t == "int32":
            conds.append(f"({jt} = 'NULL' OR ({jt} IN ('BIGINT', 'UBIGINT') AND {values}.{k} IS NOT NULL))")
        else:
            conds.append(f"({jt} = 'NULL' OR ({jt} IN ('BIGINT', 'UBIGINT', 'DOUBLE') "
                         f"AND abs({values}.{k}) < {MAX_EXACT}))")
    return "(" + " AND ".join(conds) + ")"


def _source(path: Path, skip_table: Optional[str]) -> str:
    flat = ", ".join(f"{k}: 'VARCHAR'" for k in Batch.FLAT)
    cols = "{" + flat + ", tags: 'JSON', vote: 'JSON', provenance: 'JSON', changes: 'JSON'}"
    where = f" WHERE id NOT IN (SELECT id FROM {skip_table})" if skip_table else ""
    return f"(SELECT * FROM read_json({_lit(str(path))}, format = 'newline_delimited', columns = {cols}){where})"


TAGS_V = f"json_transform(tags, {_structure(card.TAG_TYPES)})"
VOTE_V = f"json_transform(vote, {_structure(card.VOTE_TYPES)})"
# provenance's models as JSON text, decoded in Python once per distinct text (a run's records share a few; a MAP
# column cost DuckDB a third of its work)
PROV_V = "json_transform(provenance, '{\"source\": \"VARCHAR\", \"models\": \"JSON\"}')"
PROV_TYPES = {"source": "string", "models": "object"}  # provenance's keys with a column of their own


# where a line may hold what `_fit` refuses, found with one regular expression over an object's JSON (as DuckDB
# spells it: no spaces); a key that matches somewhere (nested, in a string) is only looked at exactly
_ANY_VALUE = {"string": '[^"n]', "bool": "[^tfn]", "int32": "(?:[^-0-9n]|-?[0-9]*[.eE]|-?[0-9]{10})",
              "float64": "(?:[^-0-9n]|-?[0-9]{16})"}
_STR = r'"(?:[^"\\]|\\.)*"'
# provenance: a source that is no string, models that are no object, an empty one, or one with a value no string
PROV_ODD = (r'"source":[^"]|"models":(?:[^{]|\{\})|"models":\{(?:' + _STR + ":" + _STR + ",)*" + _STR + ':[^"]')


def _odd(types: dict[str, str]) -> str:
    return "|".join(f'"{k}":{_ANY_VALUE[t]}' for k, t in types.items())


def _exact(obj: str, pattern: str, check: str) -> str:
    """SQL: ``check`` where the quick pattern finds something in ``obj``'s JSON, else true."""
    return f"CASE WHEN regexp_matches({obj}, {_lit(pattern)}) THEN coalesce({check}, false) ELSE true END"


def _ok_sql() -> str:
    """SQL over a record's tags, vote, provenance and changes (JSON text): whether this reader reads it as the
    Python reader does. A regular expression over each object finds the few records to look at exactly, with JSON
    functions (each a parse of the object)."""
    t, v = card.TAG_TYPES, card.VOTE_TYPES
    models = "json_type(provenance, '$.models.*')"
    prov_ok = ("(coalesce(json_type(provenance, '$.source'), 'VARCHAR') = 'VARCHAR' AND "
               "(json_type(provenance, '$.models') IS NULL OR (json_type(provenance, '$.models') = 'OBJECT' AND "
               f"len({models}) > 0 AND list_unique({models}) = 1 AND {models}[1] = 'VARCHAR')))")
    return (f"(({_exact('tags', _odd(t), _fit(t, f'json_type(tags, {_paths(t)})', TAGS_V))}) "
            f"AND ({_exact('vote', _odd(v), _fit(v, f'json_type(vote, {_paths(v)})', VOTE_V))}) "
            f"AND ({_exact('provenance', PROV_ODD, prov_ok)}) AND changes = '[]')")


# review_routing.waits_for_review: the vote flagged the record (vote.review is true) and provenance holds no
# reviewer's answer (an object under "review")
FLAGGED = ("CASE WHEN regexp_matches(vote, '\"review\":true') THEN coalesce(json_type(vote, '$.review') = 'BOOLEAN' "
           f"AND {VOTE_V}.review AND coalesce(json_type(provenance, '$.review'), 'NULL') <> 'OBJECT', false) "
           "ELSE false END")


def _text(path: Path, skip_table: Optional[str], flat: str = "id, mode") -> str:
    """SQL: the records with tags, vote, provenance and changes as JSON text."""
    return (f"(SELECT {flat}, tags::VARCHAR AS tags, vote::VARCHAR AS vote, provenance::VARCHAR AS provenance, "
            f"changes::VARCHAR AS changes FROM {_source(path, skip_table)})")


class Fallback(Exception):
    """DuckDB's reading of the file could differ from the Python reader's (or its counts were off): read it in
    Python instead."""


class Reader:
    """One records file read by DuckDB: `plan` (pass 1), then `tables` (pass 2)."""

    def __init__(self, path: Path, threads: Optional[int] = None, keys: Optional[dict[str, list[str]]] = None):
        """``keys``: the keys the writer listed for the file's tags, vote and provenance (`written.keys`), None:
        not listed."""
        import duckdb

        self.path = Path(path)
        self.keys = keys
        self.con = duckdb.connect(config={"threads": threads or len(os.sched_getaffinity(0))})
        self.skip_table: Optional[str] = None

    def _run(self, sql: str, get=lambda rel: rel.fetchall()):
        """``get`` of a query, DuckDB's errors as `Fallback` (what DuckDB cannot read, the Python reader reads or
        names)."""
        import duckdb

        try:
            return get(self.con.sql(sql))
        except duckdb.Error as exc:
            raise Fallback(f"DuckDB could not read it ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def close(self, failed: bool = False) -> None:
        """Close DuckDB (``failed``: as export_spans.Reader takes it; nothing else to stop here)."""
        self.con.close()

    def set_skip(self, skip) -> None:
        """Leave out the records with these ids (held back for review)."""
        import pyarrow as pa

        if skip:
            self.con.register("katdata_skip", pa.table({"id": pa.array(sorted(skip), pa.string())}))
            self.skip_table = "katdata_skip"
        else:
            self.skip_table = None

    def flags(self) -> set[str]:
        """review_routing's flagged ids: the vote's review flag is true and provenance holds no reviewer's answer."""
        sql = f"SELECT id FROM {_text(self.path, None)} WHERE {FLAGGED}"
        return {r[0] for r in self._run(sql)}

    def plan(self) -> tuple[Counter, int]:
        """Pass 1: rows per (mode, domain) stratum (the ids to skip left out), and how many of them the vote flagged
        for review (`flags`)."""
        sql = f"""SELECT mode, json_extract_string(tags, '$.domain'), count(*), count(*) FILTER (WHERE {FLAGGED})
                  FROM {_text(self.path, self.skip_table)} GROUP BY ALL"""
        rows = self._run(sql)
        return Counter({f"{m}|{d if d is not None else 'unknown'}": n for m, d, n, _ in rows}), sum(r[3] for r in rows)

    def tables(self, schema, size: int) -> Iterator[tuple[list[str], list]]:
        """Pass 2: (strata, [hf table]) per row group of ``size`` kept records, in file order; `Fallback` when a
        record is one this reader could read otherwise than the Python reader."""
        import pyarrow as pa

        flat = ", ".join(Batch.FLAT)
        sql = f"""SELECT {flat}, {TAGS_V} AS tags_v, {_extra("tags", card.TAG_TYPES, self.keys)} AS tags_extra,
                         {VOTE_V} AS vote_v, {_extra("vote", card.VOTE_TYPES, self.keys)} AS vote_extra,
                         {PROV_V} AS prov_v, {_extra("provenance", PROV_TYPES, self.keys)} AS prov_extra,
                         {_ok_sql()} AS ok
                  FROM {_text(self.path, self.skip_table, flat)}"""
        pending: list = []
        rows = 0
        batches = self._run(sql, lambda rel: rel.to_arrow_reader(size))
        while (batch := _read_batch(batches)) is not None:
            while batch.num_rows:
                take = min(batch.num_rows, size - rows)
                pending.append(batch.slice(0, take))
                batch, rows = batch.slice(take), rows + take
                if rows == size:
                    yield _table(pa.Table.from_batches(pending).combine_chunks(), schema)
                    pending, rows = [], 0
        if rows:
            yield _table(pa.Table.from_batches(pending).combine_chunks(), schema)


def _read_batch(batches):
    """DuckDB's next record batch (it reads and converts on its own threads meanwhile), None at the end."""
    import duckdb

    try:
        return batches.read_next_batch()
    except StopIteration:
        return None
    except (duckdb.Error, OSError) as exc:  # pyarrow's reader passes DuckDB's errors on as OSError (ArrowException)
        raise Fallback(f"DuckDB could not read it ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _extra(col: str, types: dict, keys: Optional[dict] = None) -> str:
    """SQL: the object without its typed keys (the others in their order), '{}' when none is left. Where the writer
    recorded the keys it saw (``keys``), an object that can hold no other key gives '{}' at once, and one that can
    hold one other key gives it by itself (a JSON function cheaper than the merge)."""
    rest = None if keys is None else [k for k in keys[col] if k not in types]
    if rest == []:
        return "'{}'"
    if rest is not None and len(rest) == 1:  # one key: no order of keys to keep
        pointer = _lit("/" + rest[0].replace("~", "~0").replace("/", "~1"))
        head = _lit("{" + pydantic_core.to_json(rest[0]).decode() + ":")
        return f"coalesce({head} || json_extract({col}, {pointer}) || '}}', '{{}}')"
    patch = _lit(json.dumps({k: None for k in types}))
    return f"json_merge_patch({col}, {patch})"


def _fresh(arr, typ=None):
    """A column laid out as ``pa.array`` lays out the Python reader's values (the card counts its bytes): cast to
    ``typ``, and no validity bitmap where nothing is null (DuckDB always gives one)."""
    import pyarrow as pa

    if typ is not None and arr.type != typ:
        arr = arr.cast(typ)
    bufs = arr.buffers()
    if arr.null_count == 0 and bufs[0] is not None:
        arr = pa.Array.from_buffers(arr.type, len(arr), [None, *bufs[1:]], null_count=0, offset=arr.offset)
    return arr


def _strings(arr):
    """A string column as the Python reader builds it (`_fresh`)."""
    import pyarrow as pa

    return _fresh(arr, pa.string())


def _extras(arr):
    """The ``extra`` column: null where nothing is left ('{}'), and pydantic-core's spelling where DuckDB's may
    differ from it; its buffers laid out as ``pa.array`` lays out the Python reader's list (card sizes)."""
    import msgspec
    import pyarrow as pa
    import pyarrow.compute as pc

    text = arr.cast(pa.string())
    empty = pc.equal(text, "{}")
    n_empty = pc.sum(empty).as_py() or 0
    if n_empty == len(text):
        return pa.nulls(len(text), pa.string())
    odd = pc.match_substring_regex(text, RESPELL)
    if not n_empty and not pc.any(odd).as_py():
        return _strings(text)
    values = [None if e else v for v, e in zip(text.to_pylist(), empty.to_pylist())]
    idx = [i for i, o in enumerate(odd.to_pylist()) if o and values[i] is not None]
    for i, b in zip(idx, dumps_many([msgspec.json.decode(values[i]) for i in idx])):
        values[i] = b.decode()
    return pa.array(values, pa.string())


def _typed(struct, typ):
    """The typed children of a struct column (tags or vote), as `export_columns` builds them."""
    arrays = []
    for f in typ:
        if f.name == "extra":
            continue
        arrays.append(_fresh(struct.field(f.name), f.type))
    return arrays


def _table(t, schema):
    """The hf table of one row group from DuckDB's columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pc.all(t.column("ok")).as_py():
        raise Fallback("a record holds values DuckDB would read otherwise than katdata's reader")

    texts = {k: _strings(t.column(k).combine_chunks()) for k in Batch.FLAT}
    strata = _strata(t)
    arrays = []
    for f in schema:
        if f.name in texts:
            arrays.append(texts[f.name])
        elif f.name == "messages":
            arrays.append(Batch._messages(f.type, texts["system"].to_pylist(), texts))
        elif f.name in ("tags", "vote"):
            kids = _typed(t.column(f"{f.name}_v").combine_chunks(), f.type)
            extra = _extras(t.column(f"{f.name}_extra").combine_chunks())
            names = [x.name for x in f.type]
            kids.insert(names.index("extra"), extra)
            arrays.append(pa.StructArray.from_arrays(kids, fields=list(f.type)))
        else:
            arrays.append(_provenance(t, f.type))
    return strata, [pa.Table.from_arrays(arrays, schema=schema)]


def _provenance(t, typ):
    """The provenance column: source, models (an absent one: an empty list, as the Python reader makes it), no
    changes, extra."""
    import numpy as np
    import pyarrow as pa

    prov = t.column("prov_v").combine_chunks()
    mt = typ.field("models").type
    offsets, keys, values = _models(prov.field("models"))
    st = mt.value_type
    models = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([keys, values], fields=list(st)), type=mt)
    n = len(t)
    ct = typ.field("changes").type
    no_changes = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)),
                                          pa.StructArray.from_arrays([pa.array([], f.type) for f in ct.value_type],
                                                                     fields=list(ct.value_type)), type=ct)
    kids = {"models": models, "changes": no_changes,
            "source": _strings(prov.field("source")),
            "extra": _extras(t.column("prov_extra").combine_chunks())}
    return pa.StructArray.from_arrays([kids[f.name] for f in typ], fields=list(typ))


def _models(texts):
    """Offsets, keys and values of the models column from provenance's models as JSON text (null: none, an empty
    list), each distinct text decoded once (`ok` has checked that each is an object of strings)."""
    import msgspec
    import numpy as np
    import pyarrow as pa

    codes = texts.cast(pa.string()).dictionary_encode()
    found = [msgspec.json.decode(x) for x in codes.dictionary.to_pylist()]
    sizes = np.array([len(d) for d in found] + [0], np.int64)  # the last: a null text
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = codes.indices.fill_null(len(found)).to_numpy()
    lengths = sizes[which]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    take = pa.array(np.repeat(starts[which] - offsets[:-1], lengths) + np.arange(offsets[-1]))
    keys = pa.array([k for d in found for k in d], pa.string()).take(take)
    values = pa.array([v for d in found for v in d.values()], pa.string()).take(take)
    return pa.array(offsets.astype(np.int32)), _strings(keys), _strings(values)


def _strata(t) -> list[str]:
    """Each record's stratum ("mode|domain"), as export_spans spells it: each distinct pair spelled once."""
    import pyarrow.compute as pc

    domain = pc.fill_null(t.column("tags_v").combine_chunks().field("domain"), "unknown")
    pairs = pc.binary_join_element_wise(t.column("mode").combine_chunks(), domain, "|").dictionary_encode()
    names = pairs.dictionary.to_pylist()
    return list(map(names.__getitem__, pairs.indices.to_numpy(zero_copy_only=False).tolist()))
