"""Issue 23 §3/§4: `validate` finds what `run` finds, and both (and every stage command) find it before a
model loads or a folder changes: one line on stderr naming the key or flag, the same exit code for the same
class of problem in every command (a missing run folder is 3 everywhere).

Every case goes through the real CLI (``katdata.cli.main``). No test reaches beyond 127.0.0.1: the Hub is a
closed local port (HF_ENDPOINT) or switched off (HF_HUB_OFFLINE), and its cache a folder of the test's own.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from katdata.cli import main

STAGES = ["tag", "solve", "sample", "vote", "judge", "assemble", "calibrate", "export", "train", "rl", "eval"]
RECIPE = "name: t\nrun_dir: runs/{name}\ndata:\n  path: q.jsonl\n"
Q = '{"id": "a", "query": "2+2?", "reference": "4"}\n'


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


@pytest.fixture(autouse=True)
def here(tmp_path, monkeypatch):
    """An empty working folder, the Hub a closed local port with an empty cache, no OpenAI server set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KATDATA_DEBUG", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "q.jsonl").write_text(Q)
    return tmp_path


def files(root) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def error_of(argv, code, capsys, *texts, within=10.0) -> str:
    """Run the CLI; check the exit code, one error line holding ``texts``, the time, and that nothing was made."""
    root = Path.cwd()
    before = files(root)
    t0 = time.perf_counter()
    got = main(argv)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in texts:
        assert text in lines[0], lines[0]
    assert seconds < within, f"{argv}: {seconds:.1f} s"
    assert files(root) == before, "the command made or changed files"
    return lines[0]


def model_folder(path, *names):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text("{}")
    return path


def recipe(here, engines: str = "", extra: str = "") -> str:
    (here / "r.yaml").write_text(RECIPE + (f"engines:\n{engines}" if engines else "") + extra)
    return "r.yaml"


# ---------------------------------------------------------------- §4: a missing run folder is exit 3 everywhere
@pytest.mark.parametrize("command", STAGES + ["review push"])
def test_a_missing_run_folder_is_exit_3_in_every_command(here, capsys, command):
    error_of(command.split() + ["runs/nope"], 3, capsys, "runs/nope: no such run folder", f"katdata {command.split()[0]}")


@pytest.mark.parametrize("command", STAGES)
def test_a_file_for_the_run_folder_is_exit_3_in_every_command(here, capsys, command):
    (here / "afile").write_text("x")
    error_of([command, "afile"], 3, capsys, "afile: not a folder")


