"""The rows a LoRA run trains on: the run's export (its stratified train/test split) or its records.jsonl, each
row checked; the held-out split and its ids (train/split.json, read back by rl and eval); mode balancing.

Records that wait for review (``hold``: katdata.review_routing.hold_policy) are left out of a records.jsonl; an
export has already left them out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from katdata.errors import InputError, KatdataError, require
from katdata.run_folder import RunFolder
from katdata.template import parse

log = logging.getLogger(__name__)


def _jsonish(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _source(cfg_data: Optional[str], run_dir: Path) -> Path:
    if cfg_data:
        return Path(cfg_data)
    folder = RunFolder(run_dir)
    return folder.export if folder.export.is_dir() else folder.records


def _split_data(data: Optional[str], run_dir: Path) -> Optional[str]:
    """split.json's data path, found wherever the run folder now is: relative to the run folder (how
    train writes it), else as written; a run folder moved or used from another working directory
    whose data was its own export/ or records.jsonl reads them from where it is now."""
    if not data or Path(data).is_absolute() and Path(data).exists():
        return data
    if (run_dir / data).exists():
        return str(run_dir / data)
    if not Path(data).exists() and Path(data).name == _source(None, run_dir).name:
        return None  # the run's own default source
    return data


def _split_record(src: Path, run_dir: Path) -> str:
    """The data path as split.json records it: relative to the run folder when inside it."""
    src_abs, run_abs = src.resolve(), run_dir.resolve()
    return src_abs.relative_to(run_abs).as_posix() if src_abs.is_relative_to(run_abs) else str(src)


def split_rows(run_dir: Path, part: str, needed_by: str) -> list[dict]:
    """The rows train/split.json lists under ``part`` ("train" or "heldout"), read from the same data as
    training; ``needed_by`` says in the error who needs them."""
    return split_parts(run_dir, (part,), needed_by)[part]


def split_parts(run_dir: Path, parts: tuple[str, ...], needed_by: str) -> dict[str, list[dict]]:
    """`split_rows` of each of ``parts``, the data read once for them all."""
    path = RunFolder(run_dir).split
    if not path.is_file():
        raise KatdataError(f"{path} not found: run `katdata train` first ({needed_by})")
    from katdata.preflight import read_split

    split = read_split(path)  # an empty, cut-short or foreign split.json is one line naming it
    rows, test = load_examples(_split_data(split.get("data"), Path(run_dir)), Path(run_dir))
    out = {}
    for part in parts:
        wanted = set(split[part])
        out[part] = [r for r in rows + (test or []) if r["id"] in wanted]
        if not out[part]:
            raise KatdataError(f"{path}: none of the {part} ids is in {split.get('data') or 'the run folder'}")
    return out


def load_examples(data: Optional[str], run_dir: Path, hold=None) -> tuple[list[dict], Optional[list[dict]]]:
    """(rows, held-out rows or None) as {id, messages, mode, tags, vote, reference, kind, query}.

    A Hub dataset folder with ``data/train-*`` and ``data/test-*`` parquet files gives both (the
    export's own stratified split); a single set of files, or a records.jsonl, gives held-out None.
    """
    src = _source(data, run_dir)
    if not src.is_dir():
        from katdata.records import KatRecord
        from katdata.runfiles import read_rows

        from katdata.review_routing import WAIT_HINT, waiting

        held = waiting(run_dir, src, hold)  # records that wait for review (hold: review_routing.hold_policy)
        if held:
            log.warning("%d records wait for review and are not trained on (%s)", len(held), WAIT_HINT)
        rows = [_check({**r.model_dump(), "messages": r.messages()}, src, n)
                for n, r in enumerate(read_rows(src, KatRecord), 1) if r.id not in held]
        if not rows:
            raise InputError(src, "no training rows")
        return rows, None
    pq = require("pyarrow.parquet", "local")
    root = src / "data" if (src / "data").is_dir() else src
    parts = {"train": sorted(root.glob("train-*.parquet")) + sorted(root.glob("train/*.parquet")),
             "test": sorted(root.glob("test-*.parquet")) + sorted(root.glob("test/*.parquet"))}
    if not parts["train"]:
        parts = {"train": sorted(root.glob("*.parquet")), "test": []}
    if not parts["train"]:
        raise InputError(src, "no parquet files in the dataset folder")
    out = {}
    for name, files in parts.items():
        out[name] = [_check(row, path, n) for path in files for n, row in enumerate(pq.read_table(path).to_pylist(), 1)]
    if not out["train"]:
        raise InputError(src, "no training rows")
    return out["train"], (out["test"] if parts["test"] else None)


def _plain(struct: Any) -> dict:
    """A tags/vote value as a dict: JSON text, or the export's typed struct (nulls dropped, `extra` JSON folded in)."""
    struct = _jsonish(struct) or {}
    out = {k: v for k, v in struct.items() if k != "extra" and v is not None}
    return out | (json.loads(struct["extra"]) if isinstance(struct.get("extra"), str) else {})


def _check(row: dict, path: Path, line: int) -> dict:
    from katdata.records import stable_id

    row = {**row, "tags": _plain(row.get("tags")), "vote": _plain(row.get("vote"))}
    msgs = _jsonish(row.get("messages"))
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
        raise InputError(path, "needs a chat ending in an assistant message", line=line, field="messages")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    parsed = parse(msgs[-1]["content"])
    if not msgs[-1]["content"].startswith("<judge>\n") or not parsed.ok:
        why = ", ".join(parsed.errors) or "no leading <judge>"
        raise InputError(path, f"the assistant message is not a valid KAT response ({why})", line=line, field="messages")
    user = next((m["content"] for m in msgs if m["role"] == "user"), "")
    return {"id": row.get("id") or stable_id(user), "messages": msgs, "mode": parsed.mode,
            "tags": row["tags"], "vote": row["vote"],
            "reference": row.get("reference"), "kind": row.get("kind"), "query": user}


def split(rows: list[dict], holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): per mode, the ids with the smallest seeded hash, in proportion to the mode's share."""
    def key(r):
        return hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest()

    held: list[dict] = []
    for mode in ("on", "off"):
        group = sorted((r for r in rows if r["mode"] == mode), key=key)
        held += group[: round(holdout * len(group) / len(rows))]
    ids = {r["id"] for r in held}
    return [r for r in rows if r["id"] not in ids], held


def balance(rows: list[dict], encs: list[dict]) -> tuple[list[dict], list[dict], int]:
    """Both modes equally often: the rarer mode's examples repeated in turn (the trainer shuffles)."""
    by_mode = {m: [i for i, r in enumerate(rows) if r["mode"] == m] for m in ("on", "off")}
    if not all(by_mode.values()):
        return rows, encs, 0
    most = max(len(v) for v in by_mode.values())
    extra = [idx[k % len(idx)] for idx in by_mode.values() for k in range(most - len(idx))]
    return rows + [rows[i] for i in extra], encs + [encs[i] for i in extra], len(extra)
