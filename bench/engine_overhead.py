"""katdata's backend vs the bare engine call on the same prompts and greedy params, alternating rounds.

    .venv/bin/python bench/engine_overhead.py [--model PATH] [--device cuda] [--dtype auto] [--rounds 5]
                                              [--prompts 64] [--tokens 128] [--backends transformers]

Per backend it runs the same prompts through ``Backend.stream`` (``--path generate``: ``generate``) and through the
bare engine call: transformers: the same batches (sorted by prompt length, ``--batch-size`` each), tokenized with
left padding, the tensors moved to ``--device``, ``model.generate`` with the same greedy settings, ``batch_decode``;
vLLM: ``LLM.generate`` on the prompt strings; openai: ``AsyncOpenAI.completions.create`` with the same concurrency.
After one warm-up of each side it runs ``--rounds`` rounds, the side that goes first alternating, and prints per
round and overall the tokens/s of each side (generated tokens up to and including the end token), the ratio
``bare/backend`` (bare tokens/s over the backend's; the goal is at most 1.02) and the share of prompts whose texts
are identical on both sides; also the ratio of the process's CPU seconds (backend/bare), which other jobs on a shared
CPU disturb less than the wall clock.
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


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bare_transformers(backend, reqs, params):
    """Texts and generated-token count of plain ``model.generate`` over the backend's own batches."""
    import torch

    tok, model, device = backend.tokenizer, backend.model, backend.device
    ends = set(backend.eos_ids)
    texts = [backend.render_prompt(r) for r in reqs]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    size = backend.config.batch_size
    extra = {k: backend.config.extra[k] for k in ("cache_implementation",) if k in backend.config.extra}
    out, n_tokens = [""] * len(texts), 0
    for lo in range(0, len(order), size):
        idx = order[lo:lo + size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=params.max_tokens, do_sample=False, top_k=None,
                                 temperature=None, top_p=None, pad_token_id=tok.pad_token_id, **extra)
        new = gen[:, enc["input_ids"].shape[1]:].tolist()
        for i, toks in zip(idx, new):
            end = next((k for k, t in enumerate(toks) if t in ends), None)
            n_tokens += len(toks) if end is None else end + 1
            out[i] = tok.decode(toks if end is None else toks[:end], skip_special_tokens=True)
    _sync(device)
    return out, n_tokens


def bare_vllm(backend, reqs, params):
    import vllm

    sp = vllm.SamplingParams(temperature=0, max_tokens=params.max_tokens)
    outs = backend.llm.generate([backend.render_prompt(r) for r in reqs], sp, use_tqdm=False)
    return [o.outputs[0].text for o in outs], sum(len(o.outputs[0].token_ids) for o in outs)


def bare_openai(backend, reqs, params):
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=backend.base_urls[0], api_key=backend._key or "none", max_retries=0)
        sem = asyncio.Semaphore(backend.config.concurrency)

        async def one(r):
            async with sem:
                resp = await client.completions.create(model=backend.model_id, prompt=r.prompt(),
                                                       max_tokens=params.max_tokens, temperature=0)
                return resp.choices[0].text, resp.usage.completion_tokens

        try:
            return await asyncio.gather(*(one(r) for r in reqs))
        finally:
            await client.close()

    pairs = asyncio.run(run())
    return [t for t, _ in pairs], sum(n for _, n in pairs)


BARE = {"transformers": bare_transformers, "vllm": bare_vllm, "openai": bare_openai}


def kat_side(backend, reqs, params, path):
    """The stages' path (every request handed to ``Backend.stream``) or one ``generate`` call."""
    from katdata.backends.base import Job

    if path == "generate":
        comps = [c[0] for c in backend.generate(reqs, params)]
    else:
        comps = [None] * len(reqs)
        for job, cs in backend.stream(Job(i, r, params) for i, r in enumerate(reqs)):
            comps[job.key] = cs[0]
    _sync(getattr(backend, "device", "cpu"))
    return [c.text for c in comps], sum(c.completion_tokens for c in comps)


