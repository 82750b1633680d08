"""The tagger calibrated against the vote: outcomes, the fits and their cross-validation, the saved
JSON applied by `tag` in a later run, the card section, bad input.

Queries are real (GSM8K and FanOutQA from the installed packages), tagged by the rule prior; the
vote outcomes follow a known law the raw tagger gets partly wrong (a word problem needs reasoning
only with four numbers or more), so a working fit must beat the raw tagger on held-out folds and
on the queries of a later run. A real embedded-model run from tag to vote is marked slow (a 135M
model gets about one sample in 300 right, too few labels for a fit: it must say so).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from katdata import calibrate, sources, tag
from katdata.errors import KatdataError
from katdata.records import Tags, Vote
from katdata.runfiles import RowWriter, read_rows

RULE = tag.TagConfig(use_llm=False)


def law(t: Tags) -> int:
    return int(t.rule["features"]["numbers"] >= 4)


def vote_row(qid: str, on: int, **kw) -> Vote:
    p_on, p_off = (1.0, 0.0) if on else (0.5, 0.5)
    return Vote(id=qid, label="on" if on else "off", reason=f"p_on={p_on} p_off={p_off} delta=0.1 vs reference",
                n_on=2, n_off=2, p_on=p_on, p_off=p_off, delta=0.1, **kw)


def make_run(run_dir, seed: int, n: int = 40, extra_votes=()):
    """A run folder: real queries tagged by the rule prior, votes from the law (plus ``extra_votes``)."""
    run_dir.mkdir(exist_ok=True)
    queries = sources.load("gsm8k", n, seed=seed) + sources.load("fanoutqa-hop", n // 2, seed=seed)
    with RowWriter(run_dir / "queries.jsonl") as w:
        w.write_all(queries)
    tag.run(RULE, run_dir, lambda name: None)
    rows = list(read_rows(run_dir / "tags.jsonl", Tags))
    with RowWriter(run_dir / "votes.jsonl") as w:
        w.write_all([vote_row(t.id, law(t)) for t in rows] + list(extra_votes))
    return rows


def test_outcomes_count_only_labels_the_vote_evidence_decided(tmp_path):
    votes = [vote_row("a", 1), vote_row("b", 0),
             Vote(id="c", label="on", reason="no correct sample (reference); tagger prior", n_on=2, n_off=2),
             Vote(id="d", label="on", reason="no correct sample (reference); sent to review", review=True,
                  n_on=2, n_off=2),
             # exploration gave a random mode; the evidence said off: the outcome is off
             Vote(id="e", label="on", reason="exploration (random mode); vote said off: ...", explored=True,
                  n_on=2, n_off=2, p_on=0.5, p_off=0.5, delta=0.1),
             # think-on never sampled (an off candidate): p_on=0 is no evidence
             Vote(id="f", label="off", reason="p_on=0.000 p_off=1.000", n_on=0, n_off=2, p_off=1.0, delta=0.1)]
    with RowWriter(tmp_path / "votes.jsonl") as w:
        w.write_all(votes)
    got, skipped = calibrate.outcomes(tmp_path)
    assert got == {"a": 1, "b": 0, "e": 0}
    assert skipped == {"no correct sample (fallback label)": 2, "one mode not sampled": 1}


def test_fit_beats_a_miscalibrated_tagger_and_saves_plain_json(tmp_path):
    import sklearn  # noqa: F401  (the local extra installs it: a missing one is a failure, not a skip)
    rows = make_run(tmp_path, seed=1, extra_votes=[Vote(id="gone", label=None, reason="no correct sample; dropped")])
    data = calibrate.fit_run(tmp_path, think_off_threshold=0.7)
    assert data["fitted"] and data["n"] == len(rows) == 60
    assert data["labels"] == {"on": sum(map(law, rows)), "off": 60 - sum(map(law, rows))}
    assert data["excluded"]["no correct sample (fallback label)"] == 1
    cv = data["cv"]
    assert cv["folds"] == 5 and cv["raw"]["agreement"] < 0.9  # the rule prior says on to most word problems
    assert cv["logistic"]["agreement"] >= cv["raw"]["agreement"] + 0.1  # out-of-fold, not in-sample
    assert cv["logistic"]["brier"] < cv["raw"]["brier"]
    assert data["calibrated"] == cv[data["method"]]
    on_disk = json.loads((tmp_path / "calibration.json").read_text())
    assert on_disk == json.loads(json.dumps(data))  # plain JSON
    assert (tmp_path / calibrate.PLOT_FILE).stat().st_size > 5000

    # the saved isotonic fit, applied without scikit-learn, predicts what scikit-learn's does
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit([t.p_reasoning for t in rows],
                                                                            list(map(law, rows)))
    fit = calibrate.Fit(on_disk | {"method": "isotonic"}, tmp_path)
    for p in (0.0, 0.12, 0.5, 0.73, 0.9, 1.0):
        t = rows[0].model_copy(update={"p_reasoning": p})
        assert fit.p(t) == pytest.approx(float(iso.predict([p])[0]), abs=1e-9)


def test_tag_reads_a_fit_from_an_earlier_run(tmp_path):
    """Vote a sample, label the rest cheaply: run B's tagger uses run A's fit; B's votes only score it."""
    import sklearn  # noqa: F401  (the local extra installs it: a missing one is a failure, not a skip)
    make_run(tmp_path / "a", seed=1)
    assert calibrate.main([str(tmp_path / "a"), "--method", "logistic"]) == 0
    later = tmp_path / "b"
    later.mkdir()
    with RowWriter(later / "queries.jsonl") as w:
        w.write_all(sources.load("gsm8k", 40, seed=2) + sources.load("fanoutqa-hop", 20, seed=2))
    cfg = tag.TagConfig(use_llm=False, calibration=str(tmp_path / "a"))
    stats = tag.run(cfg, later, lambda name: None)
    rows = list(read_rows(later / "tags.jsonl", Tags))
    assert all(t.p_uncalibrated == t.rule["p_reasoning"] for t in rows)
    assert all(t.needs_reasoning == (t.p_reasoning >= 0.5) for t in rows)
    assert all(t.think_off_candidate == (1 - t.p_reasoning >= 0.7) for t in rows)
    raw = sum((t.p_uncalibrated >= 0.5) == law(t) for t in rows) / len(rows)
    calibrated = sum(t.needs_reasoning == law(t) for t in rows) / len(rows)
    assert calibrated >= raw + 0.1, (raw, calibrated)
    assert stats["calibration"]["method"] == "logistic" and stats["calibration"]["needs_reasoning_changed"] > 0
    # a fit of a run that was itself tagged with a fit starts from the tagger's own p
    assert calibrate.raw_p(rows[0]) == rows[0].p_uncalibrated


