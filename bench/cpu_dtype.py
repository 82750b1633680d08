"""Which dtype should the transformers backend use on this CPU? bf16 against fp32, side by side in one run.

The backend's ``dtype: auto`` takes bf16 on a CPU that computes it natively (AVX512-BF16 or AMX) and fp32
elsewhere (katdata.backends.hf.native_bf16_cpu). This bench generates the same greedy batch with the
embedded model in both dtypes, alternating them ``--rounds`` times (the machine is noisy), and prints the
seconds of each, the ratio bf16 / fp32 and what ``auto`` picks here. A ratio above 1 means bf16 is the
slower one on this CPU, and ``auto`` should pick fp32.

    .venv/bin/python bench/cpu_dtype.py [--prompts 4] [--max-tokens 16] [--rounds 2]

Measured on the 2-core AVX2 AMD EPYC of the project machine (2026-12-05, another job running): 4 prompts x
16 tokens, bf16 43 s, fp32 17 s (ratio 2.5); auto picks fp32 there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from katdata.backends import EngineConfig, Request, SamplingParams, get_backend
    from katdata.backends.hf import native_bf16_cpu

    reqs = [Request([{"role": "user", "content": f"What is {i} + 17? Explain each step."}], "<judge>\n")
            for i in range(a.prompts)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0)
    backends = {d: get_backend("transformers", EngineConfig(dtype=d, batch_size=a.prompts))
                for d in ("bfloat16", "float32")}
    times: dict[str, list[float]] = {d: [] for d in backends}
    for d, b in backends.items():  # warm-up, not timed
        b.generate(reqs[:1], SamplingParams(max_tokens=2, temperature=0))
    for _ in range(a.rounds):
        for d, b in backends.items():
            t0 = time.perf_counter()
            b.generate(reqs, params)
            times[d].append(time.perf_counter() - t0)
    bf16, fp32 = statistics.median(times["bfloat16"]), statistics.median(times["float32"])
    print(f"{a.prompts} prompts x {a.max_tokens} tokens, median of {a.rounds} rounds")
    print(f"  bf16 {bf16:.1f} s   fp32 {fp32:.1f} s   ratio bf16/fp32 {bf16 / fp32:.2f}")
    print(f"  native bf16 on this CPU: {native_bf16_cpu()}; auto picks {'bf16' if native_bf16_cpu() else 'fp32'}"
          f" ({'right' if (bf16 < fp32) == native_bf16_cpu() else 'WRONG'} by this measurement)")
    for b in backends.values():
        b.close()


if __name__ == "__main__":
    main()
