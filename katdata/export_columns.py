"""The hf layout of an export, a row group at a time: KatRecords appended column by column into a
`Batch`, whose arrow arrays are built at once (several times faster than a dict per row). The JSON of the
struct columns' ``extra`` fields is serialized for the whole row group in one call (`dumps_many`), and the
chat column is taken by index from the built query/response/system arrays."""

from __future__ import annotations

from operator import attrgetter, itemgetter
from typing import Optional

import msgspec
import pydantic_core

from katdata import card
from katdata.records import Change

_PARTS = msgspec.json.Decoder(list[msgspec.Raw])


def dumps_many(values: list) -> list:
    """`card.dumps` of each value (as UTF-8 bytes; None stays None), in one serializer call: pydantic-core's
    JSON of the list, cut back into its elements by msgspec (each element is the value's own JSON)."""
    try:
        parts = _PARTS.decode(pydantic_core.to_json(values))
    except Exception:  # noqa: BLE001  (what the list cannot do: value by value, with card.dumps' own errors)
        return [None if v is None else card.dumps(v).encode() for v in values]
    return [None if v is None else bytes(p) for v, p in zip(values, parts)]


def _provenance(prov: dict) -> tuple[Optional[str], dict, Optional[str]]:
    """(source, models {role: model}, extra JSON) of a provenance dict; anything else goes to extra."""
    source, models, rest = _provenance_parts(prov)
    return source, models, (card.dumps(rest) if rest is not None else None)


def _provenance_parts(prov: dict) -> tuple[Optional[str], dict, Optional[dict]]:
    """(source, models, the rest of the dict or None when nothing is left) of a provenance dict."""
    source, models = prov.get("source"), prov.get("models")
    src_ok = type(source) is str
    mod_ok = type(models) is dict and bool(models) and all(type(k) is str and type(v) is str for k, v in models.items())
    typed = (source if src_ok else None), (models if mod_ok else {})
    if len(prov) == src_ok + mod_ok:
        return (*typed, None)
    return (*typed, {k: v for k, v in prov.items() if not (k == "source" and src_ok or k == "models" and mod_ok)})


def _change(c: Change) -> tuple:
    return c.field, card.dumps(c.old), card.dumps(c.new), c.annotator, c.at


def _plan(d: dict, types: dict[str, str], cache: dict) -> tuple[bool, tuple]:
    """(every typed value fits its column, the untyped keys), cached by the dict's key/type signature."""
    sig = (tuple(d), tuple(map(type, d.values())))
    plan = cache.get(sig)
    if plan is None:
        if len(cache) > 4096:
            cache.clear()
        ok = all(t is type(None) or t in card.COLUMN_TYPES[types[k]] for k, t in zip(*sig) if k in types)
        plan = cache[sig] = (ok, tuple(k for k in sig[0] if k not in types))
    return plan