def test_too_few_labels_say_so_and_no_fit_is_used(tmp_path):
    make_run(tmp_path, seed=1, n=10)
    if importlib.util.find_spec("sklearn"):
        assert calibrate.fit_run(tmp_path)["fitted"] and (tmp_path / calibrate.PLOT_FILE).is_file()
    (tmp_path / "votes.jsonl").unlink()
    with RowWriter(tmp_path / "votes.jsonl") as w:  # the votes again, all off: a refit has no fit and no plot
        w.write_all([vote_row(t.id, 0) for t in read_rows(tmp_path / "tags.jsonl", Tags)])
    data = calibrate.fit_run(tmp_path)
    assert not data["fitted"] and "too few vote-decided labels" in data["note"] and "0 on" in data["note"]
    assert not (tmp_path / calibrate.PLOT_FILE).exists()
    assert calibrate.after_vote(tmp_path, 0.7)["fitted"] is False
    with pytest.raises(KatdataError, match="holds no fit .*too few"):
        calibrate.load_fit(tmp_path)
    assert calibrate.card_lines(tmp_path)[2].startswith("No fit: too few")


@pytest.mark.parametrize("content, why", [(None, "not found"), ("{oops", "not JSON"), ('{"a": 1}', "not a calibration"),
                                          ('{"fitted": true, "method": "logistic", "n": 3}', "malformed")])
