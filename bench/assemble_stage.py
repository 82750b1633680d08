"""The assemble stage itself, on a run folder shaped like a real one: records/s and peak RSS.

bench/export_scale.py's assemble line times the record writer's loop alone (build, render, write the rows).
A user's assemble also reads and checks every file of the run: the queries, tags, each query's samples in both
modes, votes, judges and the solver's attempts, and it ends with the mode-balance check. This builds such a
folder, then runs `katdata.assemble.run` on it in a fresh process and prints records/s and peak RSS.

The folder has real query texts (GSM8K with worked solutions as think-on, FanOutQA hops as think-off) and hex ids
as `records.stable_id` makes them. Each query has K samples per mode, and some have solver attempts. The folder
also holds the cases a real run has:
- dropped votes;
- judge rejects;
- chosen samples that are missing;
- floats that pydantic-core spells otherwise than repr (1e-05).

``--baseline DIR`` runs another checkout of katdata on the same folder, side by side and alternating, for
example a git worktree of an earlier commit. It prints the ratio of the two rates and whether records.jsonl and
rejects.jsonl are byte-identical.

    .venv/bin/python bench/assemble_stage.py                    # 20k and 100k queries, 4 samples per mode
    git worktree add /tmp/katdata-base HEAD~1
    .venv/bin/python bench/assemble_stage.py --counts 20000 --baseline /tmp/katdata-base
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_run(run: Path, n: int, k: int, seed: int = 0) -> None:
    """A run folder of n queries: queries, tags, k samples per mode, votes, judges, solve (RowWriter's bytes)."""
    from export_scale import JUDGE_OFF, JUDGE_ON, _pool

    from katdata.judge import JudgeRow
    from katdata.kat_bulk import render_checked
    from katdata.records import Attempt, Query, Segment, Tags, Vote
    from katdata.runfiles import row_line

    rng = random.Random(seed)
    on, off = _pool()
    run.mkdir(parents=True, exist_ok=True)
    names = ("queries", "tags", "samples", "votes", "judges", "solve")
    files = {name: open(run / f"{name}.jsonl", "w", encoding="utf-8") for name in names}
    try:
        for _ in range(n):
            mode = "on" if rng.random() < 0.35 else "off"
            query, think, answer = rng.choice(on if mode == "on" else off)
            qid = f"q-{rng.getrandbits(64):016x}"
            rows = {"queries": [Query(id=qid, query=query, reference=answer, kind="numeric" if mode == "on" else "exact",
                                      source="gsm8k" if mode == "on" else "fanoutqa-hop",
                                      meta={"solution": think} if think else {})],
                    "tags": [Tags(id=qid, domain="math" if mode == "on" else rng.choice(["knowledge", "sports", "film"]),
                                  task_type="qa", difficulty=rng.randint(1, 5), needs_reasoning=mode == "on",
                                  p_reasoning=round(rng.random(), 3), verifiability="reference", language="en")],
                    "samples": [], "solve": []}
            for m in ("on", "off"):
                for j in range(k):
                    text = render_checked(m, JUDGE_ON if m == "on" else JUDGE_OFF, answer,
                                          (think or "Recall the fact first.") if m == "on" else None)
                    rows["samples"].append(Attempt(id=qid, index=j, mode=m, text=text, response=text,
                                                   think=think if m == "on" else None, answer=answer, ok=True,
                                                   correct=True, answer_class=answer, prompt_tokens=80,
                                                   completion_tokens=60 + j))
            x = rng.random()
            p_on, p_off = (1e-05 if x < 0.01 else round(rng.random(), 2)), round(rng.random(), 2)
            label = None if x > 0.96 else mode  # dropped votes
            rows["votes"] = [Vote(id=qid, label=label, reason="pass rates" if label else "dropped: no margin",
                                  label_source="vote" if label else None, n_on=k, n_off=k, p_on=p_on, p_off=p_off,
                                  margin=round(p_on - p_off, 2), delta=0.1, entropy_on=rng.random(),
                                  classes_on={answer: k}, classes_off={answer: k}, samples_used=2 * k,
                                  chosen_index=k + 1 if 0.92 < x < 0.94 else rng.randrange(k),  # a missing sample
                                  chosen_source="vote")]
            ok = not 0.88 < x < 0.90  # judge rejects
            rows["judges"] = [JudgeRow(id=qid, mode=mode, ok=ok, rationale=(JUDGE_ON if mode == "on" else JUDGE_OFF)
                                       if ok else None, reason=None if ok else "too long: 90 words",
                                       attempts=[{"raw": "rationale", "ok": ok}])]
            if mode == "on" and think and rng.random() < 0.3:
                rows["solve"].append(Attempt(id=qid, source="solver", mode="on", text=think, think=think, answer=answer,
                                             ok=True, correct=True, score=round(rng.random(), 2), completion_tokens=90,
                                             segments=[Segment(role="solver"), Segment(role="critic", round=1)]))
            for name, out in rows.items():
                files[name].writelines(row_line(r) + "\n" for r in out)
    finally:
        for f in files.values():
            f.close()


def child(run: Path) -> dict:
    """The stage on ``run`` in this process (the katdata on sys.path[0]): seconds, records, peak RSS."""
    from katdata import assemble

    for name in ("records.jsonl", "rejects.jsonl"):
        (run / name).unlink(missing_ok=True)
    t = time.perf_counter()
    out = assemble.run(assemble.AssembleConfig(accept_imbalance=True), run)
    secs = time.perf_counter() - t
    return {"seconds": secs, "records": out["rows_out"], "queries": out["rows_in"], "katdata": assemble.__file__,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


def measure(root: Path, run: Path, keep: Path | None = None) -> dict:
    """The stage of the checkout at ``root`` on ``run``, in a fresh process; its output files copied to ``keep``."""
    code = (f"import json, sys; sys.path[:0] = [{str(root)!r}, {str(Path(__file__).parent)!r}]; import katdata.assemble; "
            f"from assemble_stage import child; from pathlib import Path; print(json.dumps(child(Path({str(run)!r}))))")
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise SystemExit(f"the stage of {root} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(r["katdata"]).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the stage meant for {root} ran {r['katdata']}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("records.jsonl", "rejects.jsonl"):
            shutil.copyfile(run / name, keep / name)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="assemble_stage", description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[20_000, 100_000], help="queries per run folder")
    p.add_argument("--samples", type=int, default=4, help="samples per mode and query (K)")
    p.add_argument("--baseline", type=Path, help="another katdata checkout (its root folder) to run side by side")
    p.add_argument("--repeats", type=int, default=2, help="runs of each checkout per count (the best is kept)")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    if a.baseline is not None and not (a.baseline / "katdata" / "assemble.py").is_file():
        p.error(f"--baseline {a.baseline}: no katdata checkout there (katdata/assemble.py)")
    if a.dir:
        a.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="assemble_stage-", dir=a.dir))
    try:
        for n in a.counts:
            run = work / f"run-{n}"
            t = time.perf_counter()
            build_run(run, n, a.samples)
            size = sum(f.stat().st_size for f in run.iterdir()) / 2**20
            print(f"run folder: {n:,d} queries, {a.samples} samples per mode, {size:,.0f} MB, built in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            roots = {"this": ROOT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
            best: dict[str, dict] = {}
            for _ in range(a.repeats):
                for name, root in roots.items():  # alternating, so both see the same machine
                    r = measure(root, run, work / name)
                    if name not in best or r["seconds"] < best[name]["seconds"]:
                        best[name] = r
            for name, r in best.items():
                print(f"assemble stage ({name}) n={n:>8,d}  {r['seconds']:6.1f} s  {r['queries'] / r['seconds']:8,.0f} "
                      f"queries/s  {r['records'] / r['seconds']:8,.0f} records/s  ({r['records']:,d} records)  peak RSS "
                      f"{r['peak_rss_mb']:6.1f} MB", flush=True)
            if "baseline" in best:
                this, base = best["this"], best["baseline"]
                same = all(filecmp.cmp(work / "this" / f, work / "baseline" / f, shallow=False)
                           for f in ("records.jsonl", "rejects.jsonl"))
                print(f"  this vs baseline: x{base['seconds'] / this['seconds']:.2f} records/s, peak RSS "
                      f"x{this['peak_rss_mb'] / base['peak_rss_mb']:.2f}; records.jsonl and rejects.jsonl "
                      f"{'byte-identical' if same else 'DIFFER'}", flush=True)
            shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average now {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
