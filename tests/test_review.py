"""katdata review: routing and merge logic, and the round trip against a real Argilla server.

The run folders are built from real GSM8K (think-on, the worked solution as the thinking) and
FanOutQA single-hop questions (think-off), rendered with the real template. The server tests
(marker ``argilla``) start argilla-server 2.8 + noida-db once per session (tests/argilla_server.py).
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from katdata import review, review_routing, sources, template
from katdata import vote as vote_stage
from katdata.errors import KatdataError
from katdata.records import Attempt, KatRecord, Vote
from katdata.vote import VoteConfig
from katdata.runfiles import RowWriter, read_rows

_spec = importlib.util.spec_from_file_location("katdata_tests_argilla", Path(__file__).with_name("argilla_server.py"))
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _fixtures
_spec.loader.exec_module(_fixtures)
argilla_server = _fixtures.argilla_server  # the session fixture, bound here so pytest finds it


VOTE = VoteConfig(n=4, delta=0.1, explore_share=0.0)


def _samples(q, mode: str, k: int, think: str | None, answer: str) -> list[Attempt]:
    """4 samples of one mode, the first ``k`` right (shorter), the rest wrong (each a different answer)."""
    return [Attempt(id=q.id, index=j, mode=mode, text=f"sample {j}", think=think if mode == "on" else None,
                    answer=answer if j < k else f"{answer} (wrong {j})", answer_class=answer if j < k else f"w{j}",
                    ok=True, correct=j < k, completion_tokens=(150 if mode == "on" else 15) + j) for j in range(4)]


def make_run(folder: Path, n_on: int = 24, n_off: int = 16, seed: int = 0) -> Path:
    """A run folder: records.jsonl, votes.jsonl and samples.jsonl from real queries; the vote rows are
    computed by katdata.vote from the samples (signed margins, real decision boundary)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with RowWriter(folder / "records.jsonl") as recs, RowWriter(folder / "votes.jsonl") as votes, RowWriter(
        folder / "samples.jsonl"
    ) as samples:
        rows = [(q, "on") for q in sources.load("gsm8k", limit=n_on, seed=seed)]
        rows += [(q, "off") for q in sources.load("fanoutqa-hop", limit=n_off, seed=seed)]
        for i, (q, mode) in enumerate(rows):
            think = re.sub(r"<<[^>]*>>", "", q.meta.get("solution", "")).split("####")[0].strip() if mode == "on" else None
            judge = ("The question needs several arithmetic steps, so reasoning first helps." if mode == "on"
                     else "The question asks to recall one fact, so no reasoning is needed.")
            answer = q.reference or "unknown"
            if mode == "on":
                k_on = rng.randint(2, 4)
                k_off = rng.randint(0, k_on - 1)
            elif (i - n_on) % 4 == 1:
                k_on, k_off = 0, 4  # unanimous think-off: a clear case
            else:  # at least one right think-on sample, for a reviewer who switches the mode to on
                k_off = rng.randint(1, 4)
                k_on = rng.randint(1, k_off)
            attempts = _samples(q, "on", k_on, think or f"Recall what is asked: {q.query}", answer)
            attempts += _samples(q, "off", k_off, None, answer)
            vote = vote_stage.vote(q.id, attempts, VOTE)
            assert vote.label == mode, (vote.p_on, vote.p_off)
            votes.write(vote)
            samples.write_all(attempts)
            recs.write(KatRecord(id=q.id, query=q.query, mode=mode, judge=judge, think=think, answer=answer,
                                 response=template.render(mode, judge, answer, think), reference=q.reference,
                                 kind=q.kind, tags={"domain": "math" if mode == "on" else "trivia",
                                                    "needs_reasoning": mode == "on" if i % 5 else mode != "on"},
                                 vote=vote.model_dump(mode="json"), provenance={"correct": i % 7 != 3}))
    return folder


# ---------------------------------------------------------------- pure logic (no server)


