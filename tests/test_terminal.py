"""What a person sees: `katdata run` in a real terminal (a tmux pane), read back as the screen's text.

Each stage's bar ends at n/n (n what the stage really processed), every log line has a line of its
own, other libraries' INFO lines stay out, and no line is wider than the pane.
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
    """The checks every run must pass; returns each stage's final bar as (n, total). Log lines may be
    longer than the pane (the terminal wraps them); bars and the table may not."""
    from rich.cells import cell_len

    text = "\n".join(lines)
    assert max(cell_len(line) for line in lines if not LOG.match(line)) <= width, text
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
