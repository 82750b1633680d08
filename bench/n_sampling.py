"""8 samples per prompt: one n=8 request vs 8 separate requests, side by side in one run.

    .venv/bin/python bench/n_sampling.py [--backend vllm] [--prompts 16] [--samples 8]

Both ways go through ``Backend.stream`` (the stages' path) in one wave (the separate requests are batched too, each
with its own seed), alternating over rounds after a warm-up. Prints ``speedup=`` (separate / n).
Goal on a GPU with vLLM: at least 3. vLLM's prefix cache (on) lets separate requests share the
prompt as well, so the gain of n is what remains: one scheduling and prompt pass per prompt.
"""

from __future__ import annotations

import argparse
import os
import time

from katdata.backends import EngineConfig, Request, SamplingParams, get_backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/n_sampling.py", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="vllm", help="vllm or transformers")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=200, help="length of each prompt's context")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    backend = get_backend(args.backend, EngineConfig(max_model_len=2048, enforce_eager=True, batch_size=64))
    filler = " ".join(["The report lists figures for each region and year."] * (args.prompt_words // 9))
    reqs = [Request([{"role": "user", "content": f"{filler}\nQuestion {i}: summarise the report in one line."}])
            for i in range(args.prompts)]
    k = args.samples
    params = SamplingParams(n=k, temperature=0.8, max_tokens=args.max_tokens, seed=None)  # seeded copies would repeat

    from katdata.backends.base import Job

    def with_n():  # the stages' path: Backend.stream
        return list(backend.stream(Job(i, r, params) for i, r in enumerate(reqs)))

    def separate_batched():  # unseeded: distinct
        return list(backend.stream(Job(i, r, params.with_(n=1)) for i, r in enumerate(r for r in reqs for _ in range(k))))

    with_n(), separate_batched()
    t_n = t_sep = 0.0
    for r in range(args.rounds):
        pair = [("n", with_n), ("sep", separate_batched)]
        for label, fn in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            t_n, t_sep = (t_n + dt, t_sep) if label == "n" else (t_n, t_sep + dt)
    print(f"{args.backend}: {args.prompts} prompts x {k} samples, {args.max_tokens} new tokens: "
          f"n={k} {t_n:.2f}s, {k} separate requests {t_sep:.2f}s  speedup={t_sep / t_n:.2f}", flush=True)
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