def measure(name, backend, reqs, params, rounds, path="stream"):
    """Alternating rounds; returns the overall ratio bare tokens/s over backend tokens/s."""
    sides = {"backend": lambda: kat_side(backend, reqs, params, path),
             "bare": lambda: BARE[name](backend, reqs, params)}
    for fn in sides.values():  # warm-up (allocator, kernels, vLLM's prefix cache)
        fn()
    total = {s: [0.0, 0, 0.0] for s in sides}
    same_all = 0
    for r in range(rounds):
        order = ["backend", "bare"] if r % 2 == 0 else ["bare", "backend"]
        got = {}
        for side in order:
            t0, c0 = time.perf_counter(), time.process_time()
            texts, n = sides[side]()
            got[side] = (texts, n, time.perf_counter() - t0, time.process_time() - c0)
            total[side][0] += got[side][2]
            total[side][1] += n
            total[side][2] += got[side][3]
        rate = {s: got[s][1] / got[s][2] for s in sides}
        same = sum(a == b for a, b in zip(got["backend"][0], got["bare"][0]))
        same_all += same
        print(f"{name} round {r + 1} ({order[0]} first): backend {rate['backend']:,.1f} tok/s "
              f"({got['backend'][1]} tokens, {got['backend'][2]:.2f}s)  bare {rate['bare']:,.1f} tok/s "
              f"({got['bare'][1]} tokens, {got['bare'][2]:.2f}s)  bare/backend={rate['bare'] / rate['backend']:.3f}  "
              f"identical {same}/{len(reqs)}  cpu-time ratio backend/bare={got['backend'][3] / got['bare'][3]:.3f}", flush=True)
    rate = {s: total[s][1] / total[s][0] for s in sides}
    ratio = rate["bare"] / rate["backend"]
    print(f"{name}: {rounds} rounds of {len(reqs)} prompts x {params.max_tokens} tokens: backend {rate['backend']:,.1f} "
          f"tok/s  bare {rate['bare']:,.1f} tok/s  bare/backend={ratio:.3f}  identical texts "
          f"{same_all / (rounds * len(reqs)):.1%}  cpu-time ratio backend/bare={total['backend'][2] / total['bare'][2]:.3f}",
          flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/engine_overhead.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when torch sees a GPU)")
    ap.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32 (katdata.dtypes)")
    ap.add_argument("--backends", default="transformers", help="comma list of transformers, vllm, openai")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt (greedy)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-implementation", default=None, help="transformers: e.g. static (both sides)")
    ap.add_argument("--path", default="stream", choices=["stream", "generate"],
                    help="katdata's side: Backend.stream (what the stages use) or generate")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    reqs, params = prompts(args.prompts), SamplingParams(max_tokens=args.tokens)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for name in args.backends.split(","):
        server = None
        if name == "openai":
            from katdata import servers

            os.environ.setdefault("KATDATA_BENCH_KEY", "sk-bench-" + os.urandom(8).hex())
            server = servers.start(api_key_env="KATDATA_BENCH_KEY")
            cfg = EngineConfig(backend=name, model=server.served_name, base_url=server.base_url,
                               api_key_env="KATDATA_BENCH_KEY", concurrency=args.batch_size)
        else:
            extra = {"device": args.device} if args.device else {}
            if args.cache_implementation:
                extra["cache_implementation"] = args.cache_implementation
            cfg = EngineConfig(backend=name, model=args.model, dtype=args.dtype, batch_size=args.batch_size,
                               max_model_len=2048, enforce_eager=True, extra=extra)
        backend = get_backend(name, cfg)
        print(f"{name}: model {getattr(backend, 'path', cfg.model)} device {getattr(backend, 'device', '-')} "
              f"dtype {getattr(backend, 'dtype_name', cfg.dtype)}", flush=True)
        try:
            measure(name, backend, reqs, params, args.rounds, args.path)
        finally:
            backend.close()
            if server:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