def test_routing_policy(tmp_path):
    run = make_run(tmp_path / "run")
    records, votes, attempts = review.load_run(run)
    verdicts = review.verdict_index(records, votes, attempts)
    cfg = review.ReviewConfig(audit_share=0.0)
    reasons = {r.id: review.route(r, votes[r.id], verdicts[r.id], cfg) for r in records}
    for rec in records:
        vote, got = votes[rec.id], reasons[rec.id]
        assert ("low_margin" in got) == (abs(vote.p_on - vote.p_off - vote.delta) < cfg.margin_below)
        assert ("tagger_disagrees" in got) == (rec.tags["needs_reasoning"] != (rec.mode == "on"))
        one_mode_never_right = (vote.p_on == 0) != (vote.p_off == 0)  # the modes' top answers differ
        assert ("verifier_conflict" in got) == (verdicts[rec.id]["correct"] is False or one_mode_never_right)
    clear_off = [r for r in records if (votes[r.id].p_on, votes[r.id].p_off) == (0, 1)]
    assert clear_off and not any("low_margin" in reasons[r.id] for r in clear_off)
    assert any(reasons.values()) and not all(reasons.values())
    # audit draws a stable share of the others; 'all' routes everything
    audit = review.ReviewConfig(audit_share=0.5, margin_below=0, disagreement=False, verifier_conflict=False)
    drawn = [r.id for r in records if review.route(r, votes[r.id], verdicts[r.id], audit) == ["audit"]]
    assert 5 < len(drawn) < 35
    assert drawn == [r.id for r in records if review.route(r, votes[r.id], verdicts[r.id], audit) == ["audit"]]
    every = review.ReviewConfig(route="all")
    assert all(review.route(r, votes[r.id], verdicts[r.id], every) == ["all"] for r in records)


def test_margin_is_distance_to_boundary():
    """Signed margins of real vote rows: the distance to the vote's boundary routes, not p_on - p_off."""
    q = sources.load("gsm8k", limit=1)[0]
    cfg = review.ReviewConfig(audit_share=0.0, disagreement=False, verifier_conflict=False)
    rows = {}
    for k_on, k_off in ((0, 4), (4, 0), (4, 4), (3, 2), (2, 2), (3, 3)):
        attempts = _samples(q, "on", k_on, "Add them up.", "42") + _samples(q, "off", k_off, None, "42")
        v = rows[k_on, k_off] = vote_stage.vote(q.id, attempts, VOTE)
        d = review_routing.boundary_distance(v.model_dump())
        assert (d > 0) == (v.label == "on") and d == pytest.approx(v.p_on - v.p_off - v.delta)
        rec = KatRecord(id=q.id, query=q.query, mode=v.label, judge="j", answer="42", response="r", vote=v.model_dump())
        assert ("low_margin" in review.route(rec, v, {}, cfg)) == (abs(d) < cfg.margin_below)
        conf = review_routing.mode_confidence(v.model_dump(), v.label)
        assert 0.5 <= conf <= 1 and review_routing.mode_confidence(v.model_dump(), {"on": "off", "off": "on"}[v.label]) == pytest.approx(1 - conf)
    clear_off, clear_on = rows[0, 4], rows[4, 0]
    assert (clear_off.p_on, clear_off.p_off, clear_off.label, clear_off.margin) == (0, 1, "off", -1)
    assert review.route(KatRecord(id=q.id, query=q.query, mode="off", judge="j", answer="42", response="r"),
                        clear_off, {}, cfg) == []  # unanimous think-off: a clear case, not a low-margin one
    assert review_routing.mode_confidence(clear_off.model_dump(), "off") == pytest.approx(1.0)
    assert review_routing.mode_confidence(clear_on.model_dump(), "on") == pytest.approx(1.0)
    assert review_routing.mode_confidence(rows[3, 2].model_dump(), "on") < review_routing.mode_confidence(clear_on.model_dump(), "on")
    # one sample away from flipping: both modes always right, or think-on one better than think-off
    assert review_routing.boundary_distance(rows[4, 4].model_dump()) == pytest.approx(-0.1)
    assert review_routing.boundary_distance(rows[3, 2].model_dump()) == pytest.approx(0.15)
    none = vote_stage.vote(q.id, _samples(q, "on", 0, "x", "42") + _samples(q, "off", 0, None, "42"),
                           VOTE.model_copy(update={"none_correct": "review"}), None)
    assert none.review and review_routing.mode_confidence(none.model_dump(), "off") is None  # no evidence


def _resp(status, user="u1", at="2026-01-01T00:00:01", **values):
    return {"status": status, "user_id": user, "updated_at": at, "values": {k: {"value": v} for k, v in values.items()}}


