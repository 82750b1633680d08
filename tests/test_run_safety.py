"""Nothing silently dropped, no half-changed run folders (issue 23 §2, §4, §5), through the real CLI.

Each refusal is one line on stderr with its exit code, before any model loads, and leaves the run
folder as it was (or makes none).
"""

import json
import time

import pytest

from katdata.cli import main

RECIPE = "name: t\nrun_dir: runs/{name}\ndata:\n  path: q.jsonl\n"
Q = '{"id": "a", "query": "2+2?", "solution": "4"}\n{"id": "b", "query": "3+3?", "solution": "6"}\n'


def write(root, files: dict) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content, "utf-8")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KATDATA_DEBUG", raising=False)
    write(tmp_path, {"r.yaml": RECIPE, "q.jsonl": Q})
    return tmp_path


# ---- §2: nothing silently dropped -------------------------------------------------------------------------

@pytest.mark.parametrize("key, column", [("reference", "answer"), ("id", "qid"), ("system", "sys"), ("kind", "type")])
def test_field_map_naming_a_missing_column_is_refused(here, capsys, key, column):
    assert main(["run", "r.yaml", "--until", "load", "--set", f"data.fields.{key}={column}"]) == 2
    line = one_line(capsys)
    assert f"'{column}'" in line and f"data.fields.{key}" in line and "columns: id, query, solution" in line
    assert "q.jsonl" in line and not (here / "runs").exists()


