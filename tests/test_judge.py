"""Judge rationales: cleaned, checked against their label, regenerated once, then rejected."""

from katdata.backends.scripted import ScriptedBackend
from katdata.judge import JudgeConfig, clean, keyword_stance, parse_stance, write_rationales
from katdata.records import Query

Q = [Query(id="a", query="Who wrote Hamlet?"), Query(id="b", query="A train leaves at 3pm at 60 km/h ...")]
OFF_TEXT = "The request asks for the author of a famous play. It only needs recall, so no step-by-step reasoning is needed."
ON_TEXT = "The request asks for a travel time. It requires several calculation steps, so careful reasoning is needed."


def test_clean_cuts_markers_and_long_text():
    assert clean("It asks for a fact. Simple recall.\n</judge>\n\n<think_off>\n<answer>") == "It asks for a fact. Simple recall."
    assert clean("One. Two is here. Three is here. Four is here.", 3) == "One. Two is here. Three is here."
    assert clean("<|im_end|>") is None


def test_stance_from_keywords_and_llm_reply():
    assert keyword_stance(OFF_TEXT) == "off" and keyword_stance(ON_TEXT) == "on"
    assert keyword_stance("Hello world.") is None
    assert parse_stance("NEEDS") == "on" and parse_stance("NOT.") == "off" and parse_stance("maybe") is None


def _backend(rationale_for, check_reply="unparsed"):
    calls = []

    def script(req, i):
        text = req.messages[-1]["content"]
        calls.append(text)
        if "Reply with exactly one word: NEEDS or NOT" in text:
            return check_reply
        return rationale_for(text, len(calls))

    return ScriptedBackend(script=script), calls


def test_rationale_written_for_the_label_and_accepted():
    backend, calls = _backend(lambda text, n: ON_TEXT if "Decision: This request needs" in text else OFF_TEXT)
    rows = write_rationales(zip(Q, ["off", "on"]), JudgeConfig(), backend)
    assert [r.ok for r in rows] == [True, True]
    assert rows[0].rationale == OFF_TEXT and rows[1].rationale == ON_TEXT
    assert "Who wrote Hamlet?" in calls[0] and "answered directly" in calls[0]
    assert rows[0].attempts[0]["check"].startswith("keywords (llm reply unparsed")


def test_mismatch_is_regenerated_once_then_rejected():
    backend, _ = _backend(lambda text, n: OFF_TEXT)  # always argues think-off
    rows = write_rationales(zip(Q, ["off", "on"]), JudgeConfig(retries=1), backend)
    assert rows[0].ok and len(rows[0].attempts) == 1
    assert not rows[1].ok and len(rows[1].attempts) == 2 and rows[1].rationale is None
    assert "argues for off" in rows[1].reason and "label is on" in rows[1].reason


def test_llm_check_verdict_is_used_when_it_parses():
    backend, _ = _backend(lambda text, n: OFF_TEXT, check_reply="NEEDS")
    rows = write_rationales(zip(Q[:1], ["off"]), JudgeConfig(retries=0), backend)
    assert not rows[0].ok and rows[0].attempts[0]["check"] == "llm"


def test_regeneration_can_succeed():
    backend, _ = _backend(lambda text, n: "ok" if n == 1 else OFF_TEXT)
    rows = write_rationales(zip(Q[:1], ["off"]), JudgeConfig(rationale_check="keywords"), backend)
    assert rows[0].ok and [a["verdict"] for a in rows[0].attempts] == ["empty rationale", "ok"]


def _run_dir(tmp_path, labels):
    import json

    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q.model_dump()) + "\n" for q in Q))
    (tmp_path / "votes.jsonl").write_text("".join(json.dumps({"id": q.id, "label": m, "reason": "test"}) + "\n"
                                                  for q, m in zip(Q, labels)))
    return tmp_path


def test_tags_rationale_argues_for_its_mode_for_every_task_type():
    from katdata import tag
    from katdata.judge import tags_rationale

    for task_type in tag.TagConfig().task_types + ["unknown"]:
        for mode in ("on", "off"):
            text = tags_rationale(task_type, "math", mode)
            assert keyword_stance(text) == mode, (task_type, mode, text)
            assert "{" not in text and 1 < text.count(".") <= 3


