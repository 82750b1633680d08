"""Reruns never mix configurations, and a failed or empty run never leaves the run folder half-changed.

Real runs through the CLI (``python -m katdata`` in a subprocess) with the embedded model on the
transformers backend, on four real queries (GSM8K and FanOutQA) read from a file next to the recipe.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from katdata import fingerprint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """\
name: tiny
seed: 3
data: {path: queries.jsonl}
engines:
  default: {backend: transformers, model: embedded, batch_size: 8}
tag: {max_tokens: 16, batch_size: 4}
solve: {rounds: 0, max_tokens: 24, critic_max_tokens: 8, chunk_size: 4}
sample: {n: 2, rounds: [2], max_tokens_on: 24, max_tokens_off: 16, chunk: 4}
vote: {n: 2, none_correct: prior}
judge: {writer: tags}
assemble: {reference_fallback: true, accept_imbalance: true}  # a 135M model: think-on content may be missing
export: {test_size: 0.25, plot: false}
"""
STAGE_FILES = ["queries.jsonl", "tags.jsonl", "solve.jsonl", "samples.jsonl", "votes.jsonl", "judges.jsonl",
               "records.jsonl", "rejects.jsonl"]


def katdata(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "katdata", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("katdata: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with the recipe and its queries file, and one finished run of it in ``a``."""
    from katdata import sources

    home = tmp_path_factory.mktemp("project")
    queries = sources.load("gsm8k", 2, seed=1) + sources.load("fanoutqa-hop", 2, seed=1)
    (home / "queries.jsonl").write_text("".join(
        json.dumps({"id": q.id, "query": q.query, "reference": q.reference, "kind": q.kind}) + "\n"
        for q in queries), "utf-8")
    (home / "tiny.yaml").write_text(RECIPE, "utf-8")
    ok(katdata("run", "tiny.yaml", "--run-dir", "a", cwd=home))
    return home


def copy_run(project: Path, name: str) -> Path:
    dst = project / name
    shutil.copytree(project / "a", dst)
    return dst


@pytest.mark.timeout(1500)
def test_saved_recipe_reruns_into_identical_files(project, tmp_path):
    saved = project / "a" / "recipe.yaml"
    doc = yaml.safe_load(saved.read_text("utf-8"))
    assert doc["tag"]["max_tokens"] == 16 and doc["sample"]["max_tokens_on"] == 24  # settings, not secrets
    assert Path(doc["data"]["path"]).is_absolute() and Path(doc["data"]["path"]).is_file()
    assert "<redacted>" not in saved.read_text("utf-8")
    card = (project / "a" / "export" / "README.md").read_text("utf-8")
    assert "max_tokens: 16" in card and '"completion_tokens"' in card  # the card keeps settings and token counts
    assert "fingerprints" not in card

    elsewhere = tmp_path / "elsewhere"  # another working directory: the data path must still resolve
    elsewhere.mkdir()
    ok(katdata("run", saved, "--run-dir", project / "b", cwd=elsewhere))
    a, b = project / "a", project / "b"
    for name in STAGE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"
    data_a, data_b = snapshot(a / "export" / "data"), snapshot(b / "export" / "data")
    assert data_a and data_a == data_b
    assert (b / "recipe.yaml").read_bytes() == saved.read_bytes()


def test_rerun_with_the_same_or_speed_only_settings_changes_nothing(project):
    before = snapshot(project / "a")
    ok(katdata("run", "tiny.yaml", "--run-dir", "a", cwd=project))
    ok(katdata("run", "tiny.yaml", "--run-dir", "a", "--set", "engines.default.batch_size=2",
               "--set", "engines.default.concurrency=4", "--set", "engines.default.num_threads=1", cwd=project))
    assert snapshot(project / "a") == before


def test_changed_settings_of_a_finished_stage_stop_before_any_model_loads(project):
    before = snapshot(project / "a")
    line = error_line(katdata("run", "tiny.yaml", "--run-dir", "a", "--set", "sample.n=3", "--set", "vote.n=3",
                              cwd=project))
    assert "sample.n: 2 -> 3" in line  # the first stale stage names its keys; the later ones are redone with it
    assert "--from sample" in line and "--run-dir" in line
    # the engine's dtype changed: named, and nothing loads the model
    line = error_line(katdata("run", "tiny.yaml", "--run-dir", "a", "--set", "engines.default.dtype=float32",
                              cwd=project))
    assert 'engines.default.dtype: "auto" -> "float32"' in line and "--from tag" in line
    assert snapshot(project / "a") == before


