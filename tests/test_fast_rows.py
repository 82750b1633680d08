"""katdata.fast_rows: each row model's msgspec mirror reads a line only where pydantic reads it, with the same values;
the row index and the readers built on it give the same rows, the same errors, and the chosen sample alone."""

import gc
import json
import os
from itertools import product

import msgspec
import pytest

from katdata import fast_rows
from katdata.errors import InputError
from katdata.judge import JudgeRow
from katdata.records import Attempt, Change, KatRecord, Query, Row, Segment, Tags, Vote
from katdata.runfiles import RowIndex, check_row, count_rows, dump, loads, parse_row, read_rows

SEG = {"role": "critic", "round": 1, "model": "m", "text": "ok"}
VALID = {
    Query: {"id": "q1", "query": "2+2?", "system": None, "reference": "4", "kind": "numeric", "source": "gsm8k",
            "meta": {"solution": "2+2=4 #### 4", "n": [1, 2.5, None, {"k": True}], "big": 10 ** 30}},
    Tags: {"id": "q1", "domain": "math", "task_type": "qa", "difficulty": 3, "needs_reasoning": True,
           "p_reasoning": 0.7, "p_llm": 0.5, "verifiability": "reference", "language": "en", "rule": {"x": 1}},
    Attempt: {"id": "q1", "index": 2, "source": "solver", "mode": "on", "text": "t", "think": "th", "answer": "4",
              "ok": True, "errors": ["e"], "correct": False, "score": 0.5, "completion_tokens": 9, "segments": [SEG]},
    Vote: {"id": "q1", "label": "on", "reason": "pass rates", "label_source": "vote", "n_on": 4, "p_on": 0.75,
           "classes_on": {"4": 3, "5": 1}, "chosen_index": 1, "chosen_source": "vote", "review": True},
    KatRecord: {"id": "q1", "query": "q", "mode": "off", "judge": "j", "answer": "4", "response": "r",
                "tags": {"domain": "math", "p": 1e-07}, "vote": {"label": "off"}, "provenance": {"source": "s"},
                "changes": [{"field": "answer", "old": "5", "new": "4", "annotator": "ann"}]},
    JudgeRow: {"id": "q1", "mode": "on", "rationale": "needs steps", "ok": True,
               "attempts": [{"raw": "x", "ok": True, "score": 0.5}]},
    Segment: SEG,
    Change: {"field": "mode", "old": {"a": [1]}, "new": None},
}
# the values each field is tried with: JSON pydantic reads otherwise (a float for an int, a string for a number, a
# number for a bool, out-of-range numbers), wrong types, bounds, and NaN / a lone surrogate (json.loads reads those)
TRIES = ["x", "", "on", "vote", 0, 1, 3, 6, -1, 2 ** 63, 10 ** 30, 0.5, 1.0, 1.5, 1e-05, True, False, None, [], ["a"],
         {}, {"k": 1}, "1", "0.5", "true"]
RAW_TRIES = [b"NaN", b"Infinity", b"1e400", b'"\\ud800"', b"-0.0", b"1E2"]


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _lines(model) -> list[bytes]:
    """The model's valid line, and one line per field and tried value (missing, each value, each raw JSON), and
    with an unknown key."""
    base = VALID[model]
    out = [json.dumps(base).encode(), json.dumps({**base, "extra_key": 1}).encode()]
    for field in model.model_fields:
        out.append(json.dumps({k: v for k, v in base.items() if k != field}).encode())
        out += [json.dumps({**base, field: v}).encode() for v in TRIES]
        for raw in RAW_TRIES:
            text = json.dumps({**base, field: "@@"}).encode()
            out.append(text.replace(b'"@@"', raw))
    return out


def test_every_row_model_has_a_mirror():
    """A row model the mirror could not translate would silently lose the fast path: every one has it."""
    models = {*_subclasses(Row), JudgeRow}
    assert models >= {Query, Tags, Attempt, Vote, KatRecord, Segment, Change}
    assert [m.__name__ for m in models if fast_rows.decoder(m) is None] == []


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_the_mirror_reads_only_what_pydantic_reads_with_the_same_values(model, tmp_path):
    fast = fast_rows.decoder(model)
    read = refused = 0
    for n, raw in enumerate(_lines(model), 1):
        try:
            careful = parse_row(tmp_path, n, raw, model)
        except InputError as exc:
            careful = exc
        try:
            mirrored = fast.decode(raw)
        except msgspec.DecodeError:
            refused += 1
            try:  # the careful way: the same row or the same error
                got = check_row(tmp_path, n, raw, model)
            except InputError as exc:
                got = exc
            assert got == careful if isinstance(careful, model) else str(got) == str(careful), raw
            continue
        read += 1
        assert isinstance(careful, model), f"the mirror read a line pydantic refuses: {raw!r}"
        assert dump(mirrored) == careful.model_dump(mode="json"), raw
        for field in model.model_fields:
            a, b = getattr(mirrored, field), getattr(careful, field)
            if not isinstance(b, list) or not b or not isinstance(b[0], Row):
                assert a == b and type(a) is type(b), (raw, field)
    assert read > 10 and refused > 10  # both ways were taken


