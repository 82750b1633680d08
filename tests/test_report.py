"""The end-of-run summary (per-stage rows, the out column, the dataset line, its width, the next commands)
and the file-fed progress bars."""

import json

import pytest

from katdata.report import dataset_line, print_summary, summary_rows


def test_summary_rows_pick_counts_time_tokens_and_rejects():
    data = {"stages": {
        "tag": {"rows_in": 4, "seconds": 1.5, "tokens": {"prompt_tokens": 90, "completion_tokens": 30},
                "llm_parse_failure_rate": 0.25, "distribution": {"domain": {"math": 4}}, "done": True},
        "assemble": {"rows_in": 4, "rows_out": 3, "seconds": 0.01, "rejects": {"judge: rejected": 1}, "done": True},
        "eval": {"models": {"adapted": {"template_validity": 0.75, "mode_agreement": 1.0, "think_on_rate": 0.5}}},
    }}
    rows = summary_rows(data)
    assert rows[0][:5] == ("tag", "4", "-", "1.5", "30")
    assert "llm_parse_failure_rate=0.25" in rows[0][5] and "distribution" not in rows[0][5]
    assert rows[1][2] == "3" and "rejects: judge: rejected 1" in rows[1][5]
    assert "adapted: valid=0.75 agree=1 think_on=0.5" in rows[2][5]


