"""Export read span by span in worker processes: the same bytes, the same errors, as read in one process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from katdata import export, export_arrow, export_spans
from katdata.errors import InputError
from katdata.records import Change
from katdata.runfiles import RowWriter
from test_export import make_records, make_run


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".katdata-export.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    recs = make_records()
    odd = []
    for i, r in enumerate(recs):  # flagged for review, answered, odd provenance and changes, as real runs hold
        upd = {}
        if i % 9 == 2:
            upd["vote"] = dict(r.vote, review=True)
        if i % 18 == 2:
            upd["provenance"] = dict(r.provenance, review={"answer": "ok"})
        if i % 13 == 6:
            upd["provenance"] = {"source": 3, "models": {"a": 1}, "x": [1, "é"]}
        if i % 17 == 8:
            upd["changes"] = [Change(field="think", old=None, new={"a": [1, 2]})]
        odd.append(r.model_copy(update=upd))
    path = make_run(tmp_path_factory.mktemp("spans") / "run", recs)
    (path / "records.jsonl").unlink()
    with RowWriter(path / "records.jsonl") as w:
        w.write_all(odd)
    with open(path / "records.jsonl", "a") as f:  # a blank line, a line NaN (msgspec refuses it, pydantic not)
        f.write("\n  \n" + json.dumps(odd[5].model_dump(mode="json") | {"id": "nan"})[:-1] + ', "tags": {"x": NaN}}\n')
    return path


def _export(run: Path, out: Path, monkeypatch, workers: int, **kw) -> dict:
    monkeypatch.setattr(export_spans, "BLOCK", 4096)  # many spans
    monkeypatch.setattr(export_spans, "MIN_SPANS", 2)
    monkeypatch.setattr(export_spans, "MAX_WORKERS", workers)
    stats = export.run(export.ExportConfig(out=out, plot=False, **kw), run)
    return {k: v for k, v in stats.items() if k != "out"}


@pytest.mark.parametrize("kw", [{}, {"format": "trl", "batch_rows": 7}, {"require_review": False, "batch_rows": 5}])
def test_worker_processes_write_the_same_bytes(run, tmp_path, monkeypatch, kw):
    one = _export(run, tmp_path / "one", monkeypatch, 1, **kw)
    two = _export(run, tmp_path / "two", monkeypatch, 2, **kw)
    assert one == two and one["rows_out"] > 60
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert len(export_spans.spans(run / "records.jsonl", 4096)) > 10


def test_a_bad_line_in_a_later_span_is_named_with_its_line(run, tmp_path, monkeypatch):
    lines = (run / "records.jsonl").read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    for n, text, msg in ((len(lines) - 3, "{oops", "broken JSON"), (len(lines) - 5, '{"id": 1}', "field 'id'")):
        changed = lines[:n - 1] + [text] + lines[n:]
        (bad / "records.jsonl").write_text("\n".join(changed) + "\n")
        for workers in (1, 2):
            with pytest.raises(InputError, match=re.escape(f"records.jsonl:{n}") + ".*" + re.escape(msg)):
                _export(bad, tmp_path / f"out{workers}", monkeypatch, workers)


def test_spans_cut_at_line_ends(run):
    path = run / "records.jsonl"
    data = path.read_bytes()
    parts = export_spans.spans(path, 1000)
    assert parts[0][0] == 0 and sum(length for _, length in parts) == len(data)
    assert all(data[off + length - 1:off + length] == b"\n" for off, length in parts)
    assert export_spans.spans(path.parent / "missing.jsonl") == []


def test_the_hold_back_scan_finds_what_review_routing_finds(run):
    from katdata import review_routing

    src = run / "records.jsonl"
    assert export_arrow.flagged(src) == review_routing._flagged(src) != set()
    with export_spans.Reader(src, workers=1) as reader:
        assert set().union(*reader.map(export_spans.flag_span)) == review_routing._flagged(src)


def test_one_read_gives_the_hold_back_and_pass_one(run):
    """flag_count_span: the flagged ids of flag_span and the rows per stratum of count_span (nothing left out)."""
    src = run / "records.jsonl"
    with export_spans.Reader(src, workers=1) as reader:
        scans = list(reader.map(export_spans.flag_count_span))
        assert [s.flags for s in scans] == list(reader.map(export_spans.flag_span))
        assert [s.all for s in scans] == list(reader.map(export_spans.count_span, frozenset()))


def test_parquet_written_on_the_thread_is_written_inline_byte_for_byte(run, tmp_path, monkeypatch):
    from katdata import export_write

    threaded = _export(run, tmp_path / "thread", monkeypatch, 1, batch_rows=6, shard_rows=40)
    monkeypatch.setattr(export, "Background", lambda: export_write.Background(inline=True))
    inline = _export(run, tmp_path / "inline", monkeypatch, 1, batch_rows=6, shard_rows=40)
    assert threaded == inline and len(list((tmp_path / "inline" / "data").iterdir())) > 2
    assert _files(tmp_path / "thread") == _files(tmp_path / "inline")


def test_the_background_thread_keeps_order_and_raises_errors():
    from katdata import export_write

    done = []
    bg = export_write.Background()
    for i in range(20):
        bg.submit(lambda i=i: done.append(i))
    bg.close()
    assert done == list(range(20))
    bg = export_write.Background()
    bg.submit(lambda: 1 / 0)
    bg.submit(lambda: done.append("dropped after the error"))
    with pytest.raises(ZeroDivisionError):
        bg.close()
    assert done[-1] == 19
    bg.close()  # closed twice: nothing left to raise


def test_held_back_counts_from_the_scan_or_a_second_read(run, tmp_path, monkeypatch):
    """held_counts: pass 1's counts without the waiting ids, as a second read gives them; None (a second read)
    where a row shares a waiting id without being flagged in its own span."""
    monkeypatch.setattr(export_spans, "BLOCK", 4096)
    src = run / "records.jsonl"
    with export_spans.Reader(src, workers=1) as reader:
        scans = list(reader.map(export_spans.flag_count_span))
        waits = set().union(*(s.flags for s in scans))
        assert waits and export_spans.held_counts(scans, waits) == list(reader.map(export_spans.count_span, waits))
        assert export_spans.held_counts(scans, set()) == list(reader.map(export_spans.count_span, frozenset()))
    lines = src.read_text().splitlines()
    twin = next(x for x in lines if x.strip() and json.loads(x)["id"] in waits and '"review": true' in x)
    dup = tmp_path / "records.jsonl"  # the same id again, unflagged, in the last span
    dup.write_text("\n".join(lines + [twin.replace('"review": true', '"review": false')]) + "\n")
    with export_spans.Reader(dup, workers=1) as reader:
        scans = list(reader.map(export_spans.flag_count_span))
        assert set().union(*(s.flags for s in scans)) == waits
        assert export_spans.held_counts(scans, waits) is None


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_script_without_a_main_guard_exports_with_workers_and_runs_once(run, tmp_path, monkeypatch, how):
    """A user's script that calls export without `if __name__ == "__main__":` (or one piped to python): export's
    worker processes do not import it again (the standard library's spawn ran its top level in every worker, which
    then failed: BrokenProcessPool), and the script's own code runs once."""
    log, out = tmp_path / "ran.log", tmp_path / "out"
    script = "\n".join([
        "import logging, pathlib",
        f"with open({str(log)!r}, 'a') as f: f.write('ran\\n')",
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s')",
        "from katdata import export, export_spans",
        "export_spans.BLOCK, export_spans.MIN_SPANS, export_spans.MAX_WORKERS = 4096, 2, 2",
        f"stats = export.run(export.ExportConfig(out=pathlib.Path({str(out)!r}), plot=False), pathlib.Path({str(run)!r}))",
        "print('rows', stats['rows_out'])",
    ]) + "\n"
    (tmp_path / "script.py").write_text(script)
    cmd = [sys.executable, str(tmp_path / "script.py")] if how == "file" else [sys.executable, "-"]
    done = subprocess.run(cmd, input=script if how == "stdin" else None, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"in \d+ spans with 2 worker processes", done.stderr), done.stderr[-3000:]
    assert log.read_text() == "ran\n"
    one = _export(run, tmp_path / "one", monkeypatch, 1)  # in this process, no workers: the same rows and bytes
    assert re.search(r"^rows (\d+)$", done.stdout, re.M)[1] == str(one["rows_out"])
    assert _files(out) == _files(tmp_path / "one")


def _die(path: str, off: int, length: int):
    """A span function whose worker process dies (as one killed for memory does)."""
    os._exit(3)


def test_a_worker_that_dies_is_one_error_naming_the_way_round(run, monkeypatch):
    """A worker process killed mid-read (out of memory, a signal) is a KatdataError in one line that names the
    file and KATDATA_EXPORT_WORKERS=1, not a BrokenProcessPool traceback; the pool is gone after it."""
    from katdata.errors import KatdataError, describe

    monkeypatch.setattr(export_spans, "BLOCK", 4096)  # many spans: a pool, as for a large file
    monkeypatch.setattr(export_spans, "MIN_SPANS", 2)
    with pytest.raises(KatdataError) as info:
        with export_spans.Reader(run / "records.jsonl", workers=2) as reader:
            assert reader.pool is not None
            list(reader.map(_die))
    assert re.fullmatch(r"a worker process reading .*records\.jsonl stopped \(\w+: .*\); KATDATA_EXPORT_WORKERS=1 "
                        r"reads the file in this process instead", str(info.value))
    assert describe(info.value)[0] == 2 and "\n" not in str(info.value) and reader.pool is None