def test_a_changed_input_file_makes_the_stage_stale(project):
    run = copy_run(project, "edited")
    votes = (run / "votes.jsonl").read_text("utf-8").splitlines(keepends=True)
    (run / "votes.jsonl").write_text("".join(votes[:-1]), "utf-8")
    before = snapshot(run)
    line = error_line(katdata("run", "tiny.yaml", "--run-dir", run, cwd=project))
    assert "judge: input votes.jsonl changed" in line and "--from judge" in line
    assert snapshot(run) == before


def test_until_before_from_is_refused_and_moves_nothing(project):
    before = snapshot(project / "a")
    line = error_line(katdata("run", "tiny.yaml", "--run-dir", "a", "--from", "solve", "--until", "tag", cwd=project))
    assert "--until tag comes before --from solve" in line
    assert snapshot(project / "a") == before and not (project / "a" / "old").exists()


def test_a_from_run_that_fails_on_its_engine_leaves_the_stage_to_run_again(project):
    run = copy_run(project, "failed")
    import shutil

    from katdata.model import embedded_path

    bad_model = project / "not-a-model"  # looks like a model folder (so preflight lets it through), but loads none
    bad_model.mkdir(exist_ok=True)
    (bad_model / "config.json").write_text("{}")
    (bad_model / "model.safetensors").write_bytes(b"not weights")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(embedded_path() / name, bad_model / name)
    bad = ["--set", "judge.writer=llm", "--set", "judge.engine=bad", "--set", f"engines.bad.model={project}/not-a-model"]
    proc = katdata("run", "tiny.yaml", "--run-dir", run, "--from", "judge", *bad, cwd=project)
    assert proc.returncode == 4 and "not-a-model" in proc.stderr, proc.stderr[-2000:]  # an engine error
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["judge"]["done"] is False  # started, not finished
    assert "assemble" not in summary["stages"] and "export" not in summary["stages"]
    moved = [p.relative_to(run / "old").parts[1] for p in (run / "old").glob("*/*")]
    assert sorted(moved) == ["export", "judges.jsonl", "records.jsonl", "rejects.jsonl"]
    assert not (run / "judges.jsonl").is_file() or (run / "judges.jsonl").stat().st_size == 0

    ok(katdata("run", "tiny.yaml", "--run-dir", run, cwd=project))  # the same command without the bad engine
    for name in ("judges.jsonl", "records.jsonl", "rejects.jsonl"):
        assert (run / name).read_bytes() == (project / "a" / name).read_bytes(), name
    summary = json.loads((run / "summary.json").read_text())
    assert all(summary["stages"][s]["done"] for s in ("judge", "assemble", "export"))


def test_from_keeps_earlier_outputs_and_saves_a_recipe_that_differs_from_them_apart(project):
    run = copy_run(project, "partial")
    ok(katdata("run", "tiny.yaml", "--run-dir", run, "--from", "export", "--set", "export.test_size=0.5", cwd=project))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["export"]["test_size"] == 0.5
    ok(katdata("run", "tiny.yaml", "--run-dir", run, "--from", "export", "--set", "tag.max_tokens=20", cwd=project))
    # tags.jsonl was made with max_tokens 16: recipe.yaml still says so, this recipe is kept beside it
    assert yaml.safe_load((run / "recipe.yaml").read_text())["tag"]["max_tokens"] == 16
    assert yaml.safe_load((run / "recipe.export.yaml").read_text())["tag"]["max_tokens"] == 20
    assert len(list((run / "old").iterdir())) == 2  # two --from runs, only export moved aside each time
    assert {p.name for p in (run / "old").glob("*/*")} == {"export"}


def test_a_finished_stage_whose_file_is_gone_runs_again_with_the_later_ones(project):
    """A crash between moving a stage's file aside and saving summary.json: the stage is not skipped."""
    run = copy_run(project, "lost")
    (run / "judges.jsonl").unlink()
    ok(katdata("run", "tiny.yaml", "--run-dir", run, cwd=project))
    for name in ("judges.jsonl", "records.jsonl", "rejects.jsonl"):
        assert (run / name).read_bytes() == (project / "a" / name).read_bytes(), name
    assert sorted(p.name for p in (run / "old").glob("*/*")) == ["export", "records.jsonl", "rejects.jsonl"]


def test_a_fresh_run_that_fails_on_its_engine_leaves_no_folder(project):
    proc = katdata("run", "tiny.yaml", "--run-dir", "fresh/run", "--set", "engines.default.model=/no/such/model",
                   cwd=project)
    assert proc.returncode == 2 and "/no/such/model" in proc.stderr
    assert not (project / "fresh").exists()