def test_dataset_line_and_print(tmp_path, capsys):
    recs = [{"mode": "on", "vote": {"p_on": 1.0, "p_off": 0.0}, "provenance": {"content_source": "vote"}},
            {"mode": "off", "vote": {"p_on": 0.5, "p_off": 1.0}, "provenance": {"content_source": "reference"}},
            {"mode": "off", "vote": {"p_on": 0.0, "p_off": 0.5}, "provenance": {"content_source": "vote"}}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = dataset_line(tmp_path)
    assert "records: 3" in line and "think-on 1 (33%)" in line and "on 0.50 / off 0.50" in line
    (tmp_path / "export").mkdir()
    print_summary({"stages": {"load": {"rows_in": 3, "rows_out": 3, "seconds": 0.0}}}, tmp_path, 12.0)
    out = capsys.readouterr().out
    assert "load" in out and "records: 3" in out and f"dataset: {tmp_path / 'export'}" in out


def test_file_progress_counts_queries_and_rows_as_they_are_appended(tmp_path):
    import io
    import time

    from katdata.report import FileProgress

    path = tmp_path / "tags.jsonl"
    out = io.StringIO()
    with FileProgress([path], total=4, desc="tag", enabled=True, interval=0.05, file=out) as bar:
        with open(path, "w") as f:
            f.write('{"id": "a"}\n{"id": "a"}\n{"id": "b"}\n{"id": "c"')  # a torn last line is not counted
        deadline = time.time() + 5
        while bar.bar.n < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert bar.bar.n == 2
    assert "tag" in out.getvalue() and "2/4" in out.getvalue()
    rows = FileProgress([path], total=None, desc="sample", unit="sample", enabled=False)
    assert rows.count() == 3  # rows already written (a resumed stage) count; the torn line does not yet
    with open(path, "a") as f:
        f.write('}\n{"id": "d"}\n')
    assert rows.count() == 5


def _bar_text(out) -> str:
    """The last state a tqdm bar drew on ``out`` (it redraws after each carriage return)."""
    return out.getvalue().replace("\n", "\r").rstrip("\r").rsplit("\r", 1)[-1]


def test_file_progress_ends_at_the_final_count_even_when_written_between_polls(tmp_path):
    import io

    from katdata.report import FileProgress

    path = tmp_path / "tags.jsonl"
    out = io.StringIO()
    with FileProgress([path], total=3, desc="tag", enabled=True, interval=60, file=out):
        path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n')  # all at once, long before the next poll
    assert "3/3" in _bar_text(out) and "100%" in _bar_text(out)


def test_file_progress_below_its_upper_bound_closes_at_n_of_n_but_a_failure_shows_where_it_stopped(tmp_path):
    import io

    from katdata.report import FileProgress

    path = tmp_path / "samples.jsonl"
    out = io.StringIO()
    with FileProgress([path], total=16, desc="sample", unit="sample", enabled=True, interval=60, file=out):
        path.write_text('{"id": "a"}\n' * 10)  # voting settled early: 10 of at most 16 samples drawn
    assert "10/10" in _bar_text(out)
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with FileProgress([path], total=16, desc="sample", unit="sample", enabled=True, interval=60, file=out):
            raise RuntimeError("engine died")
    assert "10/16" in _bar_text(out)


def _stats() -> dict:
    notes = {f"stat_{i}": 0.123 * i for i in range(7)}
    return {"stages": {s: {"rows_in": 120, "rows_out": 118, "seconds": 63.2, "tokens": 40960,
                           "input": "/a/rather/long/path/to/the/run/folder/records.jsonl", **notes}
                       for s in ("load", "tag", "solve", "sample", "assemble")}}


def test_summary_table_fits_the_terminal_and_wraps_the_notes(tmp_path, capsys, monkeypatch):
    from rich.cells import cell_len

    monkeypatch.setenv("COLUMNS", "90")
    print_summary(_stats(), tmp_path, 5.0)
    lines = capsys.readouterr().out.splitlines()
    assert max(cell_len(line) for line in lines) <= 90
    assert sum("stat_6=0.738" in line for line in lines) == 5  # every note is there, wrapped, none cut
    assert any("notes" in line for line in lines[:4])


def test_summary_table_drops_the_notes_in_a_narrow_terminal(tmp_path, capsys, monkeypatch):
    from rich.cells import cell_len

    monkeypatch.setenv("COLUMNS", "60")
    print_summary(_stats(), tmp_path, 5.0)
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert len(table) == 9 and max(cell_len(line) for line in table) <= 60
    assert not any("stat_" in line for line in lines)
    assert f"notes per stage: {tmp_path / 'summary.json'}" in lines


LOG_SCRIPT = """
import logging, sys
from katdata.cli import _configure_logging
_configure_logging(sys.argv[1] == "-v")
logging.getLogger("matplotlib.category").info("categorical units")
logging.getLogger("httpx").debug("http debug")
logging.getLogger("filelock").warning("lock is stale")
logging.getLogger("katdata.tag").info("tagged 4/4")
logging.getLogger("katdata.tag").debug("tag details")
import warnings; warnings.warn("a library warns")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_other_libraries_info_only_with_verbose(verbose):
    import os
    import subprocess
    import sys

    err = subprocess.run([sys.executable, "-c", LOG_SCRIPT, "-v" if verbose else "-"], env=dict(os.environ),
                         capture_output=True, text=True, check=True).stderr
    assert "INFO katdata.tag: tagged 4/4" in err and "WARNING filelock: lock is stale" in err
    assert ("categorical units" in err) == verbose and ("tag details" in err) == verbose
    assert "http debug" not in err
    assert "WARNING py.warnings:" in err and "UserWarning: a library warns" in err


def test_file_progress_of_a_resumed_stage_starts_at_the_rows_already_written(tmp_path):
    import io

    from katdata.report import FileProgress

    path = tmp_path / "tags.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    out = io.StringIO()
    with FileProgress([path], total=4, desc="tag", enabled=True, interval=60, file=out) as bar:
        assert bar.bar.n == 2 and "2/4" in _bar_text(out)
        with open(path, "a") as f:
            f.write('{"id": "c"}\n{"id": "d"}\n')
    assert "4/4" in _bar_text(out)
def test_label_and_content_sources_and_label_vs_exported_shares(tmp_path, capsys):
    """A weak-model run: the table says who labelled, where content came from, and labels vs exported."""
    recs = [{"mode": "off", "label_source": "vote", "content_source": "sample", "vote": {"p_on": 0.0, "p_off": 1.0}},
            {"mode": "off", "label_source": "prior", "content_source": "reference", "vote": {}},
            {"mode": "on", "label_source": "prior", "content_source": "reference", "vote": {}}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = dataset_line(tmp_path)
    assert "labels: 2 tagger prior, 1 vote" in line and "content: 2 reference, 1 model sample" in line
    data = {"stages": {
        "assemble": {"rows_in": 12, "rows_out": 3, "labels": {"on": 9, "off": 3}, "records_by_mode": {"on": 1, "off": 2},
                     "label_sources": {"prior": 2, "vote": 1}, "content_sources": {"reference": 2, "sample": 1},
                     "imbalance_accepted": "assemble: mode collapse: ...", "rejects": {"assemble: no think-on content": 8}},
        "export": {"rows_in": 3, "rows_out": 3, "on": 1, "off": 2}}}
    notes = summary_rows(data)[0][5]
    assert "think-on 9 labelled (75%) -> 1 records (33%)" in notes and "think-off 3 labelled (25%) -> 2 records" in notes
    assert "labels: 2 tagger prior, 1 vote" in notes and "content: 2 reference, 1 model sample" in notes
    assert "IMBALANCE ACCEPTED" in notes and "rejects: assemble: no think-on content 8" in notes
    print_summary(data, tmp_path, 1.0)
    out = capsys.readouterr().out
    assert "modes: think-on 9 labelled (75%) -> 1 exported (33%)" in " ".join(out.split()) and "imbalance accepted" in out


def test_rounds_lines_give_label_sources_pass_rates_and_changes_per_round(tmp_path, capsys, monkeypatch):
    """A round-two run (previous_round) prints one line per round: label sources, pass rates, changed labels."""
    from katdata.report import rounds_lines

    def write_round(folder, votes, copied_from=None):
        folder.mkdir(parents=True)
        (folder / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
        stages = {"load": {"copied_from": str(copied_from)}} if copied_from else {"load": {}}
        (folder / "summary.json").write_text(json.dumps({"stages": stages}))
        return {"stages": stages}

    vote = lambda q, label, source, p_on, p_off: {"id": q, "label": label, "label_source": source,  # noqa: E731
                                                  "p_on": p_on, "p_off": p_off}
    one, two = tmp_path / "r1", tmp_path / "r1" / "round2"
    assert rounds_lines(write_round(one, [vote("a", "on", "prior", 0, 0), vote("b", "off", "vote", 0, 0.5),
                                          vote("c", "on", "prior", 0, 0)]), one) == []  # a single round: nothing
    data = write_round(two, [vote("a", "on", "vote", 1.0, 0), vote("b", "off", "vote", 0, 1.0),
                             vote("c", "off", "vote", 0, 0.5)], copied_from=one)
    lines = rounds_lines(data, two)
    assert lines[0] == f"round 1 ({one}): labels 2 tagger prior, 1 vote  mean pass rate on 0.00 / off 0.17"
    assert lines[1] == (f"round 2 ({two}): labels 3 vote  mean pass rate on 0.33 / off 0.50  "
                        "labels changed since round 1: 1 of 3")
    print_summary(data, two, 1.0)
    assert "labels changed since round 1: 1 of 3" in capsys.readouterr().out


def test_piped_summary_is_80_wide_and_follows_columns(tmp_path, capsys, monkeypatch):
    """stdout not a terminal (| cat, CI logs) and no COLUMNS: the table is 80 wide, not 150; COLUMNS decides."""
    from rich.cells import cell_len

    monkeypatch.delenv("COLUMNS", raising=False)
    print_summary(_stats(), tmp_path, 5.0)
    lines = capsys.readouterr().out.splitlines()
    assert max(cell_len(line) for line in lines) == 80
    assert any("notes" in line for line in lines[:4]) and sum("stat_6=0.738" in line for line in lines) == 5
    monkeypatch.setenv("COLUMNS", "120")
    print_summary(_stats(), tmp_path, 5.0)
    assert max(cell_len(line) for line in capsys.readouterr().out.splitlines()) == 120


def test_out_column_counts_the_rows_tag_solve_and_train_wrote():
    data = {"stages": {
        "tag": {"rows_in": 44, "rows": 44, "think_off_candidates": 20, "rows_new": 44},
        "solve": {"rows_in": 44, "attempts": 30, "queries": 24, "accepted": 21, "skipped_off_candidates": 20},
        "sample": {"rows_in": 44, "rows_out": 160, "samples_used": 150},
        "train": {"rows_in": 40, "train": 36, "heldout": 4, "steps": 30, "train_loss": 1.25},
        "rl": {"queries": 8, "steps": 4}}}
    rows = {r[0]: r for r in summary_rows(data)}
    assert [rows[s][2] for s in ("tag", "solve", "sample", "train", "rl")] == ["44", "30", "160", "36", "-"]
    assert "rows=" not in rows["tag"][5] and "attempts=" not in rows["solve"][5] and "train=" not in rows["train"][5]
    assert "accepted=21" in rows["solve"][5] and "heldout=4" in rows["train"][5] and "steps=30" in rows["train"][5]


def _made(run_dir, *paths):
    for p in paths:
        (run_dir / p).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / p).write_text("") if "." in p else (run_dir / p).mkdir()  # a file, or a folder


def test_next_steps_name_the_commands_for_what_the_run_made(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from katdata.report import next_steps

    monkeypatch.chdir(tmp_path)
    run = Path("runs/quick")
    run.mkdir(parents=True)
    assert next_steps({}, run) == []  # nothing made yet: nothing to suggest
    _made(run, "records.jsonl", "export", "train/adapter")
    recipes = tmp_path / "mine"
    recipes.mkdir()
    (recipes / "round2.yaml").write_text("name: r2\nrun_dir: runs/quick/round2\nprevious_round: runs/quick\n")
    (recipes / "other.yaml").write_text("name: other\nprevious_round: runs/elsewhere\n")
    data = {"stages": {"export": {"rows_out": 3}}}
    assert [cmd for cmd, _ in next_steps(data, run, recipes)] == [
        "katdata review push runs/quick", "katdata export runs/quick --push-to-hub USER/NAME",
        "katdata serve runs/quick", f"katdata run {recipes / 'round2.yaml'}"]
    print_summary(data, run, 3.0)
    out = capsys.readouterr().out.splitlines()
    assert out[out.index("next:") + 1:] == [f"  {cmd}   # {what}" for cmd, what in next_steps(data, run)]
    # reviewed, pushed, round two already made: only serving is left
    _made(run, "review", "round2")
    assert [cmd for cmd, _ in next_steps({"stages": {"export": {"pushed": "u/d"}}}, run, recipes)] == [
        "katdata serve runs/quick"]
    odd = tmp_path / "my runs" / "a"
    _made(odd, "train/adapter")
    assert next_steps({}, odd)[0][0] == f"katdata serve '{odd}'"  # quoted for the shell
    monkeypatch.setenv("COLUMNS", "40")  # a command too long for its comment keeps the command, whole
    print_summary({}, odd, 1.0)
    assert capsys.readouterr().out.splitlines()[-1] == f"  katdata serve '{odd}'"


def test_quickstart_suggests_its_packaged_round_two(tmp_path, capsys, monkeypatch):
    """The quickstart's folder with its adapter: round two is the packaged quickstart_round2, named as such."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    run = Path("runs/quickstart")
    _made(run, "records.jsonl", "export", "train/adapter", "eval/eval.json")
    print_summary({"stages": {}}, run, 500.0)
    out = capsys.readouterr().out.splitlines()
    assert "  katdata run quickstart_round2   # the next round, with this adapter" in out
    assert "adapter: runs/quickstart/train/adapter" in out and out[out.index("next:") + 1].startswith(
        "  katdata review push runs/quickstart")


def test_file_progress_moves_with_finished_completions_before_rows_are_written(tmp_path):
    """A stage that fits one batch writes all its rows when the batch is back: the bar moves with the
    completions the engine reports finished (report.generated), capped at the total, and ends at the rows."""
    import io
    import time

    from katdata.report import FileProgress, generated

    path = tmp_path / "tags.jsonl"
    out = io.StringIO()
    with FileProgress([path], total=4, desc="tag", enabled=True, interval=0.02, file=out) as bar:
        generated(3)  # three of the batch's four rows finished, none written yet
        deadline = time.time() + 5
        while bar.bar.n < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert bar.bar.n == 3 and "3/4" in _bar_text(out)
        generated(9)  # more completions than units (e.g. retries): never past the total
        time.sleep(0.1)
        assert bar.bar.n == 4
        path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n{"id": "d"}\n')
    assert "4/4" in _bar_text(out)
    out = io.StringIO()  # solve: several roles answer per query, so its bar counts rows only
    with FileProgress([tmp_path / "solve.jsonl"], total=4, desc="solve", enabled=True, interval=0.02, file=out) as bar:
        generated(3)
        time.sleep(0.1)
        assert bar.bar.n == 0
