#!/usr/bin/env bash
# GPU check (not part of `make test`): on a machine with CUDA torch, ten minutes at most.
#   bash bench/gpu_check.sh [PYTHON]        (default: .venv/bin/python)
# 1. the transformers backend on CUDA: a batch of the embedded model, tokens/s;
# 2. a LoRA step in bf16 (katdata.train on demo records), steps/s;
# 3. the streaming eval on that adapter (base and adapter on one engine), tokens/s.
# Each part prints one line "gpu_check PART: ... tokens_per_s=..." and the script exits non-zero
# on the first failure. GPU_CHECK_DEVICE=cpu runs the same parts, smaller, on the CPU: a check of the
# script itself on a machine without a GPU (its figures say nothing of a GPU).
set -euo pipefail
PY="${1:-.venv/bin/python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d -t katdata-gpu-check-XXXX)"
trap 'rm -rf "$WORK"' EXIT

timeout 600 "$PY" - "$WORK" <<'PY'
import json, sys, time
from pathlib import Path

import torch

import os

device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
cuda = device == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
n_req, n_tok = (64, 128) if cuda else (8, 24)  # the CPU dry run checks the script, not the speed
work = Path(sys.argv[1])
print(f"gpu_check device: {torch.cuda.get_device_name(0) if cuda else 'cpu (dry run of the script)'} "
      f"bf16={torch.cuda.is_bf16_supported() if cuda else True}", flush=True)

# 1. transformers backend on CUDA
from katdata.backends import EngineConfig, Request, SamplingParams, get_backend

backend = get_backend("transformers", EngineConfig(batch_size=64, extra={"device": device}))
assert backend.device == device, backend.device
reqs = [Request([{"role": "user", "content": f"Write two sentences about the number {i}."}]) for i in range(n_req)]
params = SamplingParams(max_tokens=n_tok, temperature=0.7, seed=0)
backend.generate(reqs[:4], params.with_(max_tokens=8))  # warm-up
sync()
t0 = time.perf_counter()
outs = backend.generate(reqs, params)
sync()
secs = time.perf_counter() - t0
tokens = sum(c[0].completion_tokens for c in outs)
print(f"gpu_check transformers: {len(reqs)} requests tokens={tokens} tokens_per_s={tokens / secs:.0f}", flush=True)

# 2. a LoRA step in bf16
sys.path.insert(0, "tests")
from demo_data import demo_records

from katdata.runfiles import RowWriter
from katdata.train import TrainConfig, run as train_run

run_dir = work / "run"
run_dir.mkdir()
with RowWriter(run_dir / "records.jsonl") as w:
    w.write_all(demo_records(16, 16, seed=3))
t0 = time.perf_counter()
stats = train_run(TrainConfig(holdout=8, max_steps=4, batch_size=4, max_length=256, warmup_steps=0, bf16=True,
                              save_steps=4), run_dir)
secs = time.perf_counter() - t0
print(f"gpu_check lora_bf16: steps=4 seconds={secs:.1f} stats={json.dumps(stats, default=str)[:300]}", flush=True)

# 3. the streaming eval, base and adapter on the one engine
from katdata.evaluate import EvalConfig, run as eval_run

t0 = time.perf_counter()
result = eval_run(EvalConfig(max_tokens=n_tok, plots=False, limit=None if cuda else 4), run_dir, lambda name: backend)
secs = time.perf_counter() - t0
rows = [json.loads(x) for x in (run_dir / "eval" / "generations.jsonl").read_text().splitlines()]
tokens = sum(r["tokens"] for r in rows)
print(f"gpu_check eval_stream: generations={len(rows)} tokens={tokens} tokens_per_s={tokens / secs:.0f} "
      f"adapted_auto_accuracy={result['models']['adapted']['settings']['auto']['accuracy']}", flush=True)
print("gpu_check: ok")
PY
