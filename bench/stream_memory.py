"""Peak memory of the streaming stages against the number of queries: does it stay bounded?

    .venv/bin/python bench/stream_memory.py [--sizes 5000,50000] [--stages sample,solve,judge,resumed,vote,assemble]

For each size a synthetic queries.jsonl is written to a temporary run folder, and each stage runs
on it in a fresh child process with a scripted engine (instant replies, so the stage's own
bookkeeping is all that is measured): ``sample`` (two modes, N=2 in two rounds of one sample) and ``solve``
(solver, thinker, critic, one round); optionally ``cached``, the sample stage behind the request cache
(which keeps an index of its file in memory: a few hundred bytes per completion); ``judge`` (votes streamed,
queries and tags looked up in an index of their files; the tags writer, no engine); ``resumed``, the sample stage
rerun on a finished samples.jsonl (written first by a separate ``sample`` child), which reads each query's
earlier rows back as the query opens; ``vote`` and ``assemble`` (no engine) on the files the stages before
them wrote, each query's rows read back from an index of those files. The child reports its peak resident set size
(``resource.getrusage``'s ``ru_maxrss``) after the imports (``base``) and after the stage
(``peak``); ``grown`` is the difference, the memory the stage itself took. The last lines put the
sizes side by side: ``query_ratio`` (largest / smallest size) against ``grown_ratio``. Goal: the
grown ratio far below the query ratio (memory bounded by the queries in progress, not by the file).
The scripted engine is for this measurement only; it says nothing of an engine's own memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_queries(path: Path, n: int) -> None:
    from katdata.records import Query
    from katdata.runfiles import RowWriter

    with RowWriter(path) as w:  # one row at a time: the parent holds no list either
        for i in range(n):
            a, b = i % 97, i % 89
            w.write(Query(id=f"q{i:07d}", query=f"What is {a} + {b}? Give the number only. (item {i})",
                          reference=str(a + b), kind="numeric"))


def write_votes(path: Path, n: int) -> None:
    from katdata.records import Vote
    from katdata.runfiles import RowWriter

    with RowWriter(path) as w:
        for i in range(n):
            w.write(Vote(id=f"q{i:07d}", label="on" if i % 3 else "off", reason="bench"))


def child(stage: str, run_dir: Path) -> dict:
    """Run ``stage`` on ``run_dir`` with a scripted engine; the peak RSS before and after, in MiB."""
    from katdata import sample, solve, template
    from katdata.backends.base import Completion
    from katdata.backends.scripted import ScriptedBackend

    def total(req) -> str:
        text = req.messages[-1]["content"]
        a, b = text.split("What is ", 1)[1].split("?", 1)[0].split(" + ")
        return str(int(a) + int(b))

    def sample_reply(req, i):
        if req.prefix.endswith(template.FORCE_PREFIX["off"]):
            return Completion(f"{total(req)}\n</answer>", "stop", 40, 3)
        return Completion(f"Add them.\n</think>\n<answer>\n{total(req)}\n</answer>", "stop", 40, 9)

    def solve_reply(req, i):
        text = req.messages[0]["content"]
        if text.startswith("You are the critic"):
            return Completion(" 9\nVerdict: accept\nReason: fine", "stop", 80, 8)
        return Completion(f"Adding the two numbers.\nFinal answer: {total(req)}", "stop", 60, 8)

    def engine(script):
        backend = ScriptedBackend(script=script)
        backend.calls = deque(maxlen=1)  # the scripted engine's own record of every call is not the stage's
        return backend

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if stage in ("sample", "cached"):
        backend = engine(sample_reply)
        if stage == "cached":  # the request cache in front, as recipes have it
            from katdata.cache import CachedBackend

            backend = CachedBackend(backend, run_dir / "cache.jsonl")
        stats = sample.run(sample.SampleConfig(n=2, rounds=[1]), run_dir, lambda name: backend)
        rows = stats["rows_out"]
    elif stage == "resumed":  # samples.jsonl is complete: every request is answered from the file
        backend = engine(sample_reply)
        stats = sample.run(sample.SampleConfig(n=2, rounds=[1]), run_dir, lambda name: backend)
        rows = sum(1 for _ in open(run_dir / "samples.jsonl"))
        assert stats["rows_out"] == 0, stats
    elif stage == "judge":
        from katdata import judge

        stats = judge.run(judge.JudgeConfig(writer="tags"), run_dir, lambda name: None)
        rows = stats["rows_out"]
    elif stage == "vote":
        from katdata import vote

        rows = vote.run(vote.VoteConfig(n=2), run_dir)["rows_out"]
    elif stage == "assemble":
        from katdata import assemble

        rows = assemble.run(assemble.AssembleConfig(accept_imbalance=True), run_dir)["rows_out"]  # all right: off
    else:
        backend = engine(solve_reply)
        stats = solve.run(solve.SolveConfig(rounds=0), run_dir, lambda name: backend)
        rows = stats["attempts"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"stage": stage, "rows_out": rows, "seconds": round(time.perf_counter() - t0, 1),
            "base_mib": round(base / 1024, 1), "peak_mib": round(peak / 1024, 1),
            "grown_mib": round((peak - base) / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,50000", help="query counts, comma-separated")
    ap.add_argument("--stages", default="sample,solve",
                    help="stages to measure: sample, solve, cached (sample behind the request cache), judge, "
                         "resumed (sample rerun on a finished samples.jsonl), vote, assemble")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="katdata-memory-") as tmp:
        for n in sizes:
            for stage in args.stages.split(","):
                run_dir = Path(tmp) / f"{stage}-{n}"
                run_dir.mkdir()
                write_queries(run_dir / "queries.jsonl", n)
                mib = (run_dir / "queries.jsonl").stat().st_size / 2 ** 20
                # the files the measured stage reads, each written by a separate child first
                for before in {"resumed": ["sample"], "vote": ["sample"],
                               "assemble": ["sample", "vote", "judge"]}.get(stage, []):
                    subprocess.run([sys.executable, __file__, "--child", before, str(run_dir)], capture_output=True,
                                   check=True)
                if stage == "judge":
                    write_votes(run_dir / "votes.jsonl", n)
                out = subprocess.run([sys.executable, __file__, "--child", stage, str(run_dir)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{stage} on {n} queries failed:\n{out.stderr[-2000:]}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                got["queries_file_mib"] = round(mib, 1)
                results.setdefault(stage, {})[n] = got
                print(f"{stage:6s} queries={n:>8d} " + " ".join(f"{k}={v}" for k, v in got.items() if k != "stage"),
                      flush=True)
    lo, hi = min(sizes), max(sizes)
    for stage, by_size in results.items():
        a, b = by_size[lo], by_size[hi]
        print(f"{stage:6s} query_ratio={hi / lo:.1f} grown_mib {a['grown_mib']} -> {b['grown_mib']} "
              f"grown_ratio={b['grown_mib'] / max(a['grown_mib'], 0.1):.2f} "
              f"peak_ratio={b['peak_mib'] / a['peak_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
