"""Run-folder files: the row index finds rows by key without holding them, and names broken rows."""

import json

import pytest

from katdata.errors import InputError
from katdata.records import Attempt, Query
from katdata.runfiles import RowIndex


def test_rows_by_key_in_file_order_read_back_from_the_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [Attempt(id=q, mode=m, index=i, text=f"{q}{m}{i}") for q, m, i in
            [("a", "on", 0), ("b", "off", 0), ("a", "off", 0), ("a", "on", 1)]]
    path.write_text("".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in rows))
    index = RowIndex(path, Attempt)
    assert len(index) == 2 and "a" in index and "c" not in index
    assert [r.text for r in index.get("a")] == ["aon0", "aoff0", "aon1"]
    assert index.one("b") == rows[1] and index.one("c") is None and index.get("c", []) == []
    index.close()
    assert len(RowIndex(tmp_path / "missing.jsonl", Attempt)) == 0  # a stage not yet started: nothing to resume


def test_a_broken_row_is_named_when_the_index_is_built(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"id": "a", "query": "x"}\n\n{"id": "b"}\n')
    with pytest.raises(InputError) as err:
        RowIndex(path, Query)
    assert str(err.value).startswith(f"{path}:3 field 'query'")
    path.write_text('{"id": "a", "query": "x"}\n{"id": "b", "query": \n')
    with pytest.raises(InputError, match=r":2: broken JSON"):
        RowIndex(path, Query)


def test_a_torn_tail_is_cut_back_to_the_last_whole_line(tmp_path):
    """After kill -9 mid-write: the torn line goes, whole lines stay, even when the torn part is longer than
    the block the repair reads back at a time; a file of only a torn line is emptied."""
    from katdata.runfiles import repair_tail

    path = tmp_path / "rows.jsonl"
    whole = '{"id": "a"}\n{"id": "b"}\n'
    for torn in ['{"id": "c"', '{"id": "c", "text": "' + "x" * 200_000]:
        path.write_text(whole + torn)
        repair_tail(path)
        assert path.read_text() == whole
    repair_tail(path)  # nothing torn: unchanged
    assert path.read_text() == whole
    path.write_text("x" * 70_000)
    repair_tail(path)
    assert path.read_text() == ""
