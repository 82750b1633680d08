"""The GPU check's parts, each in its own process with its own time limit (bench/gpu_check.sh runs them all).

    python bench/gpu_check.py [--model PATH | --random-init CONFIG_JSON] [--device cuda|cpu] [--only PART ...]

Parts, one line each ("gpu_check PART: ok|FAIL|SKIP ..."), then a summary table:
  overhead  bench/engine_overhead.py: the transformers backend against bare ``model.generate``, 5 rounds
  lora      `katdata.train` in the device's dtype: steps/s, trained tokens/s, peak memory against the plan
  qlora     the same in 4-bit NF4 (bitsandbytes)
  packing   bench/train_throughput.py: katdata (packed) against plain TRL SFTTrainer, trained tokens/s
  grpo      `katdata.rl`: 2 GRPO steps on the lora part's adapter
  cli       `katdata train` then `katdata eval` as commands on a bare run folder
``--random-init CONFIG_JSON`` builds a model with random weights from that config (bf16, seed 0) and the embedded
model's tokenizer, with the end-of-sequence row of the output layer zeroed, so greedy decoding always runs to the
token limit and both sides of a comparison generate the same tokens: no weights need to travel. On ``--device cpu``
(``GPU_CHECK_DEVICE=cpu`` in gpu_check.sh) every part runs small: a dry run of the script, its figures say nothing
of a GPU. A failing part does not stop the next; the exit status is 1 when any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("overhead", "lora", "qlora", "packing", "grpo", "cli")
# seconds per part: on a GPU 470 in all (the check stays under 8 minutes); the CPU dry run is slower
LIMITS = {"cuda": {"overhead": 90, "lora": 60, "qlora": 90, "packing": 90, "grpo": 60, "cli": 80},
          "cpu": {"overhead": 300, "lora": 300, "qlora": 400, "packing": 400, "grpo": 400, "cli": 400}}


def random_model(config_json: Path, out: Path) -> Path:
    """A model folder with random weights drawn from ``config_json`` and the embedded tokenizer (EOS row zeroed)."""
    import torch
    import transformers

    from katdata.model import resolve

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(str(config_json))
    tok = transformers.AutoTokenizer.from_pretrained(resolve(None))
    config.vocab_size = max(config.vocab_size, len(tok))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for eos in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}:
            model.get_output_embeddings().weight[eos].zero_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _records(run_dir: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from demo_data import demo_records

    from katdata.runfiles import RowWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    with RowWriter(run_dir / "records.jsonl") as w:
        w.write_all(demo_records(n, n, seed=3))


def _peak_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def part_train(model: str, device: str, work: Path, quantization=None) -> str:
    from katdata.train import TrainConfig, run

    small = device == "cpu"
    run_dir = work / ("qlora" if quantization else "lora")
    _records(run_dir, 4 if small else 16)
    cfg = TrainConfig(model=model, holdout=2 if small else 8, max_steps=2 if small else 10, batch_size=2 if small else 4,
                      max_length=128 if small else 512, warmup_steps=0, save_steps=100, quantization=quantization)
    estimate = ""
    try:
        from katdata import memory_plan

        plan = memory_plan.plan_for_train(cfg, model)
        estimate = f" plan_gb={plan.total / 2**30:.2f}"
    except Exception as exc:  # the plan is a figure beside the measurement, not a condition of it
        estimate = f" plan=({type(exc).__name__}: {exc})"[:200]
    t0 = time.perf_counter()
    stats = run(cfg, run_dir)
    secs = time.perf_counter() - t0
    return (f"steps={stats['steps']} dtype={stats['dtype']} quantization={stats['quantization']} "
            f"tokens_per_s={stats['tokens_per_s']} wall_s={secs:.1f} peak_gb={_peak_gb(device):.2f}{estimate}")


def part_grpo(model: str, device: str, work: Path) -> str:
    from katdata.rl import RLConfig, run

    run_dir = work / "lora"
    if not (run_dir / "train" / "adapter").is_dir():
        return "SKIP: the lora part left no adapter"
    t0 = time.perf_counter()
    stats = run(RLConfig(model=model, max_steps=2, num_generations=4, forced_per_mode=1,
                         max_completion_length=32 if device == "cpu" else 128, save_steps=100), run_dir)
    secs = time.perf_counter() - t0
    return f"steps={stats['steps']} dtype={stats['dtype']} seconds_per_step={secs / max(stats['steps'], 1):.1f}"


def part_cli(model: str, device: str, work: Path) -> str:
    run_dir = work / "cli"
    _records(run_dir, 4 if device == "cpu" else 16)
    py = [sys.executable, "-m", "katdata"]
    train = [*py, "train", str(run_dir), "--set", f"model={model}", "--set", "max_steps=2", "--set", "holdout=4",
             "--set", "batch_size=2", "--set", "max_length=256"]
    t0 = time.perf_counter()
    _command(train)
    t1 = time.perf_counter()
    _command([*py, "eval", str(run_dir), "--limit", "4", "--max-tokens", "32" if device == "cpu" else "128"])
    t2 = time.perf_counter()
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    return f"train_s={t1 - t0:.1f} eval_s={t2 - t1:.1f} eval_dtype={ev.get('dtype')} heldout={ev['heldout']}"


def _command(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:4])}: " + (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])


def _bench(script: str, model: str, device: str, extra: list[str]) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--model", model, "--device", device, *extra],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{script}: " + (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
    lines = [x for x in done.stdout.strip().splitlines() if x and x[0] not in ' {}[]"']  # not its JSON dump
    return " | ".join(lines[-3:])  # the bench's summary lines


def run_part(name: str, model: str, device: str, work: Path) -> str:
    cpu = device == "cpu"
    if name == "overhead":
        return _bench("engine_overhead.py", model, device, ["--rounds", "5", "--prompts", "8" if cpu else "64",
                                                           "--tokens", "16" if cpu else "128"])
    if name == "packing":
        return _bench("train_throughput.py", model, device, ["--steps", "2" if cpu else "20"])
    if name in ("lora", "qlora"):
        if name == "qlora":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                return "SKIP: bitsandbytes is not installed"
        return part_train(model, device, work, "4bit" if name == "qlora" else None)
    if name == "grpo":
        return part_grpo(model, device, work)
    return part_cli(model, device, work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the embedded model)")
    ap.add_argument("--random-init", type=Path, help="config.json of a model to build with random weights")
    ap.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"), choices=("cuda", "cpu"))
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(run_part(args.part, args.model, args.device, args.work), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: torch sees no CUDA device (GPU_CHECK_DEVICE=cpu for the dry run)")
        print(f"gpu_check device: {torch.cuda.get_device_name(0)} bf16={torch.cuda.is_bf16_supported()}", flush=True)
    else:
        print("gpu_check device: cpu (a dry run of the script: its figures say nothing of a GPU)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="katdata-gpu-check-"))
    model = args.model
    if args.random_init:
        model = str(random_model(args.random_init, work / "model"))
    if model is None:
        from katdata.model import resolve

        model = resolve(None)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    limits = LIMITS[args.device]
    rows = []
    for name in args.only:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--part", name, "--model", model, "--device", args.device, "--work", str(work)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limits[name], env=env)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                status, text = ("SKIP", lines[-1][6:]) if lines[-1].startswith("SKIP: ") else ("ok", lines[-1])
            else:
                status, text = "FAIL", (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        except subprocess.TimeoutExpired:
            status, text = "FAIL", f"over its {limits[name]} s limit"
        secs = time.perf_counter() - t0
        rows.append((name, status, secs))
        print(f"gpu_check {name}: {status} {text} ({secs:.0f} s)", flush=True)
    print("\n| part | status | seconds |\n|---|---|---|")
    for name, status, secs in rows:
        print(f"| {name} | {status} | {secs:.0f} |")
    return 1 if any(status == "FAIL" for _, status, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
