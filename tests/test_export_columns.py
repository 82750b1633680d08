"""Issue 29's faster export parts, each checked against the plain way it replaces."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from katdata import card, card_stats, export, export_arrow, export_columns, export_spans
from katdata.records import KatRecord
from katdata.template import render
from test_export import hf_row, make_records, make_run

ODD = [None, 0.1, 1e-05, 1e16, 123456789012345678.0, -0.0, float("nan"), float("inf"), 2**70, -2**63, True,
       "ä 😀 \u2028 \x00\x1f \"q\" \\", {"k": [1, 2.5, {"x": None}]}, [], {}, {"dup": 1, "e": 5e-324}]


def test_dumps_many_is_card_dumps_value_by_value():
    assert export_columns.dumps_many(ODD) == [None if v is None else card.dumps(v).encode() for v in ODD]
    lone = ["ok", "\ud800"]  # what pydantic-core cannot serialize: value by value, with card.dumps' own error
    with pytest.raises(Exception) as many:
        export_columns.dumps_many(lone)
    with pytest.raises(Exception) as one:
        card.dumps("\ud800")
    assert type(many.value) is type(one.value)


def test_batch_columns_match_the_row_wise_layout():
    """Mixed system prompts (some empty), odd tags/vote/provenance: the columns are the row-wise reference's."""
    recs = make_records()
    recs[1] = recs[1].model_copy(update={"system": "be brief"})
    recs[2] = recs[2].model_copy(update={"system": ""})
    for batch in (recs, recs[:1], [r.model_copy(update={"system": None}) for r in recs]):
        b = export_columns.Batch()
        b.extend(batch, [])
        assert b.table(card.features("hf").arrow_schema).to_pylist() == [hf_row(r) for r in batch]


def test_key_columns_spell_strata_as_line_by_line():
    rows = [b'{"id": "a", "mode": "on", "tags": {"domain": "math"}}', b'{"id": "b", "mode": "off", "tags": {}}',
            b'{"id": 3, "mode": "on", "tags": {"domain": 7}}', b'{"id": "c", "mode": "on", "tags": {"domain": "7"}}']
    odd = [b'{"id": "d", "mode": "on", "tags": null}', b'{"id": "e", "mode": "on", "tags": {"domain": [1]}}']
    for lines in (rows, rows + odd[:1], rows + odd[1:]):
        block = b"\n".join(lines) + b"\n"
        ids, strata = export_arrow.key_columns(Path("r.jsonl"), 1, block, lines)
        keys = [export_arrow._KEYS.decode(x) for x in lines]
        assert ids == [k.id for k in keys] and strata == [export_arrow._key_stratum(k) for k in keys]


@pytest.mark.parametrize("raw", [b"plain", "é 😀".encode(), b"\xff", "é".encode()[:1], b"\xed\xa0\x80", b"ok\xc3",
                                 b"\xf4\x90\x80\x80", b"\xc0\xaf"])
def test_utf8_check_is_python_decoders(raw):
    try:
        raw.decode("utf-8")
        ok = True
    except UnicodeDecodeError:
        ok = False
    assert export_arrow._utf8(b"x" * 100 + raw) is ok


def test_card_counters_do_not_depend_on_how_rows_are_grouped(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", make_records())
    digests = []
    for rows in (1, 10**9):  # a grouping per row group, one for the whole export
        monkeypatch.setattr(card_stats, "GROUP_ROWS", rows)
        out = tmp_path / f"out-{rows}"
        export.run(export.ExportConfig(out=out, plot=False, batch_rows=7), run)
        digests.append(hashlib.sha256((out / "README.md").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_strata_of_decoded_records_match_the_scan(tmp_path):
    recs = [KatRecord(id=f"r{i}", query="q", mode=m, judge="j", answer="a",
                      response=render(m, "j", "a", "t" if m == "on" else None), tags=t) for i, (m, t) in enumerate([("on", {"domain": "math"}), ("off", {}),
                                                          ("on", {"domain": None}), ("off", {"domain": 4})])]
    assert export_spans._strata(recs) == ["on|math", "off|unknown", "on|unknown", "off|4"]
    recs.append(recs[0].model_copy(update={"tags": {"domain": ["x"]}}))  # unhashable: spelled row by row
    assert export_spans._strata(recs)[-1] == "on|['x']"


def test_record_writer_keeps_the_rows_before_one_it_cannot_write(tmp_path):
    from katdata.assemble_rows import RecordWriter, slow_line

    good = make_records()[:2]
    w = RecordWriter(tmp_path / "r.jsonl", every=10)
    for row in [*good, {"id": "bad", "raw": object()}]:
        w.write(row)
    with pytest.raises(TypeError):
        w.close()
    assert (tmp_path / "r.jsonl").read_bytes() == b"".join(slow_line(r) + b"\n" for r in good)