def test_commands_on_a_missing_run_folder_create_nothing(tmp_path):
    for cmd in ("eval", "train", "export"):  # a run-folder error: exit 3, one line, nothing created
        proc = katdata(cmd, "nosuchdir", *(("--out", "a/b/x") if cmd == "export" else ()), cwd=tmp_path)
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        assert "nosuchdir: no such run folder" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = katdata("export", "empty", "--out", "a/b/x", cwd=tmp_path)
    assert proc.returncode == 3 and "records.jsonl" in proc.stderr and "assemble" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.mark.slow  # trains and evaluates twice: minutes on a CPU (make test-slow)
@pytest.mark.timeout(1500)
def test_train_and_eval_do_not_reuse_outputs_made_with_other_settings(project):
    run = copy_run(project, "trained")
    train = ["--set", "max_steps=2", "--set", "batch_size=1", "--set", "holdout=1", "--set", "max_length=384"]
    ok(katdata("train", run, *train, cwd=project))
    adapter = snapshot(run / "train" / "adapter")
    ok(katdata("train", run, *train, cwd=project))  # same settings: the finished adapter is kept
    line = error_line(katdata("train", run, *train, "--set", "max_steps=3", cwd=project))
    assert "train.max_steps: 2 -> 3" in line and "--redo" in line
    assert snapshot(run / "train" / "adapter") == adapter

    evals = ["--set", "limit=1", "--set", "max_tokens=8", "--set", "forced=false", "--set", "plots=false"]
    ok(katdata("eval", run, *evals, cwd=project))
    before = snapshot(run / "eval")
    line = error_line(katdata("eval", run, *evals, "--set", "max_tokens=12", cwd=project))
    assert "eval.max_tokens: 8 -> 12" in line
    assert snapshot(run / "eval") == before


# ---------------------------------------------------------------- the fingerprint itself (pure logic)
def test_a_setting_added_later_at_its_off_value_is_no_change():
    """A run folder made before katdata had a setting: the setting at its off value (None, False, 0) keeps the old
    behaviour, so it does not block a rerun; any other value is named."""
    old = {"settings": {"eval.max_tokens": 256}}
    for off in (None, False, 0, 0.0):
        assert fingerprint.compare(old, {"settings": {"eval.max_tokens": 256, "eval.new_knob": off}}) == []
    assert fingerprint.compare(old, {"settings": {"eval.max_tokens": 256, "eval.frequency_penalty": 0.3}}) == [
        "eval.frequency_penalty: (unset) -> 0.3"]
    assert fingerprint.compare({"settings": {"eval.x": 0.3}}, {"settings": {"eval.x": 0.0}}) == ["eval.x: 0.3 -> 0.0"]


def test_fingerprint_names_changes_and_leaves_out_speed_knobs(tmp_path):
    from katdata.recipe import Recipe
    from katdata.stages import get

    a = Recipe.model_validate({"data": {"path": "q.jsonl"}, "sample": {"n": 4}, "vote": {"n": 4}})
    b = Recipe.model_validate({"data": {"path": "q.jsonl"}, "sample": {"n": 6}, "vote": {"n": 6},
                               "engines": {"default": {"batch_size": 3, "concurrency": 2, "num_threads": 2,
                                                       "dtype": "float32"}}})
    diff = fingerprint.compare({"settings": fingerprint.stage_settings(a, get("sample"))},
                               {"settings": fingerprint.stage_settings(b, get("sample"))})
    assert diff == ["sample.n: 4 -> 6", 'engines.default.dtype: "auto" -> "float32"']
    tag = fingerprint.compare({"settings": fingerprint.stage_settings(a, get("tag"))},
                              {"settings": fingerprint.stage_settings(b, get("tag"))})
    assert tag == ['engines.default.dtype: "auto" -> "float32"']  # the tagger's engine changed, not its section

    f = tmp_path / "x.jsonl"
    f.write_text("1\n")
    one = fingerprint.hash_path(f)
    f.write_text("2\n")
    assert fingerprint.hash_path(f) != one and fingerprint.hash_path(tmp_path / "nope") == "missing"
    assert fingerprint.compare({"inputs": {"x.jsonl": one}}, {"inputs": {"x.jsonl": fingerprint.hash_path(f)}}) == [
        "input x.jsonl changed"]


