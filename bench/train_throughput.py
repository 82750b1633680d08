"""Trained tokens per second: `katdata train` against a plain TRL SFTTrainer, side by side in one run.

Both train the embedded SmolLM2 with the same LoRA config, batch, steps, precision and the same real
records (GSM8K think-on, fanoutqa think-off). The plain trainer gets the stock TRL prompt/completion
layout (completion-only loss) with the KAT prompt text; katdata train brings its own token-id masks.
Tokens per second = non-padding input tokens seen by the trainer / wall time of ``trainer.train()``.

    .venv/bin/python bench/train_throughput.py [--steps 20] [--batch 4] [--records 64]

The machine is noisy (others share the 2 cores): read the ratio, not the absolute figures, and rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test data helpers

from demo_data import demo_records  # noqa: E402
from katdata.runfiles import RowWriter  # noqa: E402
from katdata.train import TrainConfig, run  # noqa: E402


def plain_trl(records, cfg: TrainConfig, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from katdata.chat_template import render_chat
    from katdata.model import embedded_path

    rows = [{"prompt": render_chat(r.messages()[:-1], add_generation_prompt=True),
             "completion": r.response[len("<judge>\n"):] + "<|im_end|>"} for r in records]
    tok = AutoTokenizer.from_pretrained(embedded_path())
    model = AutoModelForCausalLM.from_pretrained(embedded_path(), dtype=torch.float32)
    args = SFTConfig(output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                     learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
                     logging_steps=cfg.logging_steps, save_strategy="no", bf16=True, use_cpu=True, seed=cfg.seed,
                     report_to=[], max_length=cfg.max_length, completion_only_loss=True,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--records", type=int, default=64, help="records per mode")
    ns = ap.parse_args()
    records = demo_records(ns.records, ns.records, seed=2)
    cfg = TrainConfig(holdout=0, max_steps=ns.steps, batch_size=ns.batch, save_steps=10_000, bf16=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with RowWriter(tmp / "records.jsonl") as w:
            w.write_all(records)
        plain = plain_trl(records, cfg, tmp / "plain")
        ours = run(cfg, tmp)
    kat = {"seconds": ours["seconds"], "tokens": ours["input_tokens_seen"], "tokens_per_s": ours["tokens_per_s"]}
    print(json.dumps({"steps": ns.steps, "batch": ns.batch, "plain_trl": plain, "katdata_train": kat}, indent=1))
    print(f"trained tokens/s: katdata train {kat['tokens_per_s']}, plain TRL SFTTrainer {plain['tokens_per_s']}, "
          f"ratio {kat['tokens_per_s'] / plain['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
