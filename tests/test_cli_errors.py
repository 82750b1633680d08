"""Bad input through the real CLI (issue 14): one line on stderr, no traceback, a fixed exit code per class.

Each case writes its files into an empty folder, runs `katdata ARGS` there (``katdata.cli.main``, the
console entry point) and checks the exit code, that stderr is exactly one line naming what is wrong,
and that no run folder was made. Exit codes: 1 check failed, 2 usage/recipe/input, 3 run folder,
4 engine, 70 internal (katdata.errors).
"""

import json
import os
import subprocess
import sys

import pytest

from katdata.cli import main
from katdata.template import render

RECIPE = "name: t\nrun_dir: runs/{name}\ndata:\n  path: q.jsonl\n"
Q = '{"id": "a", "query": "2+2?", "reference": "4"}\n'
OK_FILES = {"r.yaml": RECIPE, "q.jsonl": Q}
ON = render("on", "Needs steps.", "4", think="2+2=4")


def recipe(extra: str) -> dict:
    return {"r.yaml": RECIPE + extra, "q.jsonl": Q}


def data(name: str, content) -> dict:
    return {"r.yaml": RECIPE.replace("q.jsonl", name), name: content}


# (id, files, argv, exit code, texts the one error line must hold)
CASES = [
    # 1. no traceback ever: YAML, pydantic, KeyError, OS, Unicode, datasets errors are one line each
    ("set-yaml-error", OK_FILES, ["run", "r.yaml", "--set", "sample.n=[1"], 2, ["--set 'sample.n=[1'", "not valid YAML"]),
    ("query-system-int", data("q.jsonl", '{"query": "hi", "system": 5}\n'), ["run", "r.yaml", "--until", "load"], 2,
     ["q.jsonl:1 field 'system'", "int"]),
    ("run-dir-placeholder", {"r.yaml": RECIPE.replace("{name}", "{nme}"), "q.jsonl": Q}, ["validate", "r.yaml"], 2,
     ["r.yaml:2", "run_dir", "{nme}"]),
    ("run-dir-placeholder-run", {"r.yaml": RECIPE.replace("{name}", "{nme}"), "q.jsonl": Q}, ["run", "r.yaml"], 2,
     ["run_dir", "{nme}"]),
    ("run-dir-is-a-file", dict(OK_FILES, afile="x"), ["run", "r.yaml", "--run-dir", "afile"], 3,
     ["--run-dir afile", "not a folder"]),
    ("recipe-run-dir-is-a-file", {"r.yaml": RECIPE.replace("runs/{name}", "afile"), "q.jsonl": Q, "afile": "x"},
     ["run", "r.yaml"], 3, ["run_dir afile", "not a folder"]),
    ("latin1-recipe", {"r.yaml": "name: caf\xe9\n".encode("latin-1"), "q.jsonl": Q}, ["validate", "r.yaml"], 2,
     ["r.yaml:1", "not UTF-8"]),
    ("broken-saved-dataset", {"r.yaml": RECIPE.replace("q.jsonl", "ds"), "ds/dataset_info.json": "{broken"},
     ["run", "r.yaml", "--until", "load"], 2, ["ds", "not a readable saved dataset"]),
    ("render-on-without-think", {}, ["template", "render", "--mode", "on", "--judge", "j", "--answer", "a"], 2,
     ["template render", "think"]),
    ("render-marker-in-answer", {}, ["template", "render", "--mode", "off", "--judge", "j", "--answer", "<answer>"], 2,
     ["template render", "marker"]),
    ("parse-missing", {}, ["template", "parse", "nope.txt"], 2, ["nope.txt", "not found"]),
    ("parse-folder", {"d/x": ""}, ["template", "parse", "d"], 2, ["d: a folder"]),
    ("parse-binary", {"b.bin": b"\x7fELF\x00\x01"}, ["template", "parse", "b.bin"], 2, ["b.bin:1", "binary"]),
    ("validate-missing", {}, ["template", "validate", "nope.jsonl"], 2, ["nope.jsonl", "not found"]),
    ("validate-folder", {"d/x": ""}, ["template", "validate", "d"], 2, ["d: a folder"]),
    ("validate-binary", {"b.jsonl": b"\x00\x01"}, ["template", "validate", "b.jsonl"], 2, ["b.jsonl:1", "binary"]),
    ("train-typo", {}, ["train", ".", "--set", "maxsteps=1"], 2, ["--set 'maxsteps=1'", "did you mean 'train.max_steps'"]),
    ("eval-limit-0", {}, ["eval", ".", "--set", "limit=0"], 2, ["--set 'limit=0'", "limit", ">= 1"]),
    ("export-on-a-file", {"afile": "x"}, ["export", "afile"], 3, ["afile", "not a folder"]),
    ("train-on-a-file", {"afile": "x"}, ["train", "afile"], 3, ["afile", "not a folder"]),
    ("eval-on-a-file", {"afile": "x"}, ["eval", "afile"], 3, ["afile", "not a folder"]),
    ("review-on-a-file", {"afile": "x"}, ["review", "push", "afile"], 3, ["afile", "not a folder"]),
    ("missing-recipe", {}, ["run", "missing.yaml"], 2, ["missing.yaml", "recipe not found"]),
    ("verbose-before-eval", {}, ["-v", "eval", "nothing"], 3, ["nothing: no such run folder"]),
    ("recipe-is-a-folder", {"d/x": ""}, ["validate", "d"], 2, ["d: a folder"]),
    # 3. everything checkable is checked before a model loads
    ("sample-engine-validate", recipe("sample:\n  engine: nosuch\n"), ["validate", "r.yaml"], 2,
     ["r.yaml:6", "sample.engine", "'nosuch'", "have default"]),
    ("sample-engine-run", recipe("sample:\n  engine: nosuch\n"), ["run", "r.yaml"], 2, ["sample.engine", "'nosuch'"]),
    ("tag-engine", recipe("tag:\n  engine: taggr\nengines:\n  default: {}\n  tagger: {}\n"), ["validate", "r.yaml"], 2,
     ["tag.engine", "did you mean 'tagger'"]),
    ("critic-engine", recipe("solve:\n  critic_engine: critic\n"), ["validate", "r.yaml"], 2, ["solve.critic_engine"]),
    ("judge-engine", recipe("judge:\n  engine: big\n"), ["validate", "r.yaml"], 2, ["judge.engine", "'big'"]),
    ("eval-engine", recipe("eval:\n  engine: base\n"), ["validate", "r.yaml"], 2, ["eval.engine", "'base'"]),
    ("model-path", recipe("engines:\n  default:\n    model: /no/such/model\n"), ["validate", "r.yaml"], 2,
     ["engines.default.model", "/no/such/model"]),
    ("lora-path", recipe("engines:\n  default:\n    lora_path: ./no-adapter\n"), ["validate", "r.yaml"], 2,
     ["engines.default.lora_path"]),
    ("train-model-path", recipe("train:\n  model: ./no-model\n"), ["validate", "r.yaml"], 2, ["train.model"]),
    ("data-path", {"r.yaml": RECIPE}, ["validate", "r.yaml"], 2, ["data.path", "q.jsonl"]),
    ("negative-steps", recipe("train:\n  max_steps: -5\n"), ["validate", "r.yaml"], 2, ["train.max_steps", "-5", ">= -1"]),
    ("negative-timeout", recipe("engines:\n  default:\n    timeout_s: -1\n"), ["validate", "r.yaml"], 2,
     ["engines.default.timeout_s", "> 0"]),
    ("verify-timeout", recipe("sample:\n  verify:\n    math_timeout_s: 0\n"), ["validate", "r.yaml"], 2,
     ["sample.verify.math_timeout_s"]),
    ("negative-length", recipe("engines:\n  default:\n    max_model_len: -1\n"), ["validate", "r.yaml"], 2,
     ["engines.default.max_model_len", ">= 1"]),
    ("gpu-memory", recipe("engines:\n  default:\n    gpu_memory_utilization: 1.5\n"), ["validate", "r.yaml"], 2,
     ["gpu_memory_utilization", "<= 1"]),
    ("negative-delta", recipe("sample: {delta: -0.1}\nvote: {delta: -0.1}\n"), ["validate", "r.yaml"], 2,
     ["sample.delta", ">= 0"]),
    ("rounds-not-increasing", recipe("sample:\n  rounds: [4, 2]\n"), ["validate", "r.yaml"], 2,
     ["sample.rounds", "increasing"]),
    ("empty-recipe", {"r.yaml": "# nothing here\n"}, ["validate", "r.yaml"], 2, ["r.yaml", "empty"]),
    ("duplicate-key", recipe("name: u\n"), ["validate", "r.yaml"], 2, ["r.yaml:5", "duplicate key 'name'", "line 1"]),
    ("duplicate-nested-key", recipe("sample:\n  n: 2\n  n: 4\n"), ["run", "r.yaml"], 2, ["r.yaml:7", "duplicate key 'n'"]),
    # 4. bad data is refused, not silently changed
    ("csv-unterminated-quote", data("q.csv", 'id,query\na,"never closed\n'), ["run", "r.yaml", "--until", "load"], 2,
     ["q.csv", "not valid CSV"]),
    ("csv-header-only", data("q.csv", "id,query\n"), ["run", "r.yaml", "--until", "load"], 2,
     ["q.csv:1", "only a header line (id, query)", "delimiter ','"]),
    ("csv-wrong-delimiter", data("q.csv", "id;query\na;hi\n"), ["run", "r.yaml", "--until", "load"], 2,
     ["q.csv:1", "header (id;query)", "delimiter ','", "';'"]),
    ("id-bool", data("q.jsonl", '{"id": true, "query": "hi"}\n'), ["run", "r.yaml", "--until", "load"], 2,
     ["q.jsonl:1 field 'id'", "bool"]),
    ("id-list", data("q.jsonl", '{"id": [1], "query": "hi"}\n'), ["run", "r.yaml", "--until", "load"], 2,
     ["field 'id'", "list"]),
    ("reference-object", data("q.jsonl", '{"query": "hi", "reference": {"a": 1}}\n'), ["run", "r.yaml", "--until", "load"],
     2, ["q.jsonl:1 field 'reference'", "dict"]),
    ("reference-nan", data("q.jsonl", '{"query": "hi", "reference": NaN}\n'), ["run", "r.yaml", "--until", "load"], 2,
     ["field 'reference'", "nan"]),
    ("json-array-bad-item", data("q.json", '[\n  {"query": "a"},\n  {"text": "b"}\n]\n'), ["run", "r.yaml", "--until", "load"],
     2, ["q.json:3 field 'query'"]),
    ("parse-invalid-response", {"r.txt": "no tags at all"}, ["template", "parse", "r.txt"], 1, []),
    ("parse-nested-marker", {"r.txt": ON.replace("4\n</answer>", "4 <think>\n</answer>")}, ["template", "parse", "r.txt"],
     1, []),
    ("validate-empty", {"e.jsonl": ""}, ["template", "validate", "e.jsonl"], 2, ["e.jsonl", "found no records"]),
    ("ls-missing-dir", {}, ["ls", "--dir", "nope"], 2, ["nope", "no such folder"]),
    # 5. messages that say the right thing
    ("set-names-argument", OK_FILES, ["run", "r.yaml", "--set", "sample.n=-1"], 2, ["--set 'sample.n=-1'", "sample.n"]),
    ("set-no-key", OK_FILES, ["run", "r.yaml", "--set", "=5"], 2, ["--set '=5'", "KEY.PATH=VALUE"]),
    ("set-no-equals", OK_FILES, ["run", "r.yaml", "--set", "sample.n"], 2, ["--set 'sample.n'", "KEY.PATH=VALUE"]),
    ("set-not-a-section", OK_FILES, ["run", "r.yaml", "--set", "name.x=1"], 2, ["--set 'name.x=1'", "not a section"]),
    ("review-push-no-records", {"run/queries.jsonl": Q}, ["review", "push", "run"], 3, ["records.jsonl", "assemble stage"]),
    ("review-pull-no-records", {"run/queries.jsonl": Q}, ["review", "pull", "run"], 3, ["records.jsonl", "assemble stage"]),
    ("export-test-size", {"run/records.jsonl": ""}, ["export", "run", "--test-size", "1.5"], 2,
     ["--test-size", "1.5", ">= 0.0 and < 1.0"]),
]