def test_merge_rules(tmp_path):
    run = make_run(tmp_path / "run", n_on=4, n_off=4)
    records, _, attempts = review.load_run(run)
    on = [r for r in records if r.mode == "on"]
    off = [r for r in records if r.mode == "off"]
    answers = {
        on[0].id: [_resp("submitted", mode="on", answer_ok="no", corrected_answer=" 42 ")],
        on[1].id: [_resp("submitted", mode="off", answer_ok="yes")],                       # stale judge
        on[2].id: [_resp("discarded"), _resp("draft", at="2026-01-02T00:00:00", mode="off")],
        on[3].id: [_resp("submitted", mode="on", answer_ok="no", corrected_answer="<answer> 7")],
        off[0].id: [_resp("submitted", mode="on", answer_ok="yes", corrected_judge="It needs two hops.")],
        off[1].id: [_resp("submitted", mode="off", answer_ok="no")],                      # no correction
        off[2].id: [_resp("submitted", user="u1", mode="off", answer_ok="yes", comment="fine"),
                    _resp("submitted", user="u2", at="2026-01-03T00:00:00", mode="off", answer_ok="no",
                          corrected_answer="Paris")],
    }
    merged, changes, excluded, stats = review.merge(records, answers, {"u1": "ann", "u2": "bob"}, attempts, "ds")
    by_id = {r.id: r for r in merged}
    reasons = {e["id"]: e["reason"] for e in excluded}
    assert by_id[on[0].id].answer == "42" and by_id[on[0].id].think == on[0].think
    assert reasons[on[1].id] == "stale_judge"
    assert reasons[on[2].id] == "discarded"
    assert reasons[on[3].id].startswith("render_failed")
    flipped = by_id[off[0].id]
    assert flipped.mode == "on" and flipped.think.startswith("Recall what is asked")
    assert flipped.judge == "It needs two hops."
    assert flipped.label_source == "human" and flipped.content_source in ("sample", "solver")  # a reviewer chose it
    assert reasons[off[1].id] == "answer_wrong_uncorrected"
    assert by_id[off[2].id].answer == "Paris" and by_id[off[2].id].changes[-1].annotator == "bob"
    assert by_id[off[3].id] == off[3]  # unanswered: unchanged
    for rec in merged:  # every merged record re-renders and re-parses to itself
        assert rec.response == template.render(rec.mode, rec.judge, rec.answer, rec.think)
        assert template.parse(rec.response).ok
    fields = {(c["id"], c["field"]) for c in changes}
    assert (on[0].id, "answer") in fields and (off[0].id, "mode") in fields and (off[0].id, "think") in fields
    assert stats["discarded"] == 1 and stats["answered"] == 7 and len(merged) == len(records) - 4 == len(records) - len(excluded)


def test_no_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    run = make_run(tmp_path / "run", n_on=2, n_off=2)
    with pytest.raises(KatdataError, match="ARGILLA_API_URL"):
        review.push(review.ReviewConfig(), run)
    assert not (run / "review").exists()


# ---------------------------------------------------------------- against the real server

SUBMIT = "/api/v1/records/{}/responses"