def test_stage_commands_resume_refuse_and_redo_like_run(project):
    """`katdata STAGE RUN` goes through run's checks: a finished stage with the same settings is left as it
    is, other settings are refused before anything changes, and --redo recomputes (the old files kept)."""
    run = copy_run(project, "stagecmd")
    before = snapshot(run)
    ok(katdata("vote", run, cwd=project))  # the run's own recipe.yaml, same settings: done already
    assert snapshot(run) == before
    line = error_line(katdata("vote", run, "--none-correct", "drop", "--set", "explore_share=0.5", cwd=project))
    assert "vote (finished) was made with other settings" in line and "rerun with --redo" in line
    assert "--run-dir" not in line  # the stage command has none: copy the folder to keep it
    assert 'vote.none_correct: "prior" -> "drop"' in line and "vote.explore_share" in line
    line = error_line(katdata("sample", run, "--temperature", "0.5", cwd=project))  # refused before a model loads
    assert "sample (finished)" in line and "sample.temperature: 0.8 -> 0.5" in line
    assert snapshot(run) == before
    proc = ok(katdata("vote", run, "--none-correct", "drop", "--redo", cwd=project))
    assert json.loads(proc.stdout)["rows_in"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fingerprints"]["vote"]["settings"]["vote.none_correct"] == "drop"
    assert "judge" not in summary["stages"] and not (run / "records.jsonl").exists()  # later stages moved aside
    kept = {p.name for p in (run / "old").rglob("*.jsonl")}
    assert {"votes.jsonl", "judges.jsonl", "records.jsonl"} <= kept
    ok(katdata("judge", run, cwd=project))
    ok(katdata("assemble", run, cwd=project))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["assemble"]["done"] and (run / "records.jsonl").is_file()
    before = snapshot(run)
    assert "done already" in ok(katdata("assemble", run, cwd=project)).stderr
    assert snapshot(run) == before


def test_stage_command_needs_a_recipe(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "queries.jsonl").write_text('{"id": "a", "query": "2+2?"}\n')
    line = error_line(katdata("tag", "r", cwd=tmp_path))
    assert "recipe.yaml" in line and "--config" in line
    proc = katdata("tag", "nowhere", cwd=tmp_path)
    assert proc.returncode == 3 and "nowhere: no such run folder" in proc.stderr  # a run-folder error


def export_error(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused `katdata export` (exit 2 settings, 3 run folder; no traceback)."""
    assert proc.returncode in (2, 3) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("katdata export: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_export_command_is_the_stage_and_copies_only_checked_files(project):
    """`katdata export RUN` is the export stage with the pipeline's checks: done already with the same settings,
    refused with others (a changed `review:` policy in the recipe included: export's fingerprint covers the
    sections it declares), recomputed with --redo. `--out DIR` writes a further copy outside the run, and only
    from run files as their stages wrote them."""
    run = copy_run(project, "exportcmd")
    before = snapshot(run)
    assert "done already" in ok(katdata("export", run, cwd=project)).stderr
    line = export_error(katdata("export", run, "--format", "trl", cwd=project))
    assert "export (finished) was made with other settings" in line and 'export.format: "hf" -> "trl"' in line
    changed = yaml.safe_load((run / "recipe.yaml").read_text("utf-8"))
    changed["review"] = {"blocking": ["low_margin"]}
    (project / "blocking.yaml").write_text(yaml.safe_dump(changed), "utf-8")
    line = export_error(katdata("export", run, "--config", project / "blocking.yaml", cwd=project))
    assert "export (finished) was made with other settings" in line and "review" in line and "low_margin" in line
    assert snapshot(run) == before

    ok(katdata("export", run, "--format", "trl", "--redo", cwd=project))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fingerprints"]["export"]["settings"]["export.format"] == "trl"
    assert (run / "old").is_dir() and any((run / "old").glob("*/export/README.md"))  # the old export kept

    recorded = (run / "summary.json").read_bytes()
    ok(katdata("export", run, "--out", project / "copy", "--format", "llamafactory", cwd=project))
    assert (project / "copy" / "dataset_info.json").is_file() and (run / "summary.json").read_bytes() == recorded
    with open(run / "records.jsonl", "a", encoding="utf-8") as f:  # edited by hand since assemble wrote it
        f.write((run / "records.jsonl").read_text("utf-8").splitlines(keepends=True)[0])
    line = export_error(katdata("export", run, "--out", project / "copy2", cwd=project))
    assert "records.jsonl: changed since the assemble stage wrote it" in line
    assert not (project / "copy2").exists()