def write(root, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, "utf-8")


@pytest.mark.parametrize("name, files, argv, code, texts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_a_class_exit_code(tmp_path, monkeypatch, capsys, name, files, argv, code, texts):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KATDATA_DEBUG", raising=False)
    write(tmp_path, files)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(argv) == code
    err = capsys.readouterr().err
    if code == 1:  # a check that ran and found invalid data: the result is on stdout, nothing on stderr
        assert err == ""
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("katdata") and ": error: " in lines[0]
    for text in texts:
        assert text in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing made, nothing half-written


def test_katdata_cache_pointing_at_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("KATDATA_CACHE", str(tmp_path / "afile"))
    assert main(["model", "path"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "KATDATA_CACHE" in err and "not a folder" in err


def test_symlink_loop_is_reported_as_a_loop(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert main(["ls", "--dir", str(tmp_path / "loop")]) == 2
    assert "symlink loop" in capsys.readouterr().err


def test_good_data_is_read_as_written(tmp_path, monkeypatch, capsys):
    """BOM CSV keeps its ids, U+2028 inside JSON strings is not a line break, a pretty .json array reads."""
    monkeypatch.chdir(tmp_path)
    text = "a\u2028b\u2029c\u0085d"
    cases = {
        "q.csv": ("\ufeffid,query\nx1,hello\n".encode("utf-8"), ["x1"], ["hello"]),
        "q.jsonl": ((json.dumps({"id": "s", "query": text}, ensure_ascii=False) + "\n").encode("utf-8"), ["s"], [text]),
        "q.json": (json.dumps([{"id": "p", "query": "one"}, {"id": 2, "query": "two"}], indent=2).encode(), ["p", "2"],
                   ["one", "two"]),
    }
    for name, (content, ids, queries) in cases.items():
        write(tmp_path, data(name, content) | {"r.yaml": RECIPE.replace("q.jsonl", name)})
        assert main(["run", "r.yaml", "--until", "decontaminate", "--run-dir", f"run-{name}"]) == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in (tmp_path / f"run-{name}" / "queries.jsonl").read_bytes().splitlines()]
        assert [r["id"] for r in rows] == ids and [r["query"] for r in rows] == queries, name


def test_same_class_same_exit_code_across_subcommands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    missing = [["run", "nope.yaml"], ["validate", "nope.yaml"], ["template", "parse", "nope"],
               ["template", "validate", "nope"], ["ls", "--dir", "nope"]]
    assert {main(argv) for argv in missing} == {2}
    not_a_run_folder = [["run", "nope.yaml"], ["export", "afile"], ["train", "afile"], ["eval", "afile"],
                        ["review", "pull", "afile"]]
    write(tmp_path, OK_FILES)
    not_a_run_folder[0] = ["run", "r.yaml", "--run-dir", "afile"]
    assert {main(argv) for argv in not_a_run_folder} == {3}
    capsys.readouterr()


def test_unexpected_error_is_one_line_with_a_hint(monkeypatch, capsys):
    from katdata import cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv("KATDATA_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_ls", boom)
    assert main(["ls"]) == 70
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "ls"])


