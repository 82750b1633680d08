"""Recipes: every shipped recipe validates; typos, overrides and bad input fail clearly and early."""

import json
from pathlib import Path

import pytest

from katdata.cli import main
from katdata.errors import KatdataError
from katdata.pipeline import run
from katdata.recipe import Recipe, describe, dump_recipe, load_recipe
from katdata.recipe_registry import packaged

RECIPES = sorted(packaged().values())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # what openai_server's first line sets
    if "previous_round:" in path.read_text("utf-8"):  # a later round reads round one's run folder and adapter
        monkeypatch.chdir(tmp_path)
        adapter = tmp_path / "runs/quickstart/train/adapter"
        adapter.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # what the checks look for
            (adapter / name).write_text("{}")
        for name in ("queries.jsonl", "tags.jsonl"):
            (tmp_path / "runs/quickstart" / name).write_text("")
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first, second = path.read_text("utf-8").splitlines()[:2]
    assert first.startswith("# ") and "katdata run" not in first, "first line: what it does (katdata ls shows it)"
    assert second.startswith("# ") and f"katdata run {path.stem}" in second, "second line: the command that runs it"


def test_recipes_are_in_the_package_and_the_top_level_folder_is_gone():
    assert {p.stem for p in RECIPES} >= {"quickstart", "quickstart_round2", "rl_quickstart", "gsm8k_vllm",
                                         "humaneval_vllm", "openai_server", "train_only"}
    assert all(p.parent.name == "recipes" and p.parent.parent.name == "katdata" for p in RECIPES)
    assert not (Path(__file__).parent.parent / "recipes").exists()


def test_quickstart_is_every_stage_on_real_data():
    r = load_recipe(packaged()["quickstart"])
    assert r.train is not None and r.eval is not None
    assert {s.name for s in r.data.sources} == {"gsm8k", "gsm8k-calc", "fanoutqa-hop"}
    assert 30 <= sum(s.limit for s in r.data.sources) <= 48
    assert r.engines["default"].backend == "transformers" and r.engines["default"].model == "embedded"


def test_every_field_has_help_text():
    missing = [key for key, text in describe(Recipe) if not text]
    assert missing == []


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, "utf-8")
    return path


def test_misspelt_key_names_path_and_nearest(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k, limit: 2}]\nsample:\n  temprature: 0.5\n")
    with pytest.raises(KatdataError, match=r"unknown key 'sample.temprature'; did you mean 'sample.temperature'"):
        load_recipe(path)
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nengines:\n  default:\n    modle: x\n")
    with pytest.raises(KatdataError, match=r"did you mean 'engines.default.model'"):
        load_recipe(path)


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k, limit: 2}]\n")
    r = load_recipe(path, ["sample.n=3", "vote.n=3", "tag.use_llm=false", "sample.delta=0.25", "vote.delta=0.25",
                           "engines.default.backend=openai", "engines.default.base_url=http://127.0.0.1:9/v1",
                           "engines.default.model=org/m"])  # a served model's name: never looked up on the Hub
    assert (r.sample.n, r.tag.use_llm, r.vote.delta, r.engines["default"].model) == (3, False, 0.25, "org/m")
    with pytest.raises(KatdataError, match="sample.nn"):
        load_recipe(path, ["sample.nn=3"])


def test_unknown_backend_is_a_recipe_error(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nengines:\n  default:\n    backend: tgi\n")
    with pytest.raises(KatdataError, match="engines.default.backend"):
        load_recipe(path)


def test_secrets_never_reach_the_saved_recipe(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nreview:\n  api_key: s3cr3t-key\n")
    assert "s3cr3t-key" not in dump_recipe(load_recipe(path))


def test_saved_recipe_masks_credentials_only(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nengines:\n  default:\n    backend: openai\n"
                 "    base_url: http://me:pa55word@127.0.0.1:8000/v1\n    api_key_env: MY_KEY\n"
                 "sample:\n  max_tokens_on: 77\n")
    saved = dump_recipe(load_recipe(path))
    assert "pa55word" not in saved and "http://me:<redacted>@127.0.0.1:8000/v1" in saved
    assert "max_tokens_on: 77" in saved and "api_key_env: MY_KEY" in saved


@pytest.mark.parametrize("data, msg", [
    ("data:\n  path: missing.jsonl\n", "data.path"),
    ("data:\n  path: q.jsonl\n", "q.jsonl:2"),
    ("data:\n  path: q.jsonl\n  fields: {query: question}\n", "field 'question'"),
])
def test_bad_input_fails_before_any_model_and_leaves_no_run_folder(tmp_path, data, msg):
    (tmp_path / "q.jsonl").write_text('{"query": "ok"}\n{"query": broken\n', "utf-8")
    path = write(tmp_path, data)
    run_dir = tmp_path / "run"
    with pytest.raises(KatdataError, match=msg):
        run(load_recipe(path), run_dir)
    assert not run_dir.exists()


def test_cli_run_load_stage_and_validate(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "a", "query": "2+2?", "reference": "4"}) + "\n", "utf-8")
    path = write(tmp_path, "name: t\ndata:\n  path: q.jsonl\n")
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--until", "decontaminate"]) == 0
    rows = (tmp_path / "run" / "queries.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["id"] == "a"
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["load"]["rows_out"] == 1
    assert main(["run", str(path), "--until", "nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_vote_settings_must_match_sampling(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nsample: {n: 4}\nvote: {n: 8}\n")
    with pytest.raises(KatdataError, match="vote.n and vote.delta"):
        load_recipe(path)


def test_duplicate_keys_empty_and_non_utf8_recipes(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nsample:\n  n: 2\n  n: 4\n")
    with pytest.raises(KatdataError, match=r"r.yaml:5: not valid YAML: duplicate key 'n' \(first on line 4\)"):
        load_recipe(path)
    for text in ("", "# only a comment\n"):
        path = write(tmp_path, text)
        with pytest.raises(KatdataError, match="r.yaml: the recipe is empty"):
            load_recipe(path)
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(KatdataError, match=r"r.yaml:1: not UTF-8"):
        load_recipe(path)


def test_errors_name_the_line_or_the_set_argument(tmp_path):
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\nsample:\n  top_p: 2\n")
    with pytest.raises(KatdataError, match=r"r.yaml:4: sample.top_p: 2 is out of range \(allowed: > 0.0 and <= 1.0\)"):
        load_recipe(path)
    path = write(tmp_path, "data:\n  sources: [{name: gsm8k}]\n")
    with pytest.raises(KatdataError) as info:
        load_recipe(path, ["sample.top_p=2"])
    assert str(info.value).startswith("--set 'sample.top_p=2': sample.top_p") and "r.yaml" not in str(info.value)
    with pytest.raises(KatdataError, match=r"--set 'sample.engine=big': sample.engine: no engine named 'big'"):
        load_recipe(path, ["sample.engine=big"])


def test_preflight_finds_every_engine_reference():
    from katdata.preflight import recipe_problems

    r = Recipe.model_validate({"data": {"sources": [{"name": "gsm8k"}]}, "tag": {"engine": "t"},
                               "solve": {"solver_engine": "s", "thinker_engine": "default"},
                               "judge": {"engine": "j"}, "eval": {"engine": "e", "adapted_engine": "a"}})
    keys = {key for key, _ in recipe_problems(r)}
    assert keys == {"tag.engine", "solve.solver_engine", "judge.engine", "eval.engine", "eval.adapted_engine"}