def _struct_array(dicts: list[dict], types: dict[str, str], typ, cache: dict):
    """A struct column from dicts: arrow reads the typed keys itself (it ignores others); dicts with a
    value of an unexpected type go through `card.typed`."""
    import pyarrow as pa

    vals = []
    for d in dicts:
        ok, extra = _plan(d, types, cache)
        if not ok:
            d = card.typed(d, types)
        elif extra:
            d = d | {"extra": card.dumps({k: d[k] for k in extra})}
        vals.append(d)
    try:
        return pa.array(vals, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # an int out of int32 range: the careful path
        return pa.array([card.typed(d, types) for d in dicts], type=typ)


_NONE = type(None)


def _struct_columns(dicts: list[dict], types: dict[str, str], typ):
    """The struct column built a field at a time (no dict per row through arrow's converter); None when a
    value does not fit its typed column or an int overflows (then `_struct_array` takes the batch)."""
    import pyarrow as pa

    keys = types.keys()
    sigs = set(map(tuple, dicts))
    if len(sigs) == 1:
        return _one_signature(dicts, next(iter(sigs)), types, typ)
    extra = dumps_many([None if d.keys() <= keys else {k: v for k, v in d.items() if k not in types} for d in dicts])
    arrays = []
    try:
        for f in typ:
            if f.name == "extra":
                arrays.append(pa.array(extra, pa.string()))
                continue
            k = f.name
            vals = [d.get(k) for d in dicts]
            if not set(map(type, vals)) <= {_NONE, *card.COLUMN_TYPES[types[k]]}:
                return None
            arrays.append(pa.array(vals, type=f.type))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return pa.StructArray.from_arrays(arrays, fields=list(typ))


def _one_signature(dicts: list[dict], sig: tuple, types: dict[str, str], typ):
    """`_struct_columns` for dicts that all have the keys ``sig`` in this order: each key's values in one
    ``itemgetter`` pass; None as there (a value that does not fit its column, an int out of range)."""
    import pyarrow as pa

    n = len(dicts)
    values = {k: list(map(itemgetter(k), dicts)) for k in sig if k in types}  # the typed keys' columns
    untyped = [k for k in sig if k not in types]
    if len(untyped) == 1:
        k = untyped[0]
        extra = dumps_many([{k: v} for v in map(itemgetter(k), dicts)])
    elif untyped:
        extra = dumps_many([{k: d[k] for k in untyped} for d in dicts])
    else:
        extra = None
    arrays = []
    try:
        for f in typ:
            if f.name == "extra":
                arrays.append(pa.array(extra, pa.string()) if extra is not None else pa.nulls(n, pa.string()))
                continue
            vals = values.get(f.name)
            if vals is None:
                arrays.append(pa.nulls(n, f.type))
                continue
            if not set(map(type, vals)) <= {_NONE, *card.COLUMN_TYPES[types[f.name]]}:
                return None
            arrays.append(pa.array(vals, type=f.type))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return pa.StructArray.from_arrays(arrays, fields=list(typ))


def _plain_provenance(provs: list[dict]) -> Optional[tuple[list, dict, list]]:
    """(source, models columns, model offsets) when every provenance holds just a string ``source`` and a
    non-empty ``models`` dict of strings (the common case: no extra); None otherwise (the row-wise path)."""
    if set(map(tuple, provs)) not in ({("source", "models")}, {("models", "source")}):
        return None
    source = [p["source"] for p in provs]
    if set(map(type, source)) != {str}:
        return None
    models = [p["models"] for p in provs]
    if set(map(type, models)) != {dict}:
        return None
    try:
        kinds = set(map(tuple, map(dict.items, models)))  # the distinct (role, model) lists
    except TypeError:  # a value that is no string (a list, a dict): the row-wise path names it
        return None
    if not all(pairs and all(type(k) is str and type(v) is str for k, v in pairs) for pairs in kinds):
        return None
    if len(kinds) == 1:  # one (role, model) list for the whole batch
        pairs = next(iter(kinds))
        k = len(pairs)
        return source, {"role": [r for r, _ in pairs] * len(models), "model": [m for _, m in pairs] * len(models)}, \
            list(range(0, k * len(models) + 1, k))
    roles: list = []
    names: list = []
    offsets = [0]
    for m in models:
        roles += m.keys()
        names += m.values()
        offsets.append(len(roles))
    return source, {"role": roles, "model": names}, offsets


def _list_array(offsets: list[int], fields: dict[str, list], typ):
    import pyarrow as pa

    st = typ.value_type
    values = pa.StructArray.from_arrays([pa.array(fields[f.name], type=f.type) for f in st], fields=list(st))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=typ)


