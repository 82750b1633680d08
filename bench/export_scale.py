"""Export at scale: synthetic KAT records streamed through assembly and export, memory flat?

For each count (default 100,000 and 1,000,000), in fresh processes side by side:
  1. assemble: build KatRecord rows from real query texts (GSM8K with worked solutions as think-on,
     FanOutQA hops as think-off), render the byte-exact KAT response, append to records.jsonl;
  2. export: `katdata.export.run` on that run folder: records.jsonl is katdata's own (assemble's writer stamped it,
     katdata.written), so DuckDB reads it (katdata.export_duck); then export-python: the same export by the Python
     reader (KATDATA_EXPORT_DUCKDB=0: two streaming passes, worker processes), its ratio and whether the two
     exports are byte-identical;
  3. floor: export's C++ parts alone on the same records and export, one thread (pyarrow's JSON reader over the
     typed columns, the parquet encoding of the exported row groups): records per CPU-second, and export's
     ratio to it (what export costs beyond reading and writing its columns);
  4. bound: a column-wise export's best case (issue 29's item 2), wall time with every core: pyarrow's threaded
     reader, the hf columns, a split, parquet on a second thread, none of the work the reader cannot do; and the
     CPU of msgspec decoding just the free-keyed parts that pyarrow cannot read.
Export's line also gives the CPU of its own threads (main, parquet, other; /proc per thread): the busiest one caps
export whatever the core count. Each step runs in its own process so its peak RSS (ru_maxrss) is its own. Prints records/s and
peak RSS per step and count, and the ratios between the largest and smallest count.
Goal (issue 8): export >= 20,000 records/s, peak RSS flat as the count grows (issue 29: export
>= 100,000, assemble >= 50,000 at 1M). Each rate is also given as a ratio to the last committed figures
(the table of docs/export_speed.md; records per CPU-second is the steadier figure on a shared machine).
--phases reruns each step instrumented and prints seconds, records/s and share per phase: read,
route/hold back, render, parse-check, write (and other: imports, the split loop). Export
reads large files in worker processes (katdata.export_spans): records/CPU-s counts theirs too, and
their peak RSS is shown beside the main process's.

    .venv/bin/python bench/export_scale.py                    # 100k and 1M (several minutes, ~2 GB disk)
    .venv/bin/python bench/export_scale.py --counts 1000 5000 # quick
    .venv/bin/python bench/export_scale.py --counts 100000 --phases  # where the time goes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export_limits  # noqa: E402  (beside this file: the floor and bound steps)

JUDGE_ON = "The problem needs several dependent calculation steps, so reasoning them out first avoids mistakes."
JUDGE_OFF = "This asks to recall one well-known fact, so a direct answer without explicit reasoning is enough."
MODELS = {"solver": "SmolLM2-135M-Instruct", "judge": "SmolLM2-135M-Instruct", "sampler": "SmolLM2-135M-Instruct"}


def _pool():
    from katdata import sources

    on = [(q.query, re.sub(r"<<[^>]*>>", "", q.meta["solution"].split("####")[0]).strip(), q.reference)
          for q in sources.load("gsm8k")]
    off = [(q.query, None, q.reference) for q in sources.load("fanoutqa-hop")]
    return [t for t in on if t[1] and t[2].strip()], [t for t in off if t[2].strip()]  # a few hops have blank answers


def assemble(run: Path, n: int, seed: int = 0) -> None:
    """Stream n synthetic KatRecord rows into run/records.jsonl (real texts, random labels and votes). The random
    fields are drawn by numpy a chunk at a time: drawn one by one with the random module they cost a fifth of the
    step, which is the bench's work, not assemble's."""
    import numpy as np

    from katdata.assemble_rows import RecordWriter
    from katdata.kat_bulk import gc_paused, render_checked
    from katdata.records import KatRecord

    rng = np.random.default_rng(seed)
    pools = _pool()
    domains = ("knowledge", "sports", "film")
    with RecordWriter(run / "records.jsonl") as w, gc_paused():  # as the assemble stage loops
        for first in range(0, n, CHUNK):
            m = min(CHUNK, n - first)
            ons = (rng.random(m) < 0.35).tolist()
            picks = (rng.random(m) * [len(pools[0]) if on else len(pools[1]) for on in ons]).astype(int).tolist()
            p_on, p_off = np.round(rng.random(m), 2), np.round(rng.random(m), 2)
            draws = zip(range(first, first + m), ons, picks, rng.integers(0, 3, m).tolist(),
                        rng.integers(1, 6, m).tolist(), np.round(rng.random(m), 3).tolist(), p_on.tolist(),
                        p_off.tolist(), np.round(p_on - p_off, 2).tolist())
            for i, on, pick, domain, difficulty, p_reasoning, p1, p0, margin in draws:
                mode = "on" if on else "off"
                query, think, answer = pools[0 if on else 1][pick]
                judge = JUDGE_ON if on else JUDGE_OFF
                response = render_checked(mode, judge, answer, think)  # the assemble stage's render and re-check
                w.write(KatRecord(
                    id=f"syn-{i}", query=query, mode=mode, judge=judge, think=think, answer=answer,
                    response=response, reference=answer, kind="numeric" if on else "exact",
                    tags={"domain": "math" if on else domains[domain], "task_type": "qa", "difficulty": difficulty,
                          "needs_reasoning": on, "p_reasoning": p_reasoning, "verifiability": "reference",
                          "language": "en"},
                    vote={"label": mode, "reason": "pass rates", "n_on": 4, "n_off": 4, "p_on": p1, "p_off": p0,
                          "margin": margin, "delta": 0.1, "classes_on": {answer: 3}, "samples_used": 8},
                    provenance={"source": "gsm8k" if on else "fanoutqa-hop", "models": MODELS}))


CHUNK = 4096  # records whose random fields are drawn at once


_cpu = export_limits.cpu  # this process's CPU seconds


class Phases:
    """Wall seconds per phase, summed over calls of the wrapped functions (an inner wrapped call counts
    to its own phase only, not to the caller's)."""

    def __init__(self) -> None:
        self.secs: dict[str, float] = {}
        self.stack: list[str] = []

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append(phase)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.stack.pop()
                self._add(phase, dt)
                if self.stack:
                    self._add(self.stack[-1], -dt)

        setattr(owner, name, timed)

    def _add(self, phase: str, dt: float) -> None:
        self.secs[phase] = self.secs.get(phase, 0.0) + dt


def _export_phases(ph: Phases) -> None:
    """read: pass 1 (rows per stratum, decoded in the hold-back scan's read) and pass 2's decoding of each line;
    route/hold back: the review policy's waiting ids (the scan's own work); render: the hf columns as Arrow
    arrays; parse-check: (export does not re-parse responses; assemble does); write: card stats, parquet row
    groups handed to the writer thread and the wait for it at the end, card and plot (the thread's encoding
    overlaps the other phases, so it shows only where the main thread waits for it). Timed in one process
    (worker processes would hide their phases), so the phase run is slower than the plain one on several cores."""
    from katdata import card, export, export_arrow, export_columns, export_duck, export_spans, export_write

    export_spans.MAX_WORKERS = 1
    ph.wrap(export_duck.Reader, "plan", "read")  # DuckDB's reader (a file katdata wrote: katdata.written)
    ph.wrap(export_duck, "_read_batch", "read")
    ph.wrap(export_duck.Reader, "flags", "route/hold back")
    ph.wrap(export_duck, "_table", "render")
    ph.wrap(export_arrow, "count_lines", "read")
    ph.wrap(export_arrow, "key_columns", "read")
    ph.wrap(export_arrow, "decode_block", "read")
    ph.wrap(export, "_waiting", "route/hold back")
    ph.wrap(export_columns.Batch, "table", "render")
    ph.wrap(card.CardStats, "add_table", "write")
    ph.wrap(card.CardStats, "finish", "write")
    ph.wrap(export_write.SplitWriter, "add", "write")
    ph.wrap(export_write.SplitWriter, "close", "write")
    ph.wrap(export_write.Background, "close", "write")
    ph.wrap(export.card, "write_card", "write")


def _assemble_phases(ph: Phases) -> None:
    """render: template.render; parse-check: the check that the response parses back to the same fields
    (kat_bulk.round_trips, as the assemble stage does); write: the JSONL row writer (assemble_rows.RecordWriter:
    the JSON line, written a batch at a time) (read: the query pool; other: the random draws and the KatRecord
    validation)."""
    from katdata import assemble_rows, kat_bulk, template

    ph.wrap(template, "render", "render")
    ph.wrap(kat_bulk, "round_trips", "parse-check")
    ph.wrap(assemble_rows.RecordWriter, "write", "write")
    ph.wrap(sys.modules[__name__], "_pool", "read")


class Threads:
    """CPU seconds per thread of this process while a step runs, by thread name (read from /proc/self/task every
    0.1 s; Linux only, empty elsewhere): export's serial parts, its main thread and its parquet thread, bound it
    whatever the core count."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self._before: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-threads", daemon=True)

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            name = names.get(int(tid), f"thread {tid}")
            used = (int(fields[11]) + int(fields[12])) / tick - self._before.get(name, 0.0)
            self.cpu[name] = max(self.cpu.get(name, 0.0), used)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self):
        if Path("/proc/self/task").is_dir():
            self._sample()
            self._before, self.cpu = self.cpu, {}  # what the threads alive now had used already
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._sample()
            self._stop.set()
            self._thread.join()
        self.cpu.pop("bench-threads", None)

    def serial(self) -> dict[str, float]:
        """main, parquet (export's writer thread) and other (the rest: the process pool's threads, Arrow's own)."""
        main, parquet = self.cpu.get("MainThread", 0.0), self.cpu.get("katdata-export-write", 0.0)
        return {"main": main, "parquet": parquet, "other": sum(self.cpu.values()) - main - parquet}


def _python_export(run: Path) -> Path:
    return run.with_name(f"{run.name}-export-python")


def _files(folder: Path) -> dict[str, bytes]:
    """An export folder's files and their bytes (its marker, which names the folder, left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".katdata-export.json"}


def _peak_rss() -> int:
    """This process's peak resident bytes: VmHWM where Linux gives it. ru_maxrss is no good here: a process started
    by fork and exec counts the resident size its parent had at the fork (this bench's main process, holding the
    last export's files for the comparison: 71 MB for assemble at 1M, against its own 57)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MEASURES = {"floor": export_limits.floor, "bound": export_limits.bound}  # steps that measure, not run a stage


def child(step: str, run: Path, n: int, phases: bool = False) -> dict:
    if step in MEASURES:
        return MEASURES[step](run, n)
    ph = Phases()
    if phases:
        (_assemble_phases if step == "assemble" else _export_phases)(ph)
    t, c = time.perf_counter(), _cpu()
    with Threads() as threads:
        if step == "assemble":
            run.mkdir(parents=True, exist_ok=True)
            assemble(run, n)
        else:
            from katdata.export import ExportConfig, run as export_run

            out = None
            if step == "export-python":  # the same export by the Python reader, side by side (outside the run folder)
                os.environ["KATDATA_EXPORT_DUCKDB"] = "0"
                out = _python_export(run)
            export_run(ExportConfig(out=out), run, None)
    secs, cpu = time.perf_counter() - t, _cpu() - c
    peak = _peak_rss()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # export's worker processes, when it started any
    cpu += kids.ru_utime + kids.ru_stime
    out = {"step": step, "n": n, "seconds": secs, "rate": n / secs, "cpu_s": cpu, "cpu_rate": n / cpu,
           "peak_rss_mb": peak / 2**20, "worker_rss_mb": kids.ru_maxrss / 2**10, "threads": threads.serial(),
           "worker_cpu_s": kids.ru_utime + kids.ru_stime}
    if phases:
        out["phases"] = dict(ph.secs, other=secs - sum(ph.secs.values()))
    return out


# The last committed figures: the table of docs/export_speed.md (records/s wall and per CPU-second, the step's process,
# its threads and worker processes: the steadier figure on a shared machine). A ratio below 1 is slower than then.
DOC = Path(__file__).resolve().parents[1] / "docs" / "export_speed.md"
ISSUE_29 = {("assemble", 1_000_000): 24_491, ("export", 1_000_000): 15_197, ("export", 100_000): 12_839}  # its figures


def committed(doc: Path = DOC) -> tuple[dict, dict]:
    """(records/s, records/CPU-s) per (step, count), from the doc's rows "| step | count | rate | cpu rate | ..."."""
    wall, cpu = {}, {}
    for m in re.finditer(r"^\| (assemble|export) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", doc.read_text("utf-8")
                         if doc.is_file() else "", re.M):
        key = (m[1], int(m[2].replace(",", "")))
        wall[key], cpu[key] = int(m[3].replace(",", "")), int(m[4].replace(",", ""))
    return wall, cpu


GOALS = {"assemble": 50_000, "export": 100_000}  # issue 29, records/s at the largest count


def measure(step: str, run: Path, n: int, phases: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, "--run", str(run), "-n", str(n)]
                         + (["--phases"] if phases else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{step} n={n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(x: float) -> str:
    """A ratio with at least two significant digits (a few hundred records make export a tiny fraction of the
    floor: 0.0077, not 0.01 or 0.00)."""
    return f"{x:.{max(2, 1 - math.floor(math.log10(x))) if x > 0 else 2}f}"


def _print_phases(r: dict) -> None:
    order = ("read", "route/hold back", "render", "parse-check", "write", "other")
    for name in order:
        secs = r["phases"].get(name)
        if secs is None:
            print(f"           {name:16s}       -   (not a phase of {r['step']})", flush=True)
            continue
        rate = f"{r['n'] / secs:11,.0f} records/s" if secs > 0 else "          - records/s"
        print(f"           {name:16s} {secs:7.2f} s {rate}  {100 * secs / r['seconds']:5.1f} %", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export_scale", description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary folder, removed after)")
    p.add_argument("--child", choices=["assemble", "export", "export-python", *MEASURES], help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help="export's worker processes (KATDATA_EXPORT_WORKERS; default: one per CPU, "
                   "at most 4, for files of 48 spans (about 200 MB) or more)")
    p.add_argument("--phases", action="store_true", help="time each phase (read, route/hold back, render, "
                   "parse-check, write) in a second run of each step")
    a = p.parse_args(argv)
    if a.workers:
        os.environ["KATDATA_EXPORT_WORKERS"] = str(a.workers)  # the children inherit it
    if a.child:
        print(json.dumps(child(a.child, a.run, a.n, a.phases)))
        return 0
    if a.dir:
        Path(a.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export_scale-", dir=a.dir))
    results, floors = [], {}
    try:
        for n in a.counts:
            run = work / f"run-{n}"
            for step in ("assemble", "export", "export-python"):
                r = measure(step, run, n)
                results.append(r)
                ref, ref_cpu = (table.get((step, n)) for table in committed())
                vs = f"  x{r['rate'] / ref:.2f} vs {ref:,d} (docs)" if ref else ""
                vs += f"  x{r['cpu_rate'] / ref_cpu:.2f} per CPU-s vs {ref_cpu:,d} (docs)" if ref_cpu else ""
                first = ISSUE_29.get((step, n))
                vs += f"  x{r['rate'] / first:.2f} vs {first:,d} (issue 29)" if first else ""
                kids = f" (+ workers {r['worker_rss_mb']:.0f} MB each)" if r.get("worker_rss_mb") else ""
                print(f"{step:8s} n={n:>9,d}  {r['seconds']:7.1f} s  {r['rate']:9,.0f} records/s  "
                      f"({r['cpu_rate']:9,.0f} records/CPU-s)  peak RSS {r['peak_rss_mb']:7.1f} MB{kids}{vs}",
                      flush=True)
                th = r.get("threads") or {}
                if step == "export" and th:
                    top = max(max(th.values()), 0.01)  # /proc counts in clock ticks
                    print(f"         export's threads: main {th['main']:.1f} CPU-s, parquet {th['parquet']:.1f}, other "
                          f"{th['other']:.1f}; worker processes {r['worker_cpu_s']:.1f}. The busiest thread alone caps "
                          f"export at {n / top:,.0f} records/s, whatever the core count", flush=True)
                if step == "export-python":
                    duck = next(x for x in results if x["step"] == "export" and x["n"] == n)
                    same = _files(run / "export") == _files(_python_export(run))
                    shutil.rmtree(_python_export(run))
                    print(f"         DuckDB's reader (katdata wrote records.jsonl: katdata.written) at "
                          f"x{duck['rate'] / r['rate']:.2f} of the Python reader's records/s, x"
                          f"{duck['cpu_rate'] / r['cpu_rate']:.2f} per CPU-s; the two exports "
                          f"{'byte-identical' if same else 'DIFFER'}", flush=True)
                    continue
                if a.phases:  # a second, instrumented run (wrapping costs a little): where the time goes
                    if step == "assemble":
                        (run / "records.jsonl").unlink()
                    _print_phases(measure(step, run, n, phases=True))
            exp = next(x for x in results if x["step"] == "export" and x["n"] == n)  # (not export-python's)
            fl = measure("floor", run, n)
            floors[n] = fl
            print(f"floor    n={n:>9,d}  pyarrow JSON read {fl['read_cpu_s']:.1f} CPU-s + parquet encode "
                  f"{fl['encode_cpu_s']:.1f} CPU-s: {fl['cpu_rate']:9,.0f} records/CPU-s (export's C++ parts alone; "
                  f"export at x{_ratio(exp['cpu_rate'] / fl['cpu_rate'])} of it)", flush=True)
            bd = measure("bound", run, n)
            print(f"bound    n={n:>9,d}  {bd['seconds']:7.1f} s  {bd['rate']:9,.0f} records/s  (a column-wise export's best "
                  f"case: pyarrow's threaded reader, hf columns, split, parquet, {bd['cpu_s'] / bd['seconds']:.1f} cores busy; "
                  f"export at x{_ratio(exp['rate'] / bd['rate'])} of it); the free-keyed parts it leaves out, msgspec on "
                  f"one thread: {bd['free_cpu_s']:.1f} CPU-s",
                  flush=True)
            size = sum(f.stat().st_size for f in (run / "export").rglob("*") if f.is_file())
            print(f"         export folder {size / 2**20:.1f} MB, records.jsonl "
                  f"{(run / 'records.jsonl').stat().st_size / 2**20:.1f} MB", flush=True)
            shutil.rmtree(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(a.counts), max(a.counts)
    for step in ("assemble", "export"):
        r_lo = next(r for r in results if r["step"] == step and r["n"] == lo)
        r_hi = next(r for r in results if r["step"] == step and r["n"] == hi)
        print(f"{step}: {hi:,d} vs {lo:,d} records: peak RSS ratio {r_hi['peak_rss_mb'] / r_lo['peak_rss_mb']:.2f}, "
              f"records/s ratio {r_hi['rate'] / r_lo['rate']:.2f}")
    for step, goal in GOALS.items():
        r_hi = next(r for r in results if r["step"] == step and r["n"] == hi)
        print(f"{step} goal >= {goal:,d} records/s at {hi:,d}: {r_hi['rate']:,.0f} records/s wall "
              f"({'met' if r_hi['rate'] >= goal else 'NOT met'}), {r_hi['cpu_rate']:,.0f} per CPU-second")
    cores = len(os.sched_getaffinity(0))  # the CPUs this process may use, as export's worker count counts them
    need = GOALS["export"] / cores
    print(f"export goal on {cores} cores needs >= {need:,.0f} records per CPU-second with every core busy: at most "
          f"x{floors[hi]['cpu_rate'] / need:.2f} the floor's CPU per record (see docs/export_speed.md)")
    print(f"load average now {os.getloadavg()[0]:.1f} on {cores} cores (figures from a busy machine are "
          "not comparable with the reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