def test_bad_lines_give_the_careful_errors_and_nan_still_reads(tmp_path):
    """check_row and count_rows name file, line and field as parse_row does; what msgspec refuses and pydantic
    reads (NaN in a float field) is read the careful way."""
    path = tmp_path / "votes.jsonl"
    good = json.dumps(VALID[Vote])
    path.write_text(good + "\n\n" + good.replace('"p_on": 0.75', '"p_on": NaN') + "\n")
    assert count_rows(path, Vote) == 2
    rows = list(read_rows(path, Vote, fast=True))
    assert type(rows[0]) is not Vote and isinstance(rows[1], Vote) and rows[1].p_on != rows[1].p_on
    path.write_text(good + "\n" + good.replace('"n_on": 4', '"n_on": "four"') + "\n")
    with pytest.raises(InputError) as err:
        count_rows(path, Vote)
    assert str(err.value).startswith(f"{path}:2 field 'n_on'")
    path.write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(InputError, match=r":2: broken JSON"):
        RowIndex(path, Vote, fast=True)
    path.write_bytes(good.encode() + b"\n" + good.replace('"q1"', '"q\\u00e9"').encode().replace(b"\\u00e9", b"\xe9")
                     + b"\n")
    with pytest.raises(InputError, match=r":2: not UTF-8"):
        RowIndex(path, Vote)
    assert loads(b'{"a": NaN}')["a"] != loads(b'{"a": NaN}')["a"] and loads(b'[1, 2.5]') == [1, 2.5]


def test_first_reads_the_chosen_row_and_lookups_read_lines_near_and_far(tmp_path):
    """RowIndex.first gives what the first match of get() is (a line whose fields are not plainly the wanted ones,
    a float index or a string mode, is read whole to decide), the key's lines are read back whether they lie together or
    far apart, and a long last line without a newline is read to its end."""
    path = tmp_path / "samples.jsonl"
    rows = []
    for q, mode, i in product(["a", "b"], ["on", "off"], range(3)):
        rows.append({**VALID[Attempt], "id": q, "mode": mode, "index": i, "text": f"{q}{mode}{i}"})
    rows.insert(3, {**VALID[Attempt], "id": "a", "mode": "off", "index": 2.0, "text": "float index"})
    rows.append({**VALID[Attempt], "id": "far", "index": 0, "text": "x" * 300_000})
    rows.append({**VALID[Attempt], "id": "far", "index": 1, "text": "last"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({**VALID[Attempt], "id": "tail",
                                                                              "text": "y" * 20_000}))
    for fast in (False, True):
        index = RowIndex(path, Attempt, fast=fast)
        for q, mode, i in product(["a", "b", "far", "none"], ["on", "off"], range(4)):
            want = next((r for r in index.get(q, []) if r.mode == mode and r.index == i), None)
            got = index.first(q, mode=mode, index=i)
            assert (got is None and want is None) or dump(got) == dump(want), (q, mode, i)
        assert index.first("a", mode="off", index=2).text == "float index"
        assert [r.text for r in index.get("far")] == ["x" * 300_000, "last"]
        assert index.one("tail").text == "y" * 20_000 and index.one("none") is None
        assert all(type(r) is Attempt for r in index.get("a")) != fast
        index.close()
    fds = len(os.listdir("/proc/self/fd"))  # an index dropped without close() leaves no file open
    index = RowIndex(path, Attempt)
    index.one("a")
    del index
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_parse_row_refuses_what_it_refused_before(tmp_path):
    """msgspec reads first, but a line json.loads would only read from bytes of another encoding (UTF-16) is still
    "not UTF-8", and broken JSON is still named as such."""
    line = json.dumps(VALID[Query]).encode("utf-16")
    with pytest.raises(InputError, match=r":4: not UTF-8"):
        parse_row(tmp_path, 4, line, Query)
    with pytest.raises(InputError, match=r":5: broken JSON"):
        parse_row(tmp_path, 5, b'{"id": "a",}', Query)
    assert parse_row(tmp_path, 6, json.dumps(VALID[Query]).encode(), Query) == Query(**VALID[Query])
