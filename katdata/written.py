"""Which files katdata's own validating writer wrote, unchanged since: a stamp beside the file.

`assemble_rows.RecordWriter` writes records.jsonl from KatRecords that pydantic validated. When it closes the
file, it stamps it: ``.records.jsonl.katdata-written`` beside it holds the file's device, inode, size, and
modification and change times (nanoseconds). `unchanged` compares them with the file as it is now. Any write
to the file (an editor, ``sed -i``, a copy over it, appending) changes its change time, which no user command
can set back, and a copy elsewhere has another inode: then the stamp no longer matches, and readers check every
line as they would any file. A stamp that cannot be read, or one from an interrupted writer (removed when a
writer opens the file, written again only when it closes), matches nothing.

The stamp may also hold what the writer counted while it wrote (``facts``: rows per export stratum, the ids the
vote flagged for review, the keys its records' tags, vote and provenance hold), so export need not read the file
once more to count them, and looks only for the keys that are there (katdata.export_duck).
Export reads a stamped file column-wise without checking each line again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SUFFIX = ".katdata-written"
FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def stamp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{SUFFIX}")


def _facts(path: Path) -> Optional[dict]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {k: getattr(st, k) for k in FIELDS}


def _read(path: Path) -> Optional[dict]:
    """The stamp of ``path`` when it matches the file as it is now, else None."""
    now = _facts(path)
    if now is None:
        return None
    try:
        kept = json.loads(stamp_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or {k: kept.get(k) for k in FIELDS} != now:
        return None
    return kept


def unchanged(path: Path) -> bool:
    """Whether ``path`` is a file katdata's writer stamped and nobody changed since."""
    return _read(path) is not None


def counted(path: Path) -> Optional[dict]:
    """What the writer counted while it wrote ``path`` (its ``facts``), when the file is unchanged since; else None."""
    kept = _read(path)
    facts = kept.get("facts") if kept else None
    return facts if isinstance(facts, dict) else None


OBJECTS = ("tags", "vote", "provenance")  # the records' objects whose keys the facts may list


def keys(facts: Optional[dict]) -> Optional[dict[str, list[str]]]:
    """The keys the writer saw in each of the file's objects (OBJECTS), from its facts; None where it did not list
    them."""
    found = facts.get("keys") if isinstance(facts, dict) else None
    if not isinstance(found, dict) or not all(isinstance(found.get(c), list) for c in OBJECTS):
        return None
    return {c: found[c] for c in OBJECTS}


def forget(path: Path) -> None:
    """Remove the stamp of ``path`` (a writer opens it; until it closes, the file is not as stamped)."""
    try:
        stamp_path(path).unlink()
    except FileNotFoundError:
        pass


def stamp(path: Path, facts: Optional[dict] = None) -> None:
    """Record ``path`` as katdata's writer left it (the writer has closed it), with what it counted (``facts``, or
    none). A stamp that cannot be written is only a loss of speed: readers then check each line."""
    now = _facts(path)
    if now is None:
        return
    target = stamp_path(path)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(now | ({"facts": facts} if facts is not None else {})))
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("no stamp for %s (%s)", path, exc)
        try:
            tmp.unlink()
        except OSError:
            pass