def test_tags_writer_loads_no_engine_and_uses_the_tagger_rows(tmp_path):
    from katdata.judge import JudgeRow, run
    from katdata.runfiles import read_rows

    run_dir = _run_dir(tmp_path, ["off", "on"])  # no tags.jsonl: the rule prior's tags are used

    def no_engine(name):
        raise AssertionError("writer: tags must not load an engine")

    stats = run(JudgeConfig(writer="tags"), run_dir, no_engine)
    rows = {r.id: r for r in read_rows(run_dir / "judges.jsonl", JudgeRow)}
    assert stats["ok"] == 2 and all(r.ok for r in rows.values())
    assert "fact" in rows["a"].rationale and keyword_stance(rows["a"].rationale) == "off"
    assert "number" in rows["b"].rationale and keyword_stance(rows["b"].rationale) == "on"
    assert rows["a"].attempts[0]["writer"] == "tags"


def test_rejected_rationale_falls_back_to_tags_when_asked(tmp_path):
    from katdata.judge import JudgeRow, run
    from katdata.runfiles import read_rows

    run_dir = _run_dir(tmp_path, ["off", "on"])
    backend, _ = _backend(lambda text, n: OFF_TEXT)  # argues think-off for both
    stats = run(JudgeConfig(rationale_check="keywords", retries=0, fallback="tags"), run_dir, lambda name: backend)
    rows = {r.id: r for r in read_rows(run_dir / "judges.jsonl", JudgeRow)}
    assert rows["a"].rationale == OFF_TEXT and len(rows["a"].attempts) == 1
    assert rows["b"].ok and keyword_stance(rows["b"].rationale) == "on" and stats["fallback"] == 1
    assert rows["b"].attempts[0]["verdict"].startswith("argues for off")
    assert rows["b"].attempts[-1]["note"].startswith("fallback after: rationale rejected")


def test_a_broken_vote_row_is_named_before_any_engine_loads_and_nothing_is_written(tmp_path):
    """The judge streams its votes, yet still checks every row before the engine loads: a bad line deep in the
    file is one error naming file and line, and judges.jsonl is not started."""
    import pytest

    from katdata.errors import InputError
    from katdata.judge import run

    run_dir = _run_dir(tmp_path, ["off", "on"])
    with open(run_dir / "votes.jsonl", "a") as f:
        f.write('{"id": "c", "label": "maybe"}\n')

    def no_engine(name):
        raise AssertionError("the engine must not load on bad input")

    with pytest.raises(InputError) as err:
        run(JudgeConfig(), run_dir, no_engine)
    assert f"{run_dir / 'votes.jsonl'}:3 field 'label'" in str(err.value)
    assert not (run_dir / "judges.jsonl").exists()


def test_judge_rows_follow_the_votes_and_a_rerun_writes_only_the_rest(tmp_path):
    """Queries are looked up by id (votes in another order than queries.jsonl), tag rows where the tagger wrote
    them and the rule prior's tags elsewhere; a rerun after a partial file adds only the missing rows."""
    import json

    from katdata.judge import JudgeRow, run
    from katdata.records import Tags
    from katdata.runfiles import read_rows
    from katdata.tag import TagConfig, combine, rule_tags

    run_dir = _run_dir(tmp_path, ["off", "on"])
    votes = (run_dir / "votes.jsonl").read_text().splitlines()
    (run_dir / "votes.jsonl").write_text("\n".join(reversed(votes)) + "\n")
    tagged = combine(Q[1], rule_tags(Q[1], TagConfig()), None, None, TagConfig()).model_copy(
        update={"task_type": "lookup", "domain": "general"})  # a tagger row that differs from the prior
    (run_dir / "tags.jsonl").write_text(json.dumps(tagged.model_dump(mode="json")) + "\n")
    assert isinstance(tagged, Tags)

    stats = run(JudgeConfig(writer="tags"), run_dir, lambda name: None)
    rows = [r for r in read_rows(run_dir / "judges.jsonl", JudgeRow)]
    assert [r.id for r in rows] == ["b", "a"] and stats["rows_in"] == 2 and stats["rows_out"] == 2
    assert "fact" in rows[0].rationale and keyword_stance(rows[0].rationale) == "on"  # b: the tagger's task type
    assert "fact" in rows[1].rationale  # a: no tag row, the rule prior's

    lines = (run_dir / "judges.jsonl").read_text().splitlines()
    (run_dir / "judges.jsonl").write_text(lines[0] + "\n")
    stats = run(JudgeConfig(writer="tags"), run_dir, lambda name: None)
    assert stats["rows_out"] == 1 and (run_dir / "judges.jsonl").read_text().splitlines() == lines
