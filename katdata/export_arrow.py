"""Reading records.jsonl for export, a block at a time: each line decoded once, typed as a KatRecord.

The fast path decodes every line with msgspec into `Rec`, KatRecord's mirror derived by katdata.fast_rows (the
fields, types and refusals of `records.KatRecord`: unknown keys, wrong types and bad literals are errors).
msgspec refuses a little more than pydantic does (NaN, Infinity, lone surrogates): a block with any line it
refuses is read again by pydantic, line by line, exactly as before, so the records and the errors (file, line,
field) stay the same. What msgspec accepts, pydantic accepts with the same values (same ints, floats, key order,
last of duplicate keys), so the exported bytes are the same either way.

Pass 1 (`count_lines`, `count_strata`) decodes only id, mode and tags.domain (`_Key`); the hold-back
scan (`flagged`, and export_spans per span) counts the ``"review"`` keys of a block and only looks further
into blocks where one could be ``true``.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from operator import attrgetter
from pathlib import Path
from typing import Any, Iterator, Optional

import msgspec
from pydantic import BaseModel, ConfigDict, ValidationError

from katdata import fast_rows, review_routing
from katdata.errors import InputError
from katdata.records import KatRecord
from katdata.runfiles import invalid_row

log = logging.getLogger(__name__)

BLOCK = 1 << 22  # bytes read at once (whole lines)
CHUNK = 1000  # lines pydantic validates at once on the careful path


Rec = fast_rows.struct(KatRecord)  # records.KatRecord as msgspec reads it (katdata.fast_rows: its fields, types, refusals)


class _Domain(msgspec.Struct):
    domain: Any = None


class _Key(msgspec.Struct):
    """What pass 1 needs of a line (other keys skipped)."""

    id: Any = None
    mode: Any = None
    tags: Optional[_Domain] = None


class _PDomain(BaseModel):
    model_config = ConfigDict(extra="ignore")
    domain: Any = None


class PKey(BaseModel):
    """Pass 1's key as pydantic reads it (the careful path); its JSON parser skips the rest without building it."""

    model_config = ConfigDict(extra="ignore")
    id: Any = None
    mode: Any = None
    tags: Optional[_PDomain] = None


_RECS = fast_rows.decoder(KatRecord)
_KEYS = msgspec.json.Decoder(_Key)


def _check(path: Path) -> None:
    if not Path(path).is_file():
        raise InputError(path, "file not found (run the earlier stages first)")


def blocks(path: Path, size: int = BLOCK) -> Iterator[tuple[int, bytes, list[bytes]]]:
    """(number of the first line, the block, its lines) of ``path``, ``size`` bytes at a time, whole lines only."""
    first = 1
    with open(path, "rb") as f:
        while True:
            block = f.read(size)
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()
            lines = block.split(b"\n")
            if not lines[-1]:
                lines.pop()  # the block ended with a newline
            yield first, block, lines
            first += len(lines)


