"""Iterated cold start: a recipe with `previous_round` reuses round one's queries, tags and solver traces."""

import json

import pytest

from katdata import sources
from katdata.errors import KatdataError
from katdata.pipeline import run
from katdata.recipe import load_recipe


def round_one(folder, with_solve=True):
    folder.mkdir(parents=True)
    qs = sources.load("gsm8k-calc", 3, seed=0)
    (folder / "queries.jsonl").write_text("".join(q.model_dump_json() + "\n" for q in qs))
    tags = [{"id": q.id, "domain": "math", "task_type": "calculation", "difficulty": 1, "needs_reasoning": False,
             "p_reasoning": 0.2, "verifiability": "reference", "language": "en"} for q in qs]
    (folder / "tags.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tags))
    if with_solve:
        (folder / "solve.jsonl").write_text("")
    return qs


def recipe(tmp_path, previous):
    path = tmp_path / "r2.yaml"
    path.write_text(f"name: r2\nrun_dir: {tmp_path / 'r2'}\nprevious_round: {previous}\n"
                    "engines:\n  default:\n    backend: transformers\n")
    return load_recipe(path)


@pytest.mark.parametrize("with_solve", [True, False])
def test_round_two_copies_round_one_inputs_and_runs_no_model(tmp_path, with_solve):
    qs = round_one(tmp_path / "r1", with_solve)
    r = recipe(tmp_path, tmp_path / "r1")
    assert r.data is None  # round two needs no data section: its queries are round one's
    data = run(r, tmp_path / "r2", until="solve")  # the copied stages load no engine
    assert [json.loads(line)["id"] for line in open(tmp_path / "r2" / "queries.jsonl")] == [q.id for q in qs]
    assert (tmp_path / "r2" / "tags.jsonl").read_bytes() == (tmp_path / "r1" / "tags.jsonl").read_bytes()
    for stage in ("load", "tag", "solve"):
        assert data["stages"][stage]["done"] and data["stages"][stage]["copied_from"] == str(tmp_path / "r1")
    assert data["stages"]["tag"]["rows_out"] == 3
    assert (tmp_path / "r2" / "solve.jsonl").exists() == with_solve


def test_previous_round_without_tags_fails_before_anything_runs(tmp_path):
    round_one(tmp_path / "r1")
    (tmp_path / "r1" / "tags.jsonl").unlink()
    with pytest.raises(KatdataError, match=r"r2.yaml:3: previous_round: .* has no tags.jsonl"):
        recipe(tmp_path, tmp_path / "r1")
    assert not (tmp_path / "r2").exists()