def test_bad_fit_file_is_one_clear_line_at_recipe_load(tmp_path, content, why):
    from katdata import stage_command
    from katdata.recipe import load_recipe

    fit = tmp_path / "calibration.json"
    if content is not None:
        fit.write_text(content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    with pytest.raises(KatdataError, match=f"tag.calibration.*{why}"):
        load_recipe(recipe, [f"tag.calibration={fit}"])
    (tmp_path / "queries.jsonl").write_text('{"id": "a", "query": "2+2?"}\n')
    with pytest.raises(KatdataError, match=f"tag.calibration.*{why}"):
        stage_command.main("tag", [str(tmp_path), "--config", str(recipe), "--no-use-llm", "--calibration", str(fit)])


def test_card_section_and_cli(tmp_path, capsys):
    import sklearn  # noqa: F401  (the local extra installs it: a missing one is a failure, not a skip)
    from katdata.cli import main

    make_run(tmp_path, seed=3)
    assert main(["calibrate", str(tmp_path), "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert '"folds": 3' in out and "calibration.json" in out
    lines = calibrate.card_lines(tmp_path)
    assert lines[0] == "## Tagger calibration" and f"![Tagger reliability]({calibrate.PLOT_FILE})" in lines
    assert sum(line.startswith("| raw tagger |") or line.startswith("| logistic |") for line in lines) == 2
    folder = tmp_path / "export"
    folder.mkdir()
    calibrate.copy_plot(tmp_path, folder)
    assert (folder / calibrate.PLOT_FILE).is_file()


def test_export_card_shows_the_fit_and_its_plot(tmp_path):
    import sklearn  # noqa: F401  (the local extra installs it: a missing one is a failure, not a skip)
    from katdata.export import ExportConfig
    from katdata.export import run as export_run
    from demo_data import demo_records

    make_run(tmp_path, seed=1)
    calibrate.fit_run(tmp_path)
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(6, 6, seed=3))
    export_run(ExportConfig(), tmp_path)
    card = (tmp_path / "export" / "README.md").read_text()
    section = card[card.index("## Tagger calibration"):]
    assert "| raw tagger |" in section and f"({calibrate.PLOT_FILE})" in section
    assert (tmp_path / "export" / calibrate.PLOT_FILE).stat().st_size > 5000


def test_vote_stage_of_the_pipeline_fits_the_tagger(tmp_path):
    """The vote stage votes real-query samples (verdicts from the law) and ends with the fit."""
    import sklearn  # noqa: F401  (the local extra installs it: a missing one is a failure, not a skip)
    from katdata import pipeline
    from katdata.recipe import load_recipe
    from katdata.records import Attempt

    rows = make_run(tmp_path, seed=4)
    (tmp_path / "votes.jsonl").unlink()
    with RowWriter(tmp_path / "samples.jsonl") as w:  # think-off is right only where the law says off
        w.write_all([Attempt(id=t.id, index=i, mode=m, text="x", answer="1", answer_class="1", ok=True,
                             correct=(m == "on" or not law(t)))
                     for t in rows for m in ("on", "off") for i in range(2)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsample: {n: 2}\nvote: {n: 2, explore_share: 0.0}\n")
    summary = pipeline.run(load_recipe(recipe), tmp_path, start="vote", until="vote")
    got = summary["stages"]["vote"]["calibration"]
    assert got["fitted"] and got["n"] == len(rows) and got["labels"]["on"] == sum(map(law, rows))
    assert got["cv_agreement"][got["method"]] > got["cv_agreement"]["raw"]
    assert calibrate.load_fit(tmp_path).data["n"] == len(rows)


@pytest.mark.slow
def test_real_run_reports_its_vote_decided_labels(tmp_path):
    """The embedded model from tag to vote on real queries: the vote stage ends with calibration.json,
    whose counts add up to the votes; a 135M model gets few samples right, so it usually says 'too few'."""
    from katdata import pipeline
    from katdata.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
name: real
seed: 1
data:
  sources:
    - {name: gsm8k, limit: 4}
    - {name: fanoutqa-hop, limit: 4}
engines:
  default: {backend: transformers, model: embedded, batch_size: 16}
tag: {max_tokens: 32, rule_weight: 0.8}
solve: {queries: not_off_candidates, rounds: 0, max_tokens: 32, critic_max_tokens: 8}
sample: {n: 2, rounds: [2], max_tokens_on: 48, max_tokens_off: 24, top_p: 1.0}
vote: {n: 2, none_correct: prior}
""")
    summary = pipeline.run(load_recipe(recipe), tmp_path / "run", until="vote")
    got = summary["stages"]["vote"]["calibration"]
    data = json.loads((tmp_path / "run" / "calibration.json").read_text())
    votes = list(read_rows(tmp_path / "run" / "votes.jsonl", Vote))
    assert data["n"] + sum(data["excluded"].values()) == len(votes) == 8
    assert got["n"] == data["n"] == sum(not v.reason.startswith("no correct sample") for v in votes)
    assert got["fitted"] == data["fitted"] and (data["fitted"] or "too few" in data["note"])
    tags = list(read_rows(tmp_path / "run" / "tags.jsonl", Tags))
    assert all(t.p_llm is not None for t in tags if t.llm_error is None)  # the LLM's own p is kept for a fit
