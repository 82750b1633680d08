"""Tagging and solving throughput on the embedded model, and the LLM tagger's parse-failure rate.

    .venv/bin/python bench/tag_solve_rate.py --backends transformers,vllm --gsm8k 16 --hops 16 --solve 4

On a GSM8K + FanOutQA single-hop mix (real data from the packages): per backend, queries/s of
the rule prior alone and of rule + LLM tagger (same queries, side by side), the LLM tagger's
parse-failure rate with its reasons, rule/LLM agreement, and queries/s of the multi-agent solver
(one round, all three roles). Prints one JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run_dir_with(queries, root: Path, name: str) -> Path:
    from katdata.runfiles import RowWriter

    d = root / name
    d.mkdir(parents=True)
    with RowWriter(d / "queries.jsonl") as w:
        w.write_all(queries)
    return d


def bench_backend(name: str, queries, solve_n: int, args, root: Path) -> dict:
    from katdata import solve, tag
    from katdata.backends import EngineConfig, get_backend

    extra = {"max_model_len": 2048}
    if name == "vllm":
        extra["enforce_eager"] = True
    t0 = time.perf_counter()
    backend = get_backend(name, EngineConfig(batch_size=args.batch_size, **extra))
    out = {"load_s": round(time.perf_counter() - t0, 1), "model": backend.model_id}
    try:
        cfg = tag.TagConfig(max_tokens=args.tag_tokens, batch_size=len(queries))
        rule = tag.run(cfg.model_copy(update={"use_llm": False}), run_dir_with(queries, root, f"{name}-rule"), None)
        llm = tag.run(cfg, run_dir_with(queries, root, f"{name}-llm"), lambda e: backend)
        out["tag"] = {"queries": len(queries), "rule_only_qps": rule["queries_per_s"], "llm_qps": llm["queries_per_s"],
                      "llm_over_rule_time": round(rule["queries_per_s"] / llm["queries_per_s"], 1),
                      "parse_failure_rate": llm["llm_parse_failure_rate"], "parse": llm["llm_parse"],
                      "agreement": {k: v["rate"] for k, v in llm["agreement"].items()},
                      "think_off_candidates": llm["think_off_candidates"], "tokens": llm["tokens"],
                      "failure_rate_by_source": by_source(root / f"{name}-llm", queries)}
        scfg = solve.SolveConfig(rounds=0, max_tokens=args.solve_tokens, critic_max_tokens=48, chunk_size=solve_n)
        s = solve.run(scfg, run_dir_with(queries[:solve_n // 2] + queries[-(solve_n - solve_n // 2):], root,
                                         f"{name}-solve"), lambda e: backend)
        out["solve"] = {"queries": s["queries_new"], "qps": s["queries_per_s"], "seconds": s["seconds"],
                        "accepted": s["accepted"], "rejects": s["rejects"], "tokens": s["tokens"]}
    finally:
        backend.close()
    return out


def by_source(run_dir: Path, queries) -> dict:
    from katdata.records import Tags
    from katdata.runfiles import read_rows

    src = {q.id: q.source for q in queries}
    counts: dict[str, list[int]] = {}
    for t in read_rows(run_dir / "tags.jsonl", Tags):
        c = counts.setdefault(src[t.id], [0, 0])
        c[0] += bool(t.llm_error) and not t.llm_error.startswith("partial")
        c[1] += 1
    return {k: round(f / n, 3) for k, (f, n) in counts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="transformers", help="comma-separated: transformers,vllm")
    ap.add_argument("--gsm8k", type=int, default=16)
    ap.add_argument("--hops", type=int, default=16)
    ap.add_argument("--solve", type=int, default=4, help="queries solved (half GSM8K, half single-hop)")
    ap.add_argument("--tag-tokens", type=int, default=48)
    ap.add_argument("--solve-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from katdata import sources

    queries = sources.load("gsm8k", args.gsm8k, seed=args.seed) + sources.load("fanoutqa-hop", args.hops, seed=args.seed)
    result = {"mix": {"gsm8k": args.gsm8k, "fanoutqa-hop": args.hops}, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="tag-solve-bench-") as tmp:
        for name in args.backends.split(","):
            result["backends"][name] = bench_backend(name, queries, args.solve, args, Path(tmp))
            print(json.dumps({name: result["backends"][name]}), flush=True)
    names = list(result["backends"])
    if len(names) == 2:
        a, b = (result["backends"][n] for n in names)
        result[f"tag_llm_qps_{names[0]}_over_{names[1]}"] = round(a["tag"]["llm_qps"] / b["tag"]["llm_qps"], 2)
        result[f"solve_qps_{names[0]}_over_{names[1]}"] = round(a["solve"]["qps"] / b["solve"]["qps"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