@pytest.fixture()
def live(argilla_server, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    return argilla_server


def _server_records(server, dataset_id: str) -> dict[str, dict]:
    import requests

    r = requests.get(f"{server.url}/api/v1/datasets/{dataset_id}/records", params={"include": "responses", "limit": 1000},
                     headers={"X-Argilla-Api-Key": server.api_key}, timeout=30)
    r.raise_for_status()
    return {item["external_id"]: item for item in r.json()["items"]}


def _answer(server, headers, record_uuid, status, **values):
    import requests

    body = {"status": status, "values": {k: {"value": v} for k, v in values.items()}}
    r = requests.post(server.url + SUBMIT.format(record_uuid), json=body, headers=headers, timeout=30)
    assert r.status_code == 201, r.text


@pytest.mark.argilla
def test_round_trip(live, tmp_path, caplog):
    import requests

    caplog.set_level(logging.DEBUG)
    run = make_run(tmp_path / "run-rt")
    cfg = review.ReviewConfig(route="all")
    t0 = time.monotonic()
    first = review.push(cfg, run)
    push_s = time.monotonic() - t0
    second = review.push(cfg, run)  # pushing twice: same dataset, no duplicates
    assert first["created"] and not second["created"] and first["dataset_id"] == second["dataset_id"]
    on_server = _server_records(live, first["dataset_id"])
    records = list(read_rows(run / "records.jsonl", KatRecord))
    assert sorted(on_server) == sorted(r.id for r in records) and first["pushed"] == len(records) == 40

    # the layout from annotation/dataset.yaml, and a record's suggestions
    ds = live.owner().datasets(name=first["dataset"], workspace="katdata")
    assert {f.name for f in ds.settings.fields} == {"query", "judge", "think", "answer", "response", "reference"}
    assert {q.name for q in ds.settings.questions} == {"mode", "answer_ok", "corrected_answer", "corrected_judge", "comment"}
    assert "Reviewing KAT records" in ds.settings.guidelines
    rec0 = records[0]
    key = {"X-Argilla-Api-Key": live.api_key}
    names = {q["id"]: q["name"] for q in requests.get(
        f"{live.url}/api/v1/datasets/{first['dataset_id']}/questions", headers=key, timeout=30).json()["items"]}
    sugg = {names[s["question_id"]]: s for s in requests.get(
        f"{live.url}/api/v1/records/{on_server[rec0.id]['id']}/suggestions", headers=key, timeout=30).json()["items"]}
    vote0 = next(read_rows(run / "votes.jsonl", Vote))
    assert sugg["mode"]["value"] == rec0.mode
    assert sugg["mode"]["score"] == pytest.approx(review_routing.mode_confidence(vote0.model_dump(), rec0.mode))
    assert sugg["answer_ok"]["value"] == "yes" and sugg["answer_ok"]["score"] == pytest.approx(vote0.p_on)
    votes = {v.id: v for v in read_rows(run / "votes.jsonl", Vote)}
    clear = next(r for r in records if (votes[r.id].p_on, votes[r.id].p_off) == (0, 1))  # unanimous think-off
    sugg = {names[s["question_id"]]: s for s in requests.get(
        f"{live.url}/api/v1/records/{on_server[clear.id]['id']}/suggestions", headers=key, timeout=30).json()["items"]}
    assert sugg["mode"]["value"] == "off" and sugg["mode"]["score"] == pytest.approx(1.0)

    # an annotator answers some records through the REST API, as the web UI does
    ann = live.annotator("ann1", "katdata")
    on = [r for r in records if r.mode == "on"]
    off = [r for r in records if r.mode == "off"]
    uid = {k: v["id"] for k, v in on_server.items()}
    _answer(live, ann, uid[on[0].id], "submitted", mode="on", answer_ok="no", corrected_answer="12345")
    _answer(live, ann, uid[off[0].id], "submitted", mode="on", answer_ok="yes", corrected_judge="Two facts must be combined.")
    _answer(live, ann, uid[on[1].id], "discarded")
    _answer(live, ann, uid[on[2].id], "draft", mode="off")
    t0 = time.monotonic()
    stats = review.pull(cfg, run)
    pull_s = time.monotonic() - t0
    merged = {r.id: r for r in read_rows(run / "review" / "merged.jsonl", KatRecord)}
    assert merged[on[0].id].answer == "12345" and merged[on[0].id].changes[-1].annotator == "ann1"
    assert merged[off[0].id].mode == "on" and merged[off[0].id].think
    assert on[1].id not in merged and merged[on[2].id] == on[2]  # discarded out, draft ignored
    assert stats["discarded"] == 1 and len(merged) == len(records) - 1
    changes = [json.loads(line) for line in (run / "review" / "changes.jsonl").read_text().splitlines()]
    assert {(c["id"], c["field"]) for c in changes} >= {(on[0].id, "answer"), (off[0].id, "mode"), (off[0].id, "judge")}
    assert all(c["annotator"] == "ann1" and c["at"] for c in changes)

    # pulling again changes nothing; a later answer merges on top (partial progress)
    before = {p.name: p.read_bytes() for p in (run / "review").iterdir()}
    review.pull(cfg, run)
    assert before == {p.name: p.read_bytes() for p in (run / "review").iterdir()}
    _answer(live, ann, uid[on[3].id], "submitted", mode="on", answer_ok="no", corrected_answer="777")
    review.pull(cfg, run)
    merged = {r.id: r for r in read_rows(run / "review" / "merged.jsonl", KatRecord)}
    assert merged[on[3].id].answer == "777" and merged[on[0].id].answer == "12345"

    # a push after answers were given keeps them and adds no records
    review.push(cfg, run)
    again = _server_records(live, first["dataset_id"])
    assert len(again) == len(records)
    assert [r["status"] for r in again[on[0].id]["responses"]] == ["submitted"]

    # the credentials are nowhere in the logs or the run folder
    for path in run.rglob("*"):
        if path.is_file():
            assert live.api_key not in path.read_text(errors="replace"), path
    assert live.api_key not in caplog.text
    print(f"\nreview timings: server start {live.start_s:.1f} s, push of 40 {push_s:.2f} s, pull {pull_s:.2f} s")


@pytest.mark.argilla
def test_pending_queue_shows_only_unanswered(live, tmp_path):
    import requests

    run = make_run(tmp_path / "run-queue", n_on=5, n_off=5)
    stats = review.push(review.ReviewConfig(route="all"), run)
    ids = {k: v["id"] for k, v in _server_records(live, stats["dataset_id"]).items()}
    ann = live.annotator("ann2", "katdata")
    answered = sorted(ids)[:4]
    for i, rid in enumerate(answered):
        if i == 3:
            _answer(live, ann, ids[rid], "discarded")
        else:
            _answer(live, ann, ids[rid], "submitted", mode="on", answer_ok="yes")
    body = {"query": {}, "filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"},
                                                "values": ["pending"]}]}}
    url = f"{live.url}/api/v1/me/datasets/{stats['dataset_id']}/records/search"
    shown: set = set()
    for _ in range(20):  # the search index is refreshed asynchronously
        r = requests.post(url, json=body, headers=ann, params={"limit": 50}, timeout=30)
        r.raise_for_status()
        shown = {item["record"]["external_id"] for item in r.json()["items"]}
        if shown == set(ids) - set(answered):
            break
        time.sleep(0.25)
    assert shown == set(ids) - set(answered)


