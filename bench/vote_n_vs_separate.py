"""Voting cost on the real embedded model, measured side by side in one run.

1. One request with n=N per (query, mode) vs N separate requests (N generate calls of n=1),
   and vs N identical requests batched into one call: wall-time ratios.
2. Early-stopped rounds (2, 4, 8 by default): N samples per mode are drawn for every query (one
   n=N request per mode), then the rounds are replayed on the first k samples of each mode
   (statistically the same as drawing k): samples saved, and whether any label differs from the
   label on all N samples.

    .venv/bin/python bench/vote_n_vs_separate.py            # ~30 queries, a few minutes on 2 cores
    .venv/bin/python bench/vote_n_vs_separate.py --queries 10 --timing-queries 2 --n 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from katdata import sources
from katdata.backends import EngineConfig, SamplingParams, get_backend
from katdata.prompt_files import read_prompt
from katdata.sample import SampleConfig, request_for, sample_queries
from katdata.template import STOP_STRINGS
from katdata.verify import Verifier
from katdata.vote import VoteConfig, settled, verdicts, vote


def timing(backend, queries, n: int, max_tokens: int, repeats: int = 2) -> dict:
    neutral = read_prompt("judge_neutral.txt")
    params = SamplingParams(n=n, temperature=0.8, top_p=0.95, max_tokens=max_tokens, stop=tuple(STOP_STRINGS), seed=1)
    one = params.with_(n=1)
    reqs = [request_for(q, mode, neutral) for q in queries for mode in ("on", "off")]
    backend.generate(reqs[:1], params.with_(max_tokens=4))  # warm-up, not timed

    def n_request():
        return sum(c.completion_tokens for r in reqs for c in backend.generate([r], params)[0])

    def separate():
        return sum(backend.generate([r], one.with_(seed=1 + i))[0][0].completion_tokens for r in reqs for i in range(n))

    def batched():
        return sum(c[0].completion_tokens for r in reqs for c in backend.generate([r] * n, one))

    out = {"n_request_s": 0.0, "separate_calls_s": 0.0, "batched_copies_s": 0.0}
    toks = {}
    for rep in range(repeats):  # interleaved, so drift in machine load hits all three alike
        for name, fn in (("n_request_s", n_request), ("separate_calls_s", separate), ("batched_copies_s", batched)):
            t = time.perf_counter()
            toks[name] = toks.get(name, 0) + fn()
            out[name] += time.perf_counter() - t
    toks_a, toks_b, toks_c = toks["n_request_s"], toks["separate_calls_s"], toks["batched_copies_s"]
    out.update(tokens_n_request=toks_a, tokens_separate=toks_b, tokens_batched=toks_c,
               ratio_separate_over_n=out["separate_calls_s"] / out["n_request_s"],
               ratio_batched_over_n=out["batched_copies_s"] / out["n_request_s"],
               tok_per_s_n_request=toks_a / out["n_request_s"], tok_per_s_separate=toks_b / out["separate_calls_s"])
    return out


def replay(states, n: int, rounds: list[int], delta: float, confidence: float) -> dict:
    cfg = VoteConfig(n=n, delta=delta, explore_share=0.0)
    used = changed = stopped = 0
    changes = []
    for qid, st in states.items():
        full = vote(qid, st.rows["on"] + st.rows["off"], cfg)
        for k in sorted({r for r in rounds if r < n}) + [n]:
            part = st.rows["on"][:k] + st.rows["off"][:k]
            ok, _ = verdicts(part)
            s_on, s_off = sum(ok[:k]), sum(ok[k:])
            if k == n or settled(s_on, k, s_off, k, n, delta, confidence):
                break
        used += 2 * k
        stopped += k < n
        early = vote(qid, part, cfg)
        if early.label != full.label:
            changed += 1
            changes.append({"id": qid, "early": early.label, "full": full.label, "at": k})
    total = 2 * n * len(states)
    return {"confidence": confidence, "samples_full": total, "samples_used": used, "saved": total - used,
            "saved_share": (total - used) / total, "queries_stopped_early": stopped, "labels_changed": changed,
            "changes": changes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=30, help="queries for the early-stop replay (half GSM8K, half fanoutqa-hop)")
    p.add_argument("--timing-queries", type=int, default=4, help="queries for the n=N vs separate timing")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rounds", default="2,4,8")
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--max-tokens-on", type=int, default=128)
    p.add_argument("--max-tokens-off", type=int, default=48)
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    backend = get_backend("transformers", EngineConfig())
    print(f"model loaded in {time.perf_counter() - t0:.1f}s")
    half = args.queries // 2
    queries = sources.load("gsm8k", limit=half, seed=0) + sources.load("fanoutqa-hop", limit=args.queries - half, seed=0)

    tq = queries[: args.timing_queries // 2] + queries[half: half + args.timing_queries - args.timing_queries // 2]
    t = timing(backend, tq, min(args.n, 4), args.max_tokens_off)
    print(f"[timing] {len(tq)} queries x 2 modes, N={min(args.n, 4)}: one n=N request {t['n_request_s']:.1f}s, "
          f"N separate calls {t['separate_calls_s']:.1f}s (ratio {t['ratio_separate_over_n']:.2f}x), "
          f"N copies batched in one call {t['batched_copies_s']:.1f}s (ratio {t['ratio_batched_over_n']:.2f}x)")

    cfg = SampleConfig(n=args.n, rounds=[], max_tokens_on=args.max_tokens_on, max_tokens_off=args.max_tokens_off)
    t1 = time.perf_counter()
    states = sample_queries(queries, cfg, backend, Verifier())
    sample_s = time.perf_counter() - t1
    rounds = [int(x) for x in args.rounds.split(",") if x]
    results = {"timing": t, "sample_s": sample_s, "queries": len(queries), "n": args.n, "rounds": rounds}
    answered = sum(a.answer is not None for st in states.values() for m in ("on", "off") for a in st.rows[m])
    correct = {m: sum(bool(a.correct) for st in states.values() for a in st.rows[m]) for m in ("on", "off")}
    print(f"[sample] {len(queries)} queries x 2 modes x N={args.n} in {sample_s:.1f}s; "
          f"{answered} of {2 * args.n * len(queries)} samples had an answer; correct on={correct['on']} off={correct['off']}")
    for conf in (0.95, 0.8, 1.0):
        r = replay(states, args.n, rounds, args.delta, conf)
        results[f"early_stop_{conf}"] = r
        print(f"[early stop, confidence {conf}] samples used {r['samples_used']}/{r['samples_full']} "
              f"(saved {r['saved_share']:.0%}), {r['queries_stopped_early']} queries stopped early, "
              f"labels changed: {r['labels_changed']} {r['changes'] or ''}")
    labels = [vote(q, st.rows["on"] + st.rows["off"], VoteConfig(n=args.n, explore_share=0.0)).label
              for q, st in states.items()]
    results["labels_full"] = {str(k): labels.count(k) for k in set(labels)}
    print(f"[labels at N] {results['labels_full']}")
    no_answer = Counter(a.reason.split(":")[0] + ":" + (a.reason.split(":")[1].split(",")[0] if ":" in a.reason else "")
                        for st in states.values() for m in ("on", "off") for a in st.rows[m] if a.reason)
    results["no_answer_reasons"] = dict(no_answer)
    print(f"[no answer, by first error] {dict(no_answer)}")
    backend.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