class Batch:
    """One row group in the hf layout: records collected, then each column built at once from them.

    A record is anything with KatRecord's attributes (a KatRecord, or export_arrow.Rec as the fast reader
    decodes it). Several times faster than a dict per row through ``pa.Table.from_pylist``: each flat column
    comes out of one ``attrgetter`` pass (quicker than transposing a tuple per record), the struct columns a
    field at a time.
    """

    FLAT = ("id", "query", "system", "response", "mode", "judge", "think", "answer", "reference", "kind",
            "label_source", "content_source")
    _cache: dict = {}

    def __init__(self) -> None:
        self.n, self.test = 0, []
        self.recs: list = []

    def add(self, rec, test: bool) -> None:
        self.n += 1
        self.test.append(test)
        self.recs.append(rec)

    def extend(self, recs: list, test: list[bool]) -> None:
        self.n += len(recs)
        self.test += test
        self.recs += recs

    @staticmethod
    def _messages(typ, system: list, texts: dict):
        """The chat column: [system,] user, assistant per row, taken from the built query/response (and system)
        string arrays by index (no string is converted twice); a system message where the system prompt is
        non-empty."""
        import numpy as np
        import pyarrow as pa

        n = len(system)
        has = np.fromiter(map(bool, system), bool, n)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(2 + has, out=offsets[1:])
        first, rows = offsets[:-1], np.arange(n)
        index = np.empty(offsets[-1], np.int64)  # into [system..., query..., response...]
        role = np.empty(offsets[-1], np.int8)  # into (system, user, assistant)
        with_system = np.flatnonzero(has)
        index[first[with_system]], role[first[with_system]] = with_system, 0
        user = first + has
        index[user], role[user] = n + rows, 1
        index[user + 1], role[user + 1] = 2 * n + rows, 2
        st = typ.value_type
        contents = pa.concat_arrays([texts["system"], texts["query"], texts["response"]]).take(pa.array(index))
        roles = pa.array(["system", "user", "assistant"], st.field("role").type).take(pa.array(role))
        values = pa.StructArray.from_arrays([roles, contents], fields=list(st))
        return pa.ListArray.from_arrays(pa.array(offsets), values, type=typ)

    def _provenance(self, typ):
        import pyarrow as pa

        provs = [r.provenance for r in self.recs]
        fast = _plain_provenance(provs)
        if fast is not None:
            source, models, model_offsets = fast
            extra = [None] * len(provs)
        else:
            source, rest = [], []
            models, model_offsets = {"role": [], "model": []}, [0]
            for p in provs:
                s, mods, x = _provenance_parts(p)
                source.append(s)
                rest.append(x)
                if mods:
                    models["role"] += mods.keys()
                    models["model"] += mods.values()
                model_offsets.append(len(models["role"]))
            extra = dumps_many(rest)
        changes, change_offsets = {k: [] for k in ("field", "old", "new", "annotator", "at")}, [0]
        if any(r.changes for r in self.recs):
            for r in self.recs:
                for c in r.changes:
                    for col, v in zip(changes.values(), _change(c)):
                        col.append(v)
                change_offsets.append(len(changes["field"]))
        else:
            change_offsets = [0] * (len(provs) + 1)
        kids = {"models": _list_array(model_offsets, models, typ.field("models").type),
                "changes": _list_array(change_offsets, changes, typ.field("changes").type),
                "source": pa.array(source, pa.string()), "extra": pa.array(extra, pa.string())}
        return pa.StructArray.from_arrays([kids[x.name] for x in typ], fields=list(typ))

    def table(self, schema):
        import pyarrow as pa

        types = {f.name: f.type for f in schema if f.name in self.FLAT}
        for k in ("system", "query", "response"):  # the messages' texts
            types.setdefault(k, pa.string())
        cols = {k: list(map(attrgetter(k), self.recs)) for k in types}  # a C-level pass per column
        texts = {k: pa.array(v, type=types[k]) for k, v in cols.items()}
        arrays = []
        for f in schema:
            if f.name in self.FLAT:
                arrays.append(texts[f.name])
            elif f.name == "messages":
                arrays.append(self._messages(f.type, cols["system"], texts))
            elif f.name in ("tags", "vote"):
                types = card.TAG_TYPES if f.name == "tags" else card.VOTE_TYPES
                dicts = list(map(attrgetter(f.name), self.recs))
                col = _struct_columns(dicts, types, f.type)
                arrays.append(col if col is not None else
                              _struct_array(dicts, types, f.type, self._cache.setdefault(f.name, {})))
            else:
                arrays.append(self._provenance(f.type))
        return pa.Table.from_arrays(arrays, schema=schema)