@pytest.mark.argilla
def test_main_cli_and_server_down(live, tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run-cli", n_on=3, n_off=3)
    assert review.main(["push", str(run)]) == 0  # the default policy
    pushed = json.loads((run / "review" / "push.json").read_text())
    assert 0 < pushed["pushed"] <= 6
    assert review.main(["pull", str(run)]) == 0
    merged = (run / "review" / "merged.jsonl").read_bytes()
    out = capsys.readouterr()
    assert live.api_key not in out.out + out.err

    # the server is down (nothing listens there): a clear error, and nothing local changes
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{_fixtures.free_port()}")
    for action in ("push", "pull"):
        assert review.main([action, str(run)]) == 4  # a server problem (katdata.errors exit codes)
        msg = capsys.readouterr().err
        assert "cannot be used" in msg and "Nothing in the run folder was changed" in msg
        assert live.api_key not in msg
    assert (run / "review" / "merged.jsonl").read_bytes() == merged
    assert json.loads((run / "review" / "push.json").read_text()) == pushed


@pytest.mark.argilla
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_web_ui_shows_a_record(live, tmp_path):
    """Argilla's own web UI, in headless Chromium, shows a pushed record's judge, think and answer.

    KATDATA_SCREENSHOT=docs/argilla-record.png keeps the screenshot (how the docs image is made).
    """
    spec = importlib.util.spec_from_file_location("katdata_screenshot", _fixtures.ROOT / "annotation" / "screenshot.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    run = make_run(tmp_path / "run-ui", n_on=3, n_off=0)  # think-on records only: every one has a think
    stats = review.push(review.ReviewConfig(route="all", dataset="katdata-ui-demo-v1"), run)
    out = Path(os.environ.get("KATDATA_SCREENSHOT") or tmp_path / "record.png")
    dom = html.unescape(shot.capture(live.url, stats["dataset_id"], out, live.password))
    assert out.stat().st_size > 10_000
    shown = [r for r in read_rows(run / "records.jsonl", KatRecord) if r.query in dom]
    assert len(shown) == 1, "the page shows no record (or more than one)"
    rec = shown[0]
    assert rec.judge in dom and rec.answer in dom and rec.think.splitlines()[0].strip() in dom
    assert "<judge>" in dom and "<think_on>" in dom  # the full response shows the template's tags verbatim


# ---------------------------------------------------------------- hold-back: flagged records wait for a reviewer


def make_flagged_run(folder: Path, n: int = 12, seed: int = 1) -> Path:
    """A run through the real vote and assemble stages: GSM8K queries whose samples were all wrong
    are flagged by the vote (none_correct: review) and assembled from the reference solution."""
    from katdata import assemble
    from katdata.judge import JudgeRow
    from katdata.records import Tags

    folder.mkdir(parents=True, exist_ok=True)
    queries = sources.load("gsm8k", limit=n, seed=seed)
    with RowWriter(folder / "queries.jsonl") as qs, RowWriter(folder / "tags.jsonl") as tags, RowWriter(
        folder / "samples.jsonl"
    ) as samples:
        for i, q in enumerate(queries):
            qs.write(q)
            tags.write(Tags(id=q.id, domain="math", task_type="word_problem", difficulty=3, needs_reasoning=True,
                            p_reasoning=0.9, verifiability="reference", language="en"))
            think = re.sub(r"<<[^>]*>>", "", q.meta["solution"]).split("####")[0].strip()
            k_on, k_off = (0, 0) if i % 3 == 0 else (4, i % 3)  # every third: no sample right
            samples.write_all(_samples(q, "on", k_on, think, q.reference) + _samples(q, "off", k_off, None, q.reference))
    vote_stage.run(VOTE.model_copy(update={"none_correct": "review"}), folder)
    with RowWriter(folder / "judges.jsonl") as judges:
        for v in read_rows(folder / "votes.jsonl", Vote):
            judges.write(JudgeRow(id=v.id, mode=v.label, ok=True, rationale="Several dependent steps of arithmetic, "
                                  "so working them out first avoids slips."))
    assemble.run(assemble.AssembleConfig(think_source="vote", reference_fallback=True), folder)
    return folder


def _exported(folder: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {r["id"]: r for f in sorted((folder / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_holdback_until_answered(tmp_path, caplog, capsys):
    from katdata import export, train

    run = make_flagged_run(tmp_path / "run")
    records = list(read_rows(run / "records.jsonl", KatRecord))
    flagged = sorted(r.id for r in records if r.vote["review"])
    assert 0 < len(flagged) < len(records)
    caplog.set_level(logging.INFO)
    stats = export.run(export.ExportConfig(plot=False), run)
    assert stats["held_back"] == len(flagged) and stats["rows_out"] == len(records) - len(flagged)
    assert set(_exported(run / "export")) == {r.id for r in records} - set(flagged)
    assert f"{len(flagged)} records wait for review" in caplog.text
    card = (run / "export" / "README.md").read_text()
    assert f"Held back for review: {len(flagged)} records" in card
    hold = review_routing.hold_policy(review.ReviewConfig(), export.ExportConfig().require_review)  # no recipe
    rows, _ = train.load_examples(str(run / "records.jsonl"), run, hold)  # train without an export holds them back too
    assert {r["id"] for r in rows} == {r.id for r in records} - set(flagged)

    # require_review: false keeps the old behaviour, and the card says so
    (run / "recipe.yaml").write_text("export:\n  require_review: false\n")
    everything = export.run(export.ExportConfig(plot=False, require_review=False, out=tmp_path / "all"), run)
    assert everything["rows_out"] == len(records) and everything["unreviewed_included"] == len(flagged)
    assert f"require_review is false: {len(flagged)} records" in (tmp_path / "all" / "README.md").read_text()
    assert review_routing.hold_policy(review.ReviewConfig(), False) is None  # train, under require_review: false
    assert len(train.load_examples(str(run / "records.jsonl"), run, None)[0]) == len(records)
    assert export.main([str(run), "--out", str(tmp_path / "cli")]) == 0  # the CLI reads the run's recipe.yaml
    assert json.loads(capsys.readouterr().out)["unreviewed_included"] == len(flagged)
    (run / "recipe.yaml").unlink()
    assert export.main([str(run), "--out", str(tmp_path / "cli")]) == 0
    assert json.loads(capsys.readouterr().out)["held_back"] == len(flagged)
    assert export.main([str(run), "--out", str(tmp_path / "cli"), "--include-unreviewed"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_out"] == len(records)

    # a reviewer switches one to think-off with a new rationale and answer (merged as `review pull` does)
    _, _, attempts = review.load_run(run)
    judge = "It is one subtraction, so the answer can be given directly."
    answers = {flagged[0]: [_resp("submitted", mode="off", answer_ok="no", corrected_answer="41", corrected_judge=judge)],
               flagged[1]: [_resp("draft", mode="off")]}  # a draft is no answer: it still waits
    merged, _, _, mstats = review.merge(records, answers, {"u1": "ann"}, attempts, "ds")
    assert mstats["answered"] == 1
    with RowWriter(run / "review" / "merged.jsonl") as w:
        w.write_all(merged)
    stats = export.run(export.ExportConfig(plot=False), run)
    assert stats["held_back"] == len(flagged) - 1
    out = _exported(run / "export")
    assert flagged[0] in out and not set(flagged[1:]) & set(out)
    row = out[flagged[0]]
    assert (row["mode"], row["judge"], row["answer"], row["think"]) == ("off", judge, "41", None)
    assert row["response"] == template.render("off", judge, "41")  # re-rendered byte-exact
    assert {c["field"] for c in row["provenance"]["changes"]} == {"mode", "judge", "think", "answer"}
    assert {c["annotator"] for c in row["provenance"]["changes"]} == {"ann"}


def test_blocking_rules_from_the_recipe(tmp_path):
    from katdata import export
    from katdata.errors import KatdataError

    run = make_run(tmp_path / "run", n_on=8, n_off=8)
    records = list(read_rows(run / "records.jsonl", KatRecord))
    assert export.run(export.ExportConfig(plot=False), run)["held_back"] == 0  # nothing flagged by the vote
    (run / "recipe.yaml").write_text("review:\n  blocking: [low_margin]\n")
    near = {r.id for r in records if abs(review_routing.boundary_distance(r.vote)) < 0.2}
    assert 0 < len(near) < len(records)
    policy = review._config(None, run)  # as `katdata review push RUN` and `katdata export RUN` read it
    assert review_routing.waiting(run, run / "records.jsonl", policy) == near
    assert export.run(export.ExportConfig(plot=False), run, review=policy)["held_back"] == len(near)
    pushed_reasons = {r.id: review.route(r, None, {}, policy) for r in records}
    assert all("low_margin" in pushed_reasons[i] for i in near)  # push routes every record export waits for
    (run / "recipe.yaml").write_text("review:\n  explored: false\n  blocking: [explored]\n")
    with pytest.raises(KatdataError, match=r"recipe.yaml:1: review.*switched off"):
        review._config(None, run)


@pytest.mark.argilla
def test_holdback_round_trip(live, tmp_path):
    """run -> push -> export holds the flagged back -> a reviewer answers one through the Argilla SDK,
    switching its mode -> pull -> export includes it with the reviewer's mode; the rest still wait."""
    import argilla as rg

    from katdata import export

    run = make_flagged_run(tmp_path / "run-hold")
    records = {r.id: r for r in read_rows(run / "records.jsonl", KatRecord)}
    flagged = sorted(i for i, r in records.items() if r.vote["review"])
    pushed = review.push(review.ReviewConfig(), run)  # the default policy
    assert pushed["blocking"] == len(flagged) and pushed["routed"]["vote_flag"] == len(flagged)
    first = export.run(export.ExportConfig(plot=False), run)
    assert first["held_back"] == len(flagged) and not set(flagged) & set(_exported(run / "export"))

    # the reviewer's own SDK client submits the answer (annotators cannot list records: the owner finds its id)
    ds = live.owner().datasets(name=pushed["dataset"], workspace="katdata")
    on_server = {r.id: r for r in ds.records(query=rg.Query(filter=rg.Filter(("metadata.route", "in", ["blocks_export"]))))}
    assert set(on_server) == set(flagged)
    reviewer = live.reviewer("rev1", "katdata")
    judge = "A single recalled figure answers it, so no reasoning is needed."
    values = {"mode": "off", "answer_ok": "no", "corrected_answer": "41", "corrected_judge": judge}
    answer = rg.UserResponse([rg.Response(k, v, user_id=reviewer.me.id, status="submitted") for k, v in values.items()])
    reviewer.api.records.create_record_response(on_server[flagged[0]]._server_id, answer._model)

    pulled = review.pull(review.ReviewConfig(), run)
    assert pulled["answered"] == 1 and pulled["changed"] == 1 and pulled["waiting"] == len(flagged) - 1
    again = export.run(export.ExportConfig(plot=False), run)
    assert again["held_back"] == len(flagged) - 1 and again["rows_out"] == first["rows_out"] + 1
    row = _exported(run / "export")[flagged[0]]
    assert (row["mode"], row["judge"], row["answer"], row["think"]) == ("off", judge, "41", None)
    assert row["response"] == template.render("off", judge, "41")
    assert [c["annotator"] for c in row["provenance"]["changes"]] == ["rev1"] * 4
    assert not set(flagged[1:]) & set(_exported(run / "export"))  # still unanswered: still held back
    assert f"Held back for review: {len(flagged) - 1} records" in (run / "export" / "README.md").read_text()
