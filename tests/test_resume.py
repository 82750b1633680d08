"""kill -9 a real run (embedded model, transformers) at several points, rerun: same dataset, no row lost or doubled."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """\
name: resume
seed: 3
data:
  sources:
    - {name: gsm8k, limit: 3}
    - {name: fanoutqa-hop, limit: 3}
engines:
  default: {backend: transformers, model: embedded, batch_size: 8}
tag: {max_tokens: 24, batch_size: 2}
solve: {rounds: 1, max_tokens: 48, critic_max_tokens: 16, chunk_size: 3}
sample: {n: 2, rounds: [1, 2], max_tokens_on: 48, max_tokens_off: 16, chunk: 2}
vote: {n: 2, none_correct: prior}
judge: {engine: default, max_tokens: 32}
assemble: {accept_imbalance: true}  # a 135M model writes no think-on content: the on mode collapses
export: {test_size: 0.3, plot: false}
"""

# kill points: (file in the run folder, lines it must have) -- early, middle and late in the run
KILL_AT = [("tags.jsonl", 2), ("samples.jsonl", 1), ("votes.jsonl", 1)]


def katdata(run_dir: Path, recipe: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "katdata", "run", str(recipe), "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]


def rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text("utf-8").splitlines()]


@pytest.mark.slow  # six real runs of the pipeline: minutes on a CPU (make test-slow)
@pytest.mark.timeout(1500)
def test_kill_9_at_several_points_then_resume_equals_uninterrupted(tmp_path):
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(RECIPE, "utf-8")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    finish(katdata(clean, recipe))

    kills = 0
    for name, need in KILL_AT:
        proc = katdata(killed, recipe)
        deadline = time.time() + 600
        while proc.poll() is None and lines(killed / name) < need and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    finish(katdata(killed, recipe))
    assert kills >= 2, "the run must actually have been killed mid-way"

    for name in ("queries.jsonl", "tags.jsonl", "solve.jsonl", "samples.jsonl", "votes.jsonl", "records.jsonl"):
        a, b = rows(clean, name), rows(killed, name)
        key = (lambda r: (r["id"], r.get("mode"), r.get("index"), r.get("source"))) if name in (
            "samples.jsonl", "solve.jsonl") else (lambda r: r["id"])
        assert len({json.dumps(key(r)) for r in b}) == len(b), f"{name}: a row was written twice"
        assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, b)), f"{name}: differs from the uninterrupted run"
    summary = json.loads((killed / "summary.json").read_text())
    assert all(stage["done"] for stage in summary["stages"].values())
    assert (killed / "export" / "README.md").is_file()
