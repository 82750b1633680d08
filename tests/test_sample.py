"""Two-mode sampling: one n=N request per mode, forced prefixes, early-stopped rounds, resume."""

import json
from collections import Counter

from katdata import template
from katdata.backends.base import Completion
from katdata.backends.scripted import ScriptedBackend
from katdata.records import Attempt, Query
from katdata.runfiles import RowWriter, read_rows
from katdata.sample import SampleConfig, mode_prefix, run, sample_queries, to_attempt
from katdata.verify import INVALID, Verifier

Q_EASY = Query(id="easy", query="What is 8 + 8?", reference="16", kind="numeric")
Q_HARD = Query(id="hard", query="Hard puzzle?", reference="99", kind="numeric")


def script(req, i):
    """think-off answers 016 (correct for 'easy'); think-on never closes its answer; junk for 'hard'."""
    user = req.messages[-1]["content"]
    if "Hard" in user:
        return "no idea" if i % 2 else "42\n</answer>"
    if req.prefix.endswith(template.FORCE_PREFIX["off"]):
        return "016\n</answer>"
    return "8 plus 8 is 17\n</think>\n<answer>\n17\n</answer>"


def test_prefix_forces_the_mode_after_a_neutral_judge():
    p = mode_prefix("on", "Fixed mode.")
    assert p == "<judge>\nFixed mode.\n</judge>\n\n<think_on>\n<think>\n"
    assert template.parse(p + "x\n</think>\n<answer>\n1\n</answer>").ok


def test_one_request_per_mode_with_n_and_early_stop():
    backend = ScriptedBackend(script=script)
    cfg = SampleConfig(n=8, rounds=[2, 4], confidence=0.95, delta=0.1)
    states = sample_queries([Q_EASY, Q_HARD], cfg, backend, Verifier())
    # round 1: one call per mode, each query ONE request with n=2
    first = backend.calls[:2]
    assert [len(reqs) for reqs, _ in first] == [2, 2] and all(p.n == 2 for _, p in first)
    assert {r.prefix.endswith(template.FORCE_PREFIX["on"]) for r in first[0][0]} == {True}
    seeds = {p.seed for _, p in backend.calls}
    assert len(seeds) == 3  # every round draws with its own seed
    easy, hard = states["easy"], states["hard"]
    # easy: think-off 2/2 correct ("016" == "16"), think-on 0/2: settled after the first round
    assert (len(easy.rows["on"]), len(easy.rows["off"])) == (2, 2)
    assert all(a.correct and a.answer_class == "16" for a in easy.rows["off"])
    assert all(a.correct is False and a.answer_class == "17" for a in easy.rows["on"])
    # hard: nothing correct, so it runs to N in every mode
    assert (len(hard.rows["on"]), len(hard.rows["off"])) == (8, 8)
    assert [a.index for a in hard.rows["on"]] == list(range(8))


def test_unparsed_output_is_kept_with_a_reason():
    q = Q_HARD
    a = to_attempt(q, "on", 0, mode_prefix("on", "x"), Completion("thinking forever", "length", 5, 9))
    assert a.answer is None and a.reason.startswith("no answer") and "truncated" in a.errors and not a.ok
    b = to_attempt(q, "off", 1, mode_prefix("off", "x"), Completion("42", "stop", 5, 1))
    assert b.answer == "42" and "closed_at_stop" in b.errors and not b.ok
    c = to_attempt(q, "off", 2, mode_prefix("off", "x"), Completion("7\n</answer>\n<junk", "length", 5, 9))
    assert c.answer == "7" and "truncated" in c.errors  # closed before the cut: the answer counts
    d = to_attempt(q, "off", 3, mode_prefix("off", "x"), Completion("7 and then", "length", 5, 9))
    assert d.answer is None and d.reason


def test_stage_resumes_after_a_torn_file(tmp_path):
    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all([Q_EASY, Q_HARD])
    cfg = SampleConfig(n=4, rounds=[2])
    stats = run(cfg, tmp_path, lambda name: ScriptedBackend(script=script))
    full = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert stats["samples_used"] == len(full) == 4 + 8 and stats["samples_saved"] == 4
    # a crash mid-way: keep 7 rows and a torn line, then rerun
    (tmp_path / "samples.jsonl").write_text("\n".join(full[:7]) + "\n" + full[7][:20])
    run(cfg, tmp_path, lambda name: ScriptedBackend(script=script))
    rows = list(read_rows(tmp_path / "samples.jsonl", Attempt))
    keys = Counter((a.id, a.mode, a.index) for a in rows)
    assert len(rows) == len(full) and max(keys.values()) == 1
    # the same rows by key (contents past the cut are fresh draws here: the scripted backend has no
    # request cache; in a pipeline run the CachedBackend serves the very same completions)
    assert {(r["id"], r["mode"], r["index"]) for r in map(json.loads, full)} == set(keys)
    assert [json.loads(x) for x in full[:7]] == [a.model_dump(mode="json") for a in rows[:7]]
    assert INVALID in {a.answer_class for a in rows if a.id == "hard"}


def test_open_queries_without_a_judge_fall_back_to_self_consistency():
    q = Query(id="open", query="Describe Paris.", reference="a city", kind="open")

    def script(req, i):
        return ["Paris is a city\n</answer>", "no answer here", "paris is a city.\n</answer>"][i % 3] \
            if req.prefix.endswith(template.FORCE_PREFIX["off"]) else "hmm"

    states = sample_queries([q], SampleConfig(n=3, rounds=[]), ScriptedBackend(script=script), Verifier())
    rows = states["open"].rows["on"] + states["open"].rows["off"]
    assert all(a.correct is None for a in rows)
    from katdata.vote import VoteConfig, vote
    v = vote("open", rows, VoteConfig(n=3, explore_share=0.0))
    assert "consensus 'paris is a city'" in v.reason and v.label == "off" and v.p_off == 2 / 3


def test_budget_option_skips_think_on_for_off_candidates(tmp_path):
    from katdata.records import Tags

    with RowWriter(tmp_path / "queries.jsonl") as w:
        w.write_all([Q_EASY, Q_HARD])
    tags = [Tags(id=q, domain="math", task_type="calculation", difficulty=1, needs_reasoning=q == "hard",
                 p_reasoning=0.9 if q == "hard" else 0.1, verifiability="reference", language="en",
                 think_off_candidate=q == "easy") for q in ("easy", "hard")]
    with RowWriter(tmp_path / "tags.jsonl") as w:
        w.write_all(tags)
    cfg = SampleConfig(n=2, rounds=[], skip_on_for_off_candidates=True)
    backend = ScriptedBackend(script=script)
    stats = run(cfg, tmp_path, lambda name: backend)
    rows = list(read_rows(tmp_path / "samples.jsonl", Attempt))
    assert Counter((a.id, a.mode) for a in rows) == {("easy", "off"): 2, ("hard", "on"): 2, ("hard", "off"): 2}
    assert stats["skipped_think_on"] == 1