def katdata(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "katdata", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_hook_commands_and_debug_in_a_real_process(tmp_path):
    """The commands a user types first, as a separate process: one line, and --debug shows the traceback."""
    write(tmp_path, OK_FILES | {"d/x": ""})
    for args, code in ((["template", "parse", "d"], 2), (["run", "r.yaml", "--set", "name=[", "--until", "load"], 2),
                       (["run", "missing.yaml"], 2), (["eval", "nothing"], 3)):
        proc = katdata(args, tmp_path)
        assert proc.returncode == code, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "runs").exists()
    assert "Traceback" in katdata(["--debug", "run", "missing.yaml"], tmp_path).stderr
    assert "Traceback" in katdata(["run", "missing.yaml"], tmp_path, KATDATA_DEBUG="1").stderr


def test_train_and_eval_check_inputs_before_importing_torch(tmp_path):
    code = ("import sys\nfrom katdata.cli import main\n"
            "codes = [main(['train', 'nothing']), main(['eval', 'nothing']), main(['train', '.', '--set', 'lora_r=0']),"
            " main(['export', 'nothing'])]\n"
            "print(codes, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "[3, 3, 2, 3] False", proc.stdout + proc.stderr


def test_os_errors_naming_paths_are_one_line(tmp_path, capsys):
    """An OSError's filename may be a Path (shutil.rmtree raises with the Path it was given), bytes or a file
    descriptor: describe() names it and never adds it to a str (that made such errors two chained tracebacks)."""
    import shutil

    from katdata.errors import describe, report

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as info:
        shutil.rmtree(tmp_path / "afile")  # a real error whose filename is a Path
    assert describe(info.value) == (3, f"{tmp_path / 'afile'}: Not a directory")
    assert report(info.value) == 3
    assert capsys.readouterr().err == f"katdata: error: {tmp_path / 'afile'}: Not a directory\n"
    (tmp_path / "a-folder" / "x").mkdir(parents=True)
    (tmp_path / "b-folder" / "y").mkdir(parents=True)
    with pytest.raises(OSError) as info:
        os.rename(tmp_path / "a-folder", tmp_path / "b-folder")  # two filenames
    assert describe(info.value) == (3, f"{tmp_path / 'a-folder'} -> {tmp_path / 'b-folder'}: Directory not empty")
    assert describe(FileNotFoundError(2, "No such file or directory", b"caf\xc3\xa9", None, tmp_path)) == (
        3, f"caf\u00e9 -> {tmp_path}: No such file or directory")
    assert describe(OSError(9, "Bad file descriptor", 7)) == (3, "7: Bad file descriptor")
