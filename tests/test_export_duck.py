"""Export of a records file katdata wrote: DuckDB's column-wise reader gives the bytes the Python reader gives, and
the file goes the Python way whenever the two could differ (katdata.export_duck, katdata.written)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from katdata import export, export_duck, export_spans, written
from katdata.assemble_rows import RecordWriter
from katdata.errors import InputError
from katdata.records import Change
from test_export import make_records, make_run
from test_export_spans import _files

pytest.importorskip("duckdb")


@pytest.fixture(autouse=True)
def small_files_too(monkeypatch):
    monkeypatch.setattr(export_duck, "MIN_BYTES", 0)  # these runs are small: read them with DuckDB all the same


def _fitting() -> list:
    """make_records' records that DuckDB reads as the Python reader does, and the variety a real run holds."""
    out = []
    for i, r in enumerate(make_records()):
        if r.changes or isinstance(r.tags.get("p_reasoning"), str) or r.vote["samples_saved"] != 0:
            continue  # values that fit no typed column, reviewer changes: see test_what_duckdb_would_read_otherwise
        upd: dict = {}
        if i % 9 == 2:  # flagged for review; some answered by a reviewer
            upd["vote"] = dict(r.vote, review=True)
        if i % 18 == 2:
            upd["provenance"] = dict(r.provenance, review={"answer": "ok"})
        if i % 7 == 3:  # extras as the assemble stage writes them: floats pydantic spells otherwise, escapes, big ints
            upd["vote"] = dict(upd.get("vote", r.vote), id=r.id, classes_off={"a\\b \"q\" \x7f é\n": 2},
                               entropy_on=1e-05)
            upd["provenance"] = dict(upd.get("provenance", r.provenance), attempt_index=0, correct=True,
                                     completion_tokens=2**70, tokens=1e-7, big=1e16, review=False)
            upd["tags"] = dict(r.tags, id=r.id, rule={"x": [1.5, None, "\u2028 \U0001F600 \u00e9"], "y": {}},
                               p_reasoning=2)
        if i % 5 == 1:  # extras DuckDB spells itself (nothing to re-spell): non-ASCII, a line separator, "/", nesting
            upd["tags"] = dict(r.tags, note="é \U0001F600 \u2028 a/b", deep={"k": [True, None, {}, []]})
        if i % 11 == 4:
            upd["tags"] = {}
        if i % 13 == 5:
            upd["provenance"] = {"models": {"solver": "m"}}  # no source
        if i % 13 == 6:
            upd["provenance"] = {"source": "s", "note": None}  # no models
        out.append(r.model_copy(update=upd))
    return out


def _stamped(path: Path, records: list) -> Path:
    make_run(path, make_records())  # the run's other files
    (path / "records.jsonl").unlink()
    with RecordWriter(path / "records.jsonl", every=7) as w:
        for r in records:
            w.write(r)
    assert written.unchanged(path / "records.jsonl")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _stamped(tmp_path_factory.mktemp("duck") / "run", _fitting())


def _export(run: Path, out: Path, monkeypatch, duckdb: bool, **kw) -> tuple[dict, bool]:
    """export.run with or without DuckDB's reader; and whether DuckDB's tables were written (the Python reader's
    pass 2 never ran)."""
    monkeypatch.setenv("KATDATA_EXPORT_DUCKDB", "1" if duckdb else "0")
    python = []
    real = export_spans.Reader.map

    def map_(self, fn, *a, **k):
        python.append(fn is export_spans.table_span)
        return real(self, fn, *a, **k)

    monkeypatch.setattr(export_spans.Reader, "map", map_)
    stats = export.run(export.ExportConfig(out=out, plot=False, **kw), run)
    return {k: v for k, v in stats.items() if k != "out"}, not any(python)


@pytest.mark.parametrize("kw", [{}, {"format": "trl", "batch_rows": 7}, {"format": "llamafactory", "batch_rows": 3},
                                {"require_review": False, "batch_rows": 5, "shard_rows": 11}])