def test_field_map_naming_a_present_column_loads_it(here, capsys):
    assert main(["run", "r.yaml", "--until", "decontaminate", "--set", "data.fields.reference=solution"]) == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (here / "runs/t/queries.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["4", "6"]


def test_default_columns_stay_optional(here, capsys):
    """No 'reference' or 'kind' column and no field map: the queries load (references null), as before."""
    assert main(["run", "r.yaml", "--until", "decontaminate"]) == 0, capsys.readouterr()
    assert (here / "runs/t/queries.jsonl").is_file()


def test_rounds_above_n_are_refused_not_clipped(here, capsys):
    assert main(["run", "r.yaml", "--set", "sample.n=2", "--set", "vote.n=2", "--set", "sample.rounds=[1, 2, 4]"]) == 2
    line = one_line(capsys)
    assert "sample.rounds" in line and "n=2" in line and "[1, 2]" in line
    assert not (here / "runs").exists()


def test_default_rounds_end_at_n_and_the_saved_recipe_loads(here, capsys):
    from katdata.recipe import dump_recipe, load_recipe

    from katdata.sample import schedule

    recipe = load_recipe(here / "r.yaml", ["sample.n=2", "vote.n=2"])
    assert schedule(recipe.sample) == [2]
    (here / "saved.yaml").write_text(dump_recipe(recipe))
    assert schedule(load_recipe(here / "saved.yaml").sample) == [2]


LONG = " ".join(f"word{i}" for i in range(400))


def long_files(here):
    rows = [{"id": "short", "query": "2+2?"}, {"id": "long1", "query": LONG}, {"id": "long2", "query": LONG + " x"}]
    write(here, {"q.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                 "r.yaml": RECIPE + "engines:\n  default:\n    max_model_len: 600\n"})


def test_query_longer_than_the_context_is_refused_at_load(here, capsys, embedded_model):
    long_files(here)
    t0 = time.perf_counter()
    assert main(["run", "r.yaml"]) == 2
    line = one_line(capsys)
    assert "2 queries do not fit engine 'default'" in line and "long1, long2" in line and "600 tokens" in line
    assert "data.truncate_too_long" in line and not (here / "runs").exists()
    assert time.perf_counter() - t0 < 30  # a tokenizer, no model


def test_query_longer_than_the_context_is_cut_when_the_recipe_says_so(here, capsys, embedded_model, tokenizer):
    long_files(here)
    assert main(["run", "r.yaml", "--until", "decontaminate", "--set", "data.truncate_too_long=true"]) == 0
    rows = {r["id"]: r for r in map(json.loads, (here / "runs/t/queries.jsonl").read_text().splitlines())}
    assert rows["short"]["query"] == "2+2?" and "truncated_from_tokens" not in rows["short"]["meta"]
    budget = 600 - 384 - 64  # context - the longest reply (sample.max_tokens_on, solve.max_tokens) - template
    for qid in ("long1", "long2"):
        assert rows[qid]["meta"]["truncated_from_tokens"] > budget
        assert len(tokenizer(rows[qid]["query"], add_special_tokens=False)["input_ids"]) <= budget
        assert LONG.startswith(rows[qid]["query"][:100])
    summary = json.loads((here / "runs/t/summary.json").read_text())
    assert summary["stages"]["load"]["truncated"] == 2


# ---- §4: a broken summary.json is the user's to fix, not a bug ---------------------------------------------

@pytest.mark.parametrize("content, text", [('{"stages": {"load": {"done": tr', "broken JSON"),
                                           ('["not", "a", "summary"]', "not a katdata summary"),
                                           ('{"stages": {"load": 5}}', "not a katdata summary"),
                                           ("", "broken JSON")])
def test_truncated_or_foreign_summary_is_one_line_exit_3(here, capsys, content, text):
    assert main(["run", "r.yaml", "--until", "load"]) == 0
    (here / "runs/t/summary.json").write_text(content)
    before = tree(here / "runs")
    assert main(["run", "r.yaml"]) == 3
    line = one_line(capsys)
    assert "summary.json" in line and text in line and "--run-dir" in line
    assert tree(here / "runs") == before


# ---- §5: no half-changed run folders ----------------------------------------------------------------------

@pytest.mark.parametrize("stage, missing", [("vote", "samples.jsonl"), ("judge", "votes.jsonl"),
                                            ("export", "records.jsonl")])
def test_from_a_stage_whose_input_was_never_made_changes_nothing(here, capsys, stage, missing):
    assert main(["run", "r.yaml", "--until", "load"]) == 0
    before = tree(here / "runs")
    assert main(["run", "r.yaml", "--from", stage]) == 3
    line = one_line(capsys)
    assert f"{stage} reads {missing}" in line and "has not made" in line
    assert tree(here / "runs") == before  # summary.json and recipe.yaml as they were


def test_stage_input_removed_or_edited_by_hand_is_named(here, capsys):
    """decontaminate's queries.jsonl edited (then removed) after it finished: --from tag names the file."""
    assert main(["run", "r.yaml", "--until", "decontaminate"]) == 0
    queries = here / "runs/t/queries.jsonl"
    text = queries.read_text()
    queries.write_text(text.replace("2+2?", "2+3?"))
    before = tree(here / "runs")
    assert main(["run", "r.yaml", "--from", "tag"]) == 3
    line = one_line(capsys)
    assert "queries.jsonl: changed since the decontaminate stage wrote it" in line and "--from decontaminate" in line
    assert tree(here / "runs") == before
    queries.unlink()
    assert main(["run", "r.yaml", "--from", "tag"]) == 3
    assert "queries.jsonl: removed since the decontaminate stage wrote it" in one_line(capsys)
    queries.write_text(text)  # put back as written: the check passes (the tag stage would now run)
    from katdata.pipeline import _check_stage_inputs
    from katdata.recipe import load_recipe
    from katdata.run_folder import Summary

    _check_stage_inputs(load_recipe("r.yaml"), here / "runs/t", Summary(here / "runs/t/summary.json"),
                        ["tag", "solve"], ["tag", "solve"], [])


def test_unreachable_server_leaves_no_run_folder(here, capsys):
    """An openai engine whose server never answers: the run fails and the folder it created is gone."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write(here, {"r.yaml": RECIPE + f"engines:\n  default:\n    backend: openai\n    model: m\n"
                                    f"    base_url: http://127.0.0.1:{port}/v1\n    max_retries: 0\n    timeout_s: 5\n"
                                    "    extra: {unavailable_s: 1}\n"
                                    })
    assert main(["run", "r.yaml", "--until", "tag"]) == 4
    assert "127.0.0.1" in one_line(capsys)
    assert not (here / "runs").exists()
