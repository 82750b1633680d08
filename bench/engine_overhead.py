"""katdata's backend vs the bare engine call on the same prompts and params, alternating, one run.

    .venv/bin/python bench/engine_overhead.py [--backends transformers,vllm,openai] [--prompts 64]

Per backend it runs the same batches through ``Backend.stream`` (``--path generate``: ``generate``) and the bare call
(transformers: tokenize with left padding, ``model.generate``, decode; vLLM: ``LLM.generate`` on the
prompt strings; openai: ``AsyncOpenAI.completions.create`` with the same concurrency), alternating
rounds after one warm-up of each, and prints ``overhead_ratio=`` (katdata time / bare time, the sum
over rounds). Goal: at most 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from katdata.backends import EngineConfig, Request, SamplingParams, get_backend

QUESTIONS = [
    "What is {a} + {b}?", "Name a country that starts with the letter {l}.", "Give a synonym of '{w}'.",
    "Write one sentence about the number {a}.",
]
WORDS = ["quick", "bright", "calm", "large", "small", "happy", "cold", "old"]


def prompts(n: int) -> list[Request]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)].format(a=i * 7 % 97, b=i * 13 % 89, l=chr(65 + i % 26), w=WORDS[i % 8])
        out.append(Request(messages=[{"role": "user", "content": q}]))
    return out


def bare_transformers(backend, reqs, params):
    import torch

    tok, model = backend.tokenizer, backend.model
    texts = sorted((r.prompt() for r in reqs), key=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    outs = []
    for lo in range(0, len(texts), backend.config.batch_size):
        enc = tok(texts[lo:lo + backend.config.batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=params.max_tokens, do_sample=False, top_k=None,
                                 temperature=None, top_p=None, pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def bare_vllm(backend, reqs, params):
    import vllm

    sp = vllm.SamplingParams(temperature=0, max_tokens=params.max_tokens)
    return [o.outputs[0].text for o in backend.llm.generate([r.prompt() for r in reqs], sp, use_tqdm=False)]


def bare_openai(backend, reqs, params):
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=backend.base_urls[0], api_key=backend._key or "none", max_retries=0)
        sem = asyncio.Semaphore(backend.config.concurrency)

        async def one(r):
            async with sem:
                resp = await client.completions.create(model=backend.model_id, prompt=r.prompt(),
                                                       max_tokens=params.max_tokens, temperature=0)
                return resp.choices[0].text

        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await client.close()

    return asyncio.run(run())


BARE = {"transformers": bare_transformers, "vllm": bare_vllm, "openai": bare_openai}


def kat_stream(backend, reqs, params):
    """The stages' path: every request handed to ``Backend.stream``, completions taken as they finish."""
    from katdata.backends.base import Job

    out = [None] * len(reqs)
    for job, comps in backend.stream(Job(i, r, params) for i, r in enumerate(reqs)):
        out[job.key] = comps[0].text
    return out


def measure(name, backend, reqs, params, rounds, path="stream"):
    bare = BARE[name]
    kat = (lambda: kat_stream(backend, reqs, params)) if path == "stream" else (lambda: backend.generate(reqs, params))
    kat()  # warm-up (and vLLM's prefix cache) for both paths
    bare(backend, reqs, params)
    t_kat = t_bare = 0.0
    for r in range(rounds):
        order = [("kat", kat), ("bare", lambda: bare(backend, reqs, params))]
        for label, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if label == "kat":
                t_kat += dt
            else:
                t_bare += dt
    ratio = t_kat / t_bare
    print(f"{name}: katdata {t_kat:.2f}s bare {t_bare:.2f}s over {rounds} rounds of {len(reqs)} prompts, "
          f"{params.max_tokens} new tokens  overhead_ratio={ratio:.3f}", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/engine_overhead.py", description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="transformers,vllm", help="comma list of transformers, vllm, openai")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--path", default="stream", choices=["stream", "generate"],
                    help="katdata's side: Backend.stream (what the stages use) or generate")
    args = ap.parse_args(argv)
    reqs, params = prompts(args.prompts), SamplingParams(max_tokens=args.max_tokens)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for name in args.backends.split(","):
        server = None
        if name == "openai":
            from katdata import servers

            os.environ.setdefault("KATDATA_BENCH_KEY", "sk-bench-" + os.urandom(8).hex())
            server = servers.start(api_key_env="KATDATA_BENCH_KEY")
            cfg = EngineConfig(model=server.served_name, base_url=server.base_url, api_key_env="KATDATA_BENCH_KEY",
                                concurrency=args.batch_size)
        else:
            cfg = EngineConfig(batch_size=args.batch_size, max_model_len=2048, enforce_eager=True)
        backend = get_backend(name, cfg)
        try:
            measure(name, backend, reqs, params, args.rounds, args.path)
        finally:
            backend.close()
            if server:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