def test_duckdb_writes_the_bytes_the_python_reader_writes(run, tmp_path, monkeypatch, kw):
    a, used = _export(run, tmp_path / "duck", monkeypatch, True, **kw)
    b, python_used = _export(run, tmp_path / "py", monkeypatch, False, **kw)
    assert used and not python_used
    assert a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")
    assert a["held_back" if kw.get("require_review", True) else "unreviewed_included"] > 0


def test_blocking_review_rules_hold_back_the_same_records(run, tmp_path, monkeypatch):
    from katdata import review_routing

    policy = review_routing.ReviewConfig(blocking=["low_margin"])
    outs = []
    for duck in (True, False):
        monkeypatch.setenv("KATDATA_EXPORT_DUCKDB", "1" if duck else "0")
        out = tmp_path / str(duck)
        outs.append(export.run(export.ExportConfig(out=out, plot=False), run, review=policy)["held_back"])
    assert outs[0] == outs[1] and _files(tmp_path / "True") == _files(tmp_path / "False")


@pytest.mark.parametrize("odd", ["misfit tag", "misfit vote", "changes", "source", "models", "big int float",
                                 "int out of int32"])
def test_what_duckdb_would_read_otherwise_goes_the_python_way(tmp_path, monkeypatch, odd):
    recs = _fitting()
    r = recs[5]
    upd = {"misfit tag": {"tags": dict(r.tags, difficulty="3")},
           "misfit vote": {"vote": dict(r.vote, review=1)},
           "changes": {"changes": [Change(field="answer", old="?", new={"a": [1]}, annotator="x")]},
           "source": {"provenance": {"source": None, "models": {"a": "b"}}},
           "models": {"provenance": {"source": "s", "models": {"a": 1}}},
           "big int float": {"vote": dict(r.vote, p_on=2**60)},
           "int out of int32": {"vote": dict(r.vote, n_on=2**31)}}[odd]
    recs[5] = r.model_copy(update=upd)
    path = _stamped(tmp_path / "run", recs)
    a, used = _export(path, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(path, tmp_path / "py", monkeypatch, False)
    assert not used
    assert a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_a_key_that_only_looks_odd_is_read_by_duckdb(tmp_path, monkeypatch):
    """An answer class named like a typed key, with a value that would not fit it: looked at exactly, still fits."""
    recs = _fitting()
    recs[3] = recs[3].model_copy(update={"vote": dict(recs[3].vote, classes_on={"n_on": 3, "review": 1})})
    path = _stamped(tmp_path / "run", recs)
    a, used = _export(path, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(path, tmp_path / "py", monkeypatch, False)
    assert used and a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_the_stamp_holds_only_while_the_file_is_as_written(tmp_path):
    recs = _fitting()[:5]
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for r in recs[:3]:
            w.write(r)
    assert written.unchanged(path)
    with RecordWriter(path) as w:  # a resumed run appends to its own file
        w.write(recs[3])
    assert written.unchanged(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same times set back: the change time moved on
    assert not written.unchanged(path)


@pytest.mark.parametrize("how", ["edit", "append", "copy", "dict row", "unstamped before", "interrupted"])
def test_a_file_not_as_katdata_wrote_it_has_no_stamp(tmp_path, how):
    recs = _fitting()[:4]
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for r in recs:
            w.write(r)
    if how == "edit":
        text = path.read_bytes()
        time.sleep(0.01)
        path.write_bytes(text.replace(b'"mode": "on"', b'"mode": "off"', 1))
    elif how == "append":
        with open(path, "ab") as f:
            f.write(path.read_bytes().splitlines(keepends=True)[0])
    elif how == "copy":
        other = tmp_path / "other" / "records.jsonl"
        other.parent.mkdir()
        shutil.copy2(path, other)
        shutil.copy2(written.stamp_path(path), written.stamp_path(other))
        path = other
    elif how == "dict row":
        with RecordWriter(path) as w:
            w.write(recs[0].model_dump(mode="json"))
    elif how == "unstamped before":
        written.forget(path)
        with RecordWriter(path) as w:
            w.write(recs[0])
    elif how == "interrupted":
        with pytest.raises(RuntimeError):
            with RecordWriter(path) as w:
                w.write(recs[0])
                raise RuntimeError("killed")
        w._f.closed or w._f.close()
        assert written.unchanged(path)  # what it had written when it was stopped is whole rows
        w = RecordWriter(path)
        w.write(recs[1])
        w.flush()  # stopped without close (a crash): no stamp
        w._f.close()
    assert not written.unchanged(path)


def test_an_edited_file_is_checked_line_by_line_again(run, tmp_path, monkeypatch):
    path = tmp_path / "run"
    shutil.copytree(run, path)
    lines = (path / "records.jsonl").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b'"mode": ', b'"mood": ', 1)
    (path / "records.jsonl").write_bytes(b"".join(lines))
    monkeypatch.setenv("KATDATA_EXPORT_DUCKDB", "1")
    with pytest.raises(InputError, match=r"records.jsonl:7"):
        export.run(export.ExportConfig(out=tmp_path / "out", plot=False), path)
    assert not (tmp_path / "out").exists()


def test_without_duckdb_the_python_reader_reads_it(run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "duckdb", None)  # as if not installed
    monkeypatch.delenv("KATDATA_EXPORT_DUCKDB", raising=False)
    assert written.unchanged(run / "records.jsonl") and not export_duck.available(run / "records.jsonl")
    a = export.run(export.ExportConfig(out=tmp_path / "a", plot=False), run)
    assert a["rows_out"] + a["held_back"] == len(_fitting())


def test_counts_from_a_first_read_where_the_writer_counted_nothing(run, tmp_path, monkeypatch):
    path = tmp_path / "run"
    shutil.copytree(run, path)
    written.stamp(path / "records.jsonl")  # a stamp without the writer's counts
    assert written.unchanged(path / "records.jsonl") and written.counted(path / "records.jsonl") is None
    a, used = _export(path, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(path, tmp_path / "py", monkeypatch, False)
    assert used and a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_a_held_back_id_shared_by_another_record_is_counted_again_in_python(tmp_path, monkeypatch):
    """The writer counts the flagged records; a record that only shares a flagged id is held back too, which its
    counts miss: the split's own bookkeeping sees it, and the file is read in Python."""
    recs = _fitting()
    flagged = next(r for r in recs if r.vote.get("review") is True and not isinstance(r.provenance.get("review"), dict))
    twin = next(r for r in recs if r.vote.get("review") is not True).model_copy(update={"id": flagged.id})
    path = _stamped(tmp_path / "run", recs + [twin])
    a, used = _export(path, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(path, tmp_path / "py", monkeypatch, False)
    assert not used and a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_a_small_file_is_read_in_python(run, monkeypatch):
    monkeypatch.setattr(export_duck, "MIN_BYTES", (run / "records.jsonl").stat().st_size + 1)
    monkeypatch.delenv("KATDATA_EXPORT_DUCKDB", raising=False)
    assert not export_duck.available(run / "records.jsonl")


@pytest.mark.parametrize("when", ["first read", "second read"])
def test_what_duckdb_cannot_read_is_read_in_python(run, tmp_path, monkeypatch, when):
    """A DuckDB read error (here: no such file) in the first read (counts and flags, where the writer's counts are
    missing) or in the second (the tables): export reads the file in Python."""
    real = export_duck._source
    monkeypatch.setattr(export_duck, "_source", lambda path, skip: real(Path(f"{path}.gone"), skip))
    if when == "first read":
        monkeypatch.setattr(written, "counted", lambda path: None)
    a, used = _export(run, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(run, tmp_path / "py", monkeypatch, False)
    assert not used and a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_a_line_longer_than_duckdbs_default_object_size_reads_the_same(tmp_path, monkeypatch):
    recs = _fitting()[:20]
    recs[7] = recs[7].model_copy(update={"reference": "x" * (17 << 20)})  # read_json's maximum_object_size: 16 MB
    path = _stamped(tmp_path / "run", recs)
    a, _ = _export(path, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(path, tmp_path / "py", monkeypatch, False)
    assert a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")


def test_a_path_duckdb_would_take_for_a_glob_is_read_in_python(run, tmp_path, monkeypatch):
    path = tmp_path / "run[1]*"
    shutil.copytree(run, path)
    written.stamp(path / "records.jsonl", written.counted(run / "records.jsonl"))  # a copy: stamp it again
    assert written.unchanged(path / "records.jsonl") and not export_duck.available(path / "records.jsonl")


def _one_extra_each(i: int, r):
    """A record whose tags hold no key without a column, whose vote holds one (or none), and whose provenance holds
    one with a name a JSON path would have to quote."""
    typed = {k: v for k, v in r.tags.items() if k in ("domain", "task_type", "difficulty", "language")}
    values = [{"a": [1e-05, None, "x"]}, None, "é \U0001F600 \\ \"q\" \u2028", 1.5e-7, 2**70, [], {}, 3]
    vote = {k: v for k, v in r.vote.items() if k in ("label", "p_on", "p_off", "n_on")}
    if i % 9:  # some votes lack it
        vote["classes_on"] = values[i % len(values)]
    prov = {"source": "s", "models": {"solver": "m", "judge": "j" if i % 2 else "m"}, 'a/b~"c.d é': i}
    return r.model_copy(update={"tags": typed, "vote": vote, "provenance": prov, "changes": []})


def test_the_writer_lists_the_keys_and_duckdb_looks_only_for_those(tmp_path, monkeypatch):
    """The stamp lists the keys of tags, vote and provenance; where an object holds no key without a column, or one,
    DuckDB reads its extra without the JSON merge, and both readers still write the same bytes."""
    recs = [_one_extra_each(i, r) for i, r in enumerate(make_records())]
    run = _stamped(tmp_path / "run", recs)
    keys = written.keys(written.counted(run / "records.jsonl"))
    assert keys == {"tags": ["difficulty", "domain", "language", "task_type"],
                    "vote": ["classes_on", "label", "n_on", "p_off", "p_on"], "provenance": ['a/b~"c.d é', "models", "source"]}
    sql = []
    real = export_duck.Reader._run
    monkeypatch.setattr(export_duck.Reader, "_run", lambda self, q, *a: sql.append(q) or real(self, q, *a))
    a, used = _export(run, tmp_path / "duck", monkeypatch, True)
    b, _ = _export(run, tmp_path / "py", monkeypatch, False)
    assert used and a == b and _files(tmp_path / "duck") == _files(tmp_path / "py")
    assert "json_merge_patch" not in sql[-1] and "'{}' AS tags_extra" in sql[-1]


def test_the_keys_add_up_over_a_resumed_file_and_are_left_out_past_the_cap(tmp_path, monkeypatch):
    from katdata import assemble_rows

    recs = _fitting()[:6]
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write(recs[0].model_copy(update={"tags": {"domain": "math"}}))
    with RecordWriter(path) as w:  # resumed: the keys of both
        w.write(recs[1].model_copy(update={"tags": {"language": "en"}}))
    assert written.keys(written.counted(path))["tags"] == ["domain", "language"]
    monkeypatch.setattr(assemble_rows, "MAX_KEYS", 2)
    with RecordWriter(path) as w:
        w.write(recs[2].model_copy(update={"tags": {"difficulty": 2}}))
    facts = written.counted(path)
    assert written.keys(facts) is None and sum(facts["strata"].values()) == 3  # the counts still there
    monkeypatch.setattr(assemble_rows, "MAX_KEYS", 64)
    with RecordWriter(path) as w:  # a file whose earlier keys were not listed: none listed after it either
        w.write(recs[3])
    assert written.counted(path) is not None and written.keys(written.counted(path)) is None