def _numbered(first: int, lines: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines, as export's line reader numbers them."""
    for n, raw in enumerate(lines, first):
        if raw.strip():
            yield n, raw


def stratum(mode: Any, tags: Any) -> str:
    domain = tags.get("domain") if isinstance(tags, dict) else None
    return f"{mode}|{domain if domain is not None else 'unknown'}"


# ---------------------------------------------------------------- pass 1: rows per stratum

def _key_careful(path: Path, n: int, raw: bytes) -> tuple[Any, str]:
    """(id, stratum) of one line as pass 1 always read it (pydantic, then json for rows it refuses)."""
    try:
        k = PKey.model_validate_json(raw)
        return k.id, stratum(k.mode, {"domain": k.tags.domain} if k.tags else None)
    except ValidationError:
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(path, f"broken JSON ({exc})", line=n) from exc
        if not isinstance(d, dict):
            raise InputError(path, "not a JSON object", line=n)
        return d.get("id"), stratum(d.get("mode"), d.get("tags"))  # bad tags: pass 2 names the field


def _key_stratum(k: _Key) -> str:
    domain = k.tags.domain if k.tags is not None else None
    return f"{k.mode}|{domain if domain is not None else 'unknown'}"


def _utf8(block: bytes) -> bool:
    """msgspec does not look into the strings it skips: the whole block must be UTF-8 (what bytes.decode accepts,
    checked by Arrow's validator without building a str: several times faster)."""
    if block.isascii():
        return True
    import pyarrow as pa

    text = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(struct.pack("<qq", 0, len(block))),
                                                        pa.py_buffer(block)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def count_lines(path: Path, first: int, block: bytes, lines: list[bytes], skip) -> Counter:
    """Pass 1 over one block: rows per stratum, ids in ``skip`` left out (``first``: the number of its first line)."""
    ids, strata = key_columns(path, first, block, lines)
    if skip:
        return Counter(s for i, s in zip(ids, strata) if not (isinstance(i, str) and i in skip))
    return Counter(strata)


_MODE_DOMAIN = attrgetter("mode", "tags.domain")


def key_columns(path: Path, first: int, block: bytes, lines: list[bytes]) -> tuple[list, list[str]]:
    """(ids, strata) of the records of one block, as pass 1 reads them: each distinct (mode, domain) is spelled
    once where every line has a tags object and hashable values (else line by line, the same strings)."""
    raws = list(filter(bytes.strip, lines))
    keys = None
    if _utf8(block):
        try:
            keys = list(map(_KEYS.decode, raws))
        except msgspec.DecodeError:
            keys = None
    if keys is None:  # a line msgspec refuses: the block the careful way (same counts, same errors)
        pairs = [_key_careful(path, n, raw) for n, raw in _numbered(first, lines)]
        return [i for i, _ in pairs], [s for _, s in pairs]
    ids = list(map(_ID, keys))
    try:
        both = list(map(_MODE_DOMAIN, keys))
        names = {md: f"{md[0]}|{md[1] if md[1] is not None else 'unknown'}" for md in set(both)}
    except (AttributeError, TypeError):  # a line without tags, or an unhashable mode or domain
        return ids, list(map(_key_stratum, keys))
    return ids, list(map(names.__getitem__, both))


_ID = attrgetter("id")


def key_pairs(path: Path, first: int, block: bytes, lines: list[bytes]) -> list[tuple[Any, str]]:
    """(id, stratum) of each record of one block, as pass 1 reads them."""
    return list(zip(*key_columns(path, first, block, lines)))


def count_strata(path: Path, skip: frozenset | set = frozenset()) -> dict[str, int]:
    """Pass 1: rows per (mode, domain) stratum, ids in ``skip`` left out; broken JSON raises InputError
    with the line."""
    _check(path)
    counts: Counter = Counter()
    for first, block, lines in blocks(path):
        counts.update(count_lines(path, first, block, lines, skip))
    return dict(counts)


# ---------------------------------------------------------------- pass 2: typed records

def _validate_chunk(path: Path, many, nums: list[int], raws: list[bytes]) -> list[KatRecord]:
    """pydantic over a chunk as one JSON array; a chunk that fails is validated again row by row to name the line."""
    if not raws:
        return []
    try:
        recs = many.validate_json(b"[" + b",".join(raws) + b"]")
        if len(recs) == len(raws):
            return recs
    except ValidationError:
        pass
    out = []
    for n, raw in zip(nums, raws):
        try:
            out.append(KatRecord.model_validate_json(raw))
        except ValidationError as exc:
            raise invalid_row(path, n, exc) from exc
    return out


def _careful(path: Path, first: int, lines: list[bytes]) -> list[KatRecord]:
    from pydantic import TypeAdapter

    many = TypeAdapter(list[KatRecord])
    numbered = list(_numbered(first, lines))
    out: list = []
    for i in range(0, len(numbered), CHUNK):
        part = numbered[i:i + CHUNK]
        out += _validate_chunk(path, many, [n for n, _ in part], [raw for _, raw in part])
    return out


def decode_block(path: Path, first: int, lines: list[bytes]) -> list:
    """The records of one block's lines (Rec, or KatRecord where msgspec refused a line: both have the same
    attributes); a bad row raises InputError naming file, line and field."""
    try:
        return list(map(_RECS.decode, filter(bytes.strip, lines)))
    except msgspec.DecodeError:
        return _careful(path, first, lines)


def record_blocks(path: Path) -> Iterator[list]:
    """Pass 2: validated records, a block at a time, in file order."""
    _check(path)
    for first, _, lines in blocks(path):
        yield decode_block(path, first, lines)


# ---------------------------------------------------------------- hold-back

SAFE = (b'"review": false', b'"review":false')


def flagged(src: Path) -> set[str]:
    """review_routing's flagged ids (the vote flagged, no reviewer answered), the same set: a block whose every
    ``"review"`` key is followed by ``false`` holds none, the others go through review_routing's own reader."""
    out: set[str] = set()
    if not Path(src).is_file():
        return out
    with open(src, "rb") as f:
        while True:
            block = f.read(review_routing._BLOCK)
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()
            if block.count(b'"review"') == sum(map(block.count, SAFE)):
                continue  # no "review" key can be true here
            if review_routing._FLAG.search(block):
                review_routing._flagged_lines(block.split(b"\n"), out)
    return out