def test_stage_commands_check_before_importing_torch(here):
    """In a fresh process: every stage command on a missing folder, and the recipe cases, load no model."""
    model_folder(here / "empty")
    (here / "r.yaml").write_text(RECIPE + "engines:\n  default: {model: ./empty}\n")
    calls = [[c, "nope"] for c in STAGES] + [["validate", "r.yaml"], ["run", "r.yaml"]]
    code = ("import sys\nfrom katdata.cli import main\n"
            f"codes = [main(a) for a in {calls!r}]\n"
            "print(codes, sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert proc.stdout.strip() == f"{[3] * len(STAGES) + [2, 2]} []", proc.stdout + proc.stderr
    assert not (here / "nope").exists() and not (here / "runs").exists()


# ---------------------------------------------------------------- stage inputs inside the run folder
@pytest.mark.parametrize("command, missing, stage", [
    ("vote", "samples.jsonl", "sample"), ("judge", "votes.jsonl", "vote"), ("assemble", "votes.jsonl", "vote"),
    ("calibrate", "votes.jsonl", "vote"), ("train", "export or records.jsonl", "assemble"),
    ("eval", "train/split.json", "train"), ("rl", "train/split.json", "train")])
def test_a_stage_input_missing_is_exit_3_naming_the_stage(here, capsys, command, missing, stage):
    (here / "run").mkdir()
    (here / "run" / "queries.jsonl").write_text(Q)
    error_of([command, "run"], 3, capsys, f"run: {missing} not found: run the {stage} stage first", f"--until {stage}")


def test_a_folder_where_a_stage_file_should_be(here, capsys):
    (here / "run" / "queries.jsonl").mkdir(parents=True)
    error_of(["tag", "run", "--no-use-llm"], 3, capsys, "run/queries.jsonl: a folder, not a file", "decontaminate stage")
    (here / "run2").mkdir()
    (here / "run2" / "export").write_text("x")
    error_of(["train", "run2"], 3, capsys, "run2/export: a file, not a folder", "assemble stage")


# ---------------------------------------------------------------- §4: split.json, --backend, other flags
@pytest.mark.parametrize("content, texts", [
    ("", ["split.json: empty"]),
    ('{"seed": 0, "data": null, "tr', ["split.json:1: broken JSON", "cut short?"]),
    ('["a", "b"]', ["split.json: not the split `katdata train` writes"]),
    ('{"train": "a", "heldout": []}', ["split.json: not the split"]),
])
@pytest.mark.parametrize("command", ["eval", "rl"])
def test_a_broken_split_json_is_one_line_not_a_bug(here, capsys, command, content, texts):
    (here / "run" / "train").mkdir(parents=True)
    (here / "run" / "train" / "split.json").write_text(content)
    error_of([command, "run"], 3, capsys, "run/train/", *texts, "train again")


def test_a_broken_split_json_stops_the_pipeline_eval_stage_too(here, capsys):
    """`katdata run --from eval` reads split.json where eval reads it (katdata.train.split_rows)."""
    (here / "R" / "train" / "adapter").mkdir(parents=True)
    (here / "R" / "train" / "split.json").write_text('{"seed": 0, "data": null, "tr')
    recipe(here, extra="eval: {}\n")
    assert main(["run", "r.yaml", "--run-dir", "R", "--from", "eval"]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "R/train/split.json:1: broken JSON" in err and "internal error" not in err, err


def split_run(here):
    (here / "run" / "train").mkdir(parents=True)
    (here / "run" / "train" / "split.json").write_text(json.dumps({"seed": 0, "data": None, "train": [], "heldout": []}))
    return "run"


def test_eval_with_an_unknown_backend_names_the_flag_and_the_valid_ones(here, capsys):
    split_run(here)
    error_of(["eval", "run", "--backend", "foo"], 2, capsys, "--backend foo", "valid: transformers, vllm")
    error_of(["eval", "run", "--backend", "openai"], 2, capsys, "--backend openai", "valid: transformers, vllm")
    (here / "run" / "recipe.yaml").write_text(RECIPE)
    (here / "run" / "queries.jsonl").write_text(Q)
    (here / "q.jsonl").write_text(Q)
    error_of(["tag", "run", "--set", "engines.default.backend=foo"], 2, capsys, "engines.default.backend",
             "'transformers', 'vllm' or 'openai' (got 'foo')")


def test_eval_checks_its_adapters_before_a_model_loads(here, capsys):
    """The adapter is loaded after the base model's generations: eval (and the pipeline's eval stage) check it
    before any model loads, after its own output folder check."""
    from demo_data import demo_records
    from katdata.runfiles import RowWriter

    records = demo_records(2, 2)
    (here / "run" / "train").mkdir(parents=True)
    with RowWriter(here / "run" / "records.jsonl") as w:
        w.write_all(records)
    (here / "run" / "train" / "split.json").write_text(json.dumps(
        {"seed": 0, "data": None, "train": [r.id for r in records], "heldout": [r.id for r in records]}))
    error_of(["eval", "run"], 3, capsys, "adapter: no such folder: run/train/adapter", "run `katdata train` first")
    (here / "run" / "train" / "adapter").mkdir()
    error_of(["eval", "run"], 3, capsys, "run/train/adapter holds no LoRA adapter: no adapter_config.json",
             "train again (move run/train aside, then katdata train run)")
    error_of(["rl", "run"], 2, capsys, "no SFT policy at run/train/adapter")
    model_folder(here / "run" / "train" / "adapter", "adapter_config.json")
    error_of(["eval", "run"], 3, capsys, "holds no adapter weights (adapter_model.safetensors or adapter_model.bin)")
    model_folder(here / "other", "config.json")
    error_of(["eval", "run", "--set", "adapter=other"], 2, capsys, "adapter: other holds no LoRA adapter",
             "it holds config.json: a whole model", "set adapter to an adapter folder")
    model_folder(here / "run" / "train" / "adapter", "adapter_model.safetensors")
    error_of(["eval", "run", "--set", "rl_adapter=./gone"], 2, capsys, "rl_adapter: no such folder: ./gone")


def test_a_broken_train_json_is_one_line(here, capsys):
    split_run(here)
    (here / "run" / "train" / "train.json").write_text("{")
    error_of(["eval", "run"], 3, capsys, "run/train/train.json: not JSON")
    error_of(["rl", "run"], 3, capsys, "run/train/train.json: not JSON")
    (here / "run" / "train" / "train.json").write_text('["a"]')
    error_of(["eval", "run"], 3, capsys, "run/train/train.json: not the record `katdata train` writes")


def test_stage_flags_are_checked_before_a_model_loads(here, capsys):
    """A stage command reads the run's recipe.yaml; its flags and --set are recipe keys, checked as `run` checks
    them, before a model loads."""
    (here / "run").mkdir()
    (here / "run" / "queries.jsonl").write_text(Q)
    (here / "q.jsonl").write_text(Q)
    (here / "run" / "recipe.yaml").write_text(RECIPE)
    model_folder(here / "weightless", "config.json", "tokenizer.json")
    error_of(["tag", "run", "--set", "engines.default.model=weightless"], 2, capsys,
             "engines.default.model: weightless holds no loadable model", "no weights (*.safetensors")
    error_of(["sample", "run", "--n", "x"], 2, capsys, "sample.n: Input should be a valid integer", "(got 'x')")
    error_of(["sample", "run", "--set", "rounds=[2, x]"], 2, capsys, "sample.rounds.1", "(got 'x')")
    error_of(["solve", "run", "--set", "engines.default.backend=openai"], 2, capsys, "OPENAI_BASE_URL")
    error_of(["tag", "run", "--no-use-llm", "--calibration", "nope.json"], 2, capsys, "nope.json: not found")
    assert "Value error" not in error_of(["tag", "run", "--calibration", "nope.json"], 2, capsys)
    error_of(["tag", "run", "--config", "nope.yaml"], 2, capsys, "nope.yaml")
    (here / "run" / "recipe.yaml").unlink()
    error_of(["tag", "run"], 2, capsys, "run/recipe.yaml: not found: give the recipe with --config RECIPE")
    (here / "run" / "records.jsonl").write_text("")
    error_of(["train", "run", "--set", "model=weightless"], 2, capsys, "model: weightless holds no loadable model")


# ---------------------------------------------------------------- §3: validate knows what run knows
def both(argv_file, code, capsys, *texts):
    """`validate` and `run` give the same line, before any run folder exists."""
    line = error_of(["validate", argv_file], code, capsys, *texts)
    assert error_of(["run", argv_file], code, capsys, *texts) == line
    return line


def test_an_empty_model_folder_names_the_key_and_what_is_missing(here, capsys):
    model_folder(here / "empty")
    recipe(here, "  default: {backend: transformers, model: ./empty}\n")
    both("r.yaml", 2, capsys, "r.yaml:6: engines.default.model: ./empty holds no loadable model", "no config.json",
         "no weights (*.safetensors, *.bin, *.gguf, *.pt)", "no tokenizer files (tokenizer.json")


def test_a_weightless_train_model_and_an_adapter_given_as_model(here, capsys):
    model_folder(here / "weightless", "config.json", "tokenizer.json")
    model_folder(here / "adapter", "adapter_config.json", "adapter_model.safetensors")
    recipe(here, "  default: {model: ./adapter}\n", "train:\n  model: ./weightless\n")
    line = both("r.yaml", 2, capsys, "r.yaml:8: train.model: ./weightless holds no loadable model: no weights",
                "engines.default.model: ./adapter is a LoRA adapter (adapter_config.json), not a model")
    assert "no config.json" not in line.split("train.model")[1] and "tokenizer" not in line.split("train.model")[1]


def test_a_whole_model_folder_passes(here, capsys):
    model_folder(here / "m", "config.json", "model.safetensors", "tokenizer.json")
    recipe(here, "  default: {model: ./m}\n", "train:\n  model: ./m\n")
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("files_, texts", [
    ((), ["no adapter_config.json", "RUN/train/adapter"]),
    (("config.json",), ["no adapter_config.json (it holds config.json: a whole model, not an adapter)"]),
    (("adapter_config.json",), ["no adapter weights (adapter_model.safetensors or adapter_model.bin)"]),
])
def test_a_lora_path_without_an_adapter(here, capsys, files_, texts):
    model_folder(here / "ad", *files_)
    recipe(here, "  default: {lora_path: ./ad}\n")
    both("r.yaml", 2, capsys, "engines.default.lora_path: ./ad holds no", *texts)


def test_eval_and_rl_adapter_settings_that_exist_are_checked(here, capsys):
    model_folder(here / "ad")
    recipe(here, extra="eval:\n  adapter: ./ad\n  rl_adapter: ./ad\nrl:\n  policy: ./ad\n")
    both("r.yaml", 2, capsys, "eval.adapter: ./ad holds no LoRA adapter", "eval.rl_adapter: ./ad",
         "rl.policy: ./ad holds no SFT policy")
    # one the run writes itself (its own train/adapter) is not there yet: not refused
    recipe(here, extra="eval:\n  adapter: runs/t/train/adapter\n")
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err


def test_an_openai_engine_needs_a_server_url(here, capsys, monkeypatch):
    recipe(here, "  default: {backend: openai, model: served-name}\n")
    both("r.yaml", 2, capsys, "r.yaml:6: engines.default.base_url: the openai backend needs its server's URL",
         "OPENAI_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", "127.0.0.1:8000/v1")
    both("r.yaml", 2, capsys, "OPENAI_BASE_URL '127.0.0.1:8000/v1' is no http:// or https:// URL")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err  # the served name is never looked up
    recipe(here, "  default: {backend: openai, model: m, base_url: 'http://127.0.0.1:1/v1,localhost:2'}\n")
    both("r.yaml", 2, capsys, "engines.default.base_url: base_url 'localhost:2' is no http")


# ---------------------------------------------------------------- §3 (d): a Hub id with the Hub out of reach
def cache_model(here, repo: str, filename: str = "config.json"):
    """What `hf download` leaves in the Hub cache: refs/main naming a snapshot that holds the file."""
    root = here / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    model_folder(root / "snapshots" / ("0" * 40), filename)


def test_a_hub_id_while_offline_must_be_in_the_cache(here, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe(here, "  default: {model: someorg/somemodel}\n")
    both("r.yaml", 2, capsys, "engines.default.model: 'someorg/somemodel' is no local folder and not in the Hub "
         f"cache {here / 'hub'}", "HF_HUB_OFFLINE=1", "hf download someorg/somemodel", "local model folder")
    cache_model(here, "someorg/somemodel")
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err


def katdata_process(here, *args) -> tuple[int, str, float]:
    """`katdata ARGS` as its own process (huggingface_hub reads HF_HUB_OFFLINE when it is imported, so the
    Hub-unreachable cases run where no earlier test imported it offline): exit code, stderr, seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "katdata", *args], cwd=here, capture_output=True, text=True,
                          env=os.environ, timeout=120)
    return proc.returncode, proc.stderr, time.perf_counter() - t0


def test_a_hub_id_with_the_hub_unreachable_stops_in_seconds(here):
    recipe(here, "  default: {model: someorg/somemodel}\n", "train:\n  model: someorg/other\n")
    for command in ("validate", "run"):
        code, err, seconds = katdata_process(here, command, "r.yaml")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        for text in ("engines.default.model: 'someorg/somemodel' is no local folder and not in the Hub cache, and the "
                     "Hub at http://127.0.0.1:", "cannot be reached (ConnectError", "hf download someorg/somemodel",
                     "HF_ENDPOINT", "train.model: 'someorg/other' is no local folder"):
            assert text in err, err
        assert seconds < 20, seconds  # (the process start included; transformers' retries took 54 s)
    assert files(here) == sorted(Path(p) for p in ("q.jsonl", "r.yaml"))


def test_a_cached_hub_id_with_the_hub_unreachable_asks_for_offline_mode(here, monkeypatch):
    cache_model(here, "someorg/cached")
    recipe(here, "  default: {model: someorg/cached}\n")
    for command in ("validate", "run"):
        code, err, seconds = katdata_process(here, command, "r.yaml")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "the Hub at http://127.0.0.1:" in err and "set HF_HUB_OFFLINE=1" in err, err
        assert "loading 'someorg/cached' would retry it for minutes" in err and seconds < 20, err
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert katdata_process(here, "validate", "r.yaml")[0] == 0


def test_a_path_that_is_no_hub_id(here, capsys):
    (here / "runs").mkdir()
    recipe(here, "  default: {model: runs/nope}\n  big: {model: 'a b'}\n  odd: {model: '-x/y.'}\n")
    both("r.yaml", 2, capsys, "engines.default.model: no such file or folder: runs/nope (runs/ is a folder here",
         "engines.big.model: no such file or folder, and not a Hub id either: a b",
         "engines.odd.model: no such file or folder, and not a Hub id either: -x/y.")  # not huggingface_hub's error


def test_a_hub_lora_path_while_offline(here, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe(here, "  default: {lora_path: someorg/adapter}\n")
    both("r.yaml", 2, capsys, "engines.default.lora_path: 'someorg/adapter' is no local folder")
    cache_model(here, "someorg/adapter", "adapter_config.json")
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err
