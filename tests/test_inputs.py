"""Query input in every format, and bad input named by file, line and field."""

import json

import pytest

from katdata.errors import InputError
from katdata.inputs import FieldMap, read_queries
from katdata.records import stable_id

ROWS = [{"id": "a", "query": "What is 2+2?", "reference": "4", "kind": "numeric", "topic": None},
        {"query": "Capital of France?", "reference": "Paris", "kind": "exact", "topic": "geo"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def test_jsonl_csv_parquet_and_saved_dataset_agree(tmp_path):
    import pandas as pd
    import datasets
    paths = [write_jsonl(tmp_path / "q.jsonl", ROWS)]
    df = pd.DataFrame(ROWS)
    df.to_csv(tmp_path / "q.csv", index=False)
    df.to_parquet(tmp_path / "q.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    paths += [tmp_path / "q.csv", tmp_path / "q.parquet", tmp_path / "saved"]
    for path in paths:
        qs = read_queries(path)
        assert [q.query for q in qs] == [r["query"] for r in ROWS], path
        assert qs[0].id == "a" and qs[0].reference == "4" and qs[0].kind == "numeric"
        assert qs[1].id == stable_id("Capital of France?")  # missing id: a stable hash of the text
        assert qs[1].meta.get("topic") == "geo"


def test_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"qid": 7, "question": "Why?", "gold": "Because"}])
    q = read_queries(path, FieldMap(id="qid", query="question", reference="gold"))[0]
    assert (q.id, q.query, q.reference) == ("7", "Why?", "Because")


@pytest.mark.parametrize("content, line, field, msg", [
    (b'{"query": "ok"}\n{"query": "broken"\n', 2, None, "broken JSON"),
    (b'{"query": "ok"}\n\n{"text": "no query"}\n', 3, "query", "missing required field"),
    (b'{"query": "   "}\n', 1, "query", "empty"),
    (b'{"query": "ok"}\n{"query": "caf\xe9"}\n', 2, None, "not UTF-8"),
    (b'{"query": "ok", "kind": "poetry"}\n', 1, "kind", "unknown kind"),
    (b'{"id": "x", "query": "a"}\n{"id": "x", "query": "b"}\n', 2, "id", "duplicate id"),
    (b'["a list"]\n', 1, None, "expected an object"),
])
def test_bad_jsonl_names_file_line_field(tmp_path, content, line, field, msg):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=msg) as info:
        read_queries(path)
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert str(path) in str(err) and f":{line}" in str(err)


def test_bad_csv_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,query\n1,fine\n2,\n", "utf-8")
    with pytest.raises(InputError, match=r"bad.csv:3 field 'query'"):
        read_queries(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_queries(tmp_path / "nope.jsonl")
    (tmp_path / "q.xml").write_text("<q/>")
    with pytest.raises(InputError, match="unknown input format"):
        read_queries(tmp_path / "q.xml")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no queries"):
        read_queries(tmp_path / "empty.jsonl")


def test_packaged_real_data():
    from katdata import sources

    gsm = sources.load("gsm8k")
    assert len(gsm) == 1319 and gsm[0].reference == "18" and gsm[0].kind == "numeric"
    hops = sources.load("fanoutqa-hop", limit=5, seed=1)
    assert len(hops) == 5 and all(h.kind == "exact" and h.reference for h in hops)
    assert [h.id for h in hops] == [h.id for h in sources.load("fanoutqa-hop", limit=5, seed=1)]
    he = sources.load("humaneval")
    assert len(he) == 164 and "check(" in he[0].reference


def test_csv_with_bom_keeps_ids_and_tsv_uses_tabs(tmp_path):
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffid,query,reference\nq1,Two plus two?,4\n".encode("utf-8"))
    assert [(q.id, q.reference) for q in read_queries(bom)] == [("q1", "4")]
    tsv = tmp_path / "q.tsv"
    tsv.write_text("id\tquery\nt1\tHello, world?\n", "utf-8")
    assert [(q.id, q.query) for q in read_queries(tsv)] == [("t1", "Hello, world?")]


@pytest.mark.parametrize("content, msg", [
    ('id,query\na,"open quote\nb,fine\n', "not valid CSV"),
    ("id,query\n", "only a header line (id, query), no rows (delimiter ',')"),
    ("id;query\na;hi\n", "header (id;query) has no column 'query' (delimiter ','); the header looks delimited by ';'"),
    ("", "empty file"),
])
def test_bad_csv_says_what_it_found(tmp_path, content, msg):
    path = tmp_path / "bad.csv"
    path.write_text(content, "utf-8")
    with pytest.raises(InputError) as info:
        read_queries(path)
    assert msg in str(info.value)


@pytest.mark.parametrize("row, field", [
    ({"id": True, "query": "q"}, "id"), ({"id": [1], "query": "q"}, "id"), ({"id": {"a": 1}, "query": "q"}, "id"),
    ({"query": "q", "reference": False}, "reference"), ({"query": "q", "reference": ["4"]}, "reference"),
    ({"query": "q", "reference": float("nan")}, "reference"), ({"query": "q", "system": 5}, "system"),
    ({"query": "q", "kind": ["math"]}, "kind"),
])
def test_ids_and_references_are_strings_or_numbers(tmp_path, row, field):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(row) + "\n", "utf-8")
    with pytest.raises(InputError) as info:
        read_queries(path)
    assert (info.value.line, info.value.field) == (1, field)


def test_numbers_are_fine_as_ids_and_references(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": 3, "query": "q", "reference": 2.5}])
    assert [(q.id, q.reference) for q in read_queries(path)] == [("3", "2.5")]


def test_line_separators_inside_json_strings(tmp_path):
    text = "one\u2028two\u2029three\u0085four"
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "query": text}, ensure_ascii=False) + "\n"
                    + json.dumps({"id": "b", "query": "next"}) + "\n", "utf-8")
    assert [q.query for q in read_queries(path)] == [text, "next"]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"id": "x", "query": "one"}, {"id": "y", "query": "two"}], indent=2), "utf-8")
    assert [q.id for q in read_queries(arr)] == ["x", "y"]
    lines = write_jsonl(tmp_path / "l.json", ROWS)
    assert len(read_queries(lines)) == 2
    bad = tmp_path / "b.json"
    bad.write_text('[\n  {"query": "a"},\n  {"query": 5}\n]\n', "utf-8")
    with pytest.raises(InputError, match=r"b.json:3 field 'query'"):
        read_queries(bad)
    pretty = tmp_path / "p.json"
    pretty.write_text('{\n  "query": "a"\n}\n', "utf-8")
    with pytest.raises(InputError, match="JSON Lines"):
        read_queries(pretty)


def test_broken_saved_dataset_is_an_input_error(tmp_path):
    import datasets  # noqa: F401
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{broken", "utf-8")
    with pytest.raises(InputError, match="not a readable saved dataset"):
        read_queries(folder)
