#!/usr/bin/env bash
# GPU check (not part of `make test`): on a machine with CUDA torch, under 8 minutes on one GPU.
#   bash bench/gpu_check.sh [--model PATH | --random-init CONFIG_JSON] [--only PART ...]
#   PY=/path/to/python bash bench/gpu_check.sh ...       (default: .venv/bin/python, else python3)
# Parts (bench/gpu_check.py says what each measures): overhead, lora, qlora, packing, grpo, cli; one line
# "gpu_check PART: ok|FAIL|SKIP ..." each, then a summary table; exit 1 when a part failed.
# GPU_CHECK_DEVICE=cpu runs every part small on the CPU: a dry run of the script (its figures say nothing of a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
LIMIT=480
[ "$DEVICE" = cpu ] && LIMIT=2400  # the dry run on a 2-core CPU is slow
exec timeout "$LIMIT" "$PY" bench/gpu_check.py --device "$DEVICE" "$@"
