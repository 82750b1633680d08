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
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
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
