"""Trained tokens per second: katdata's packed training against a plain TRL SFTTrainer, side by side in one run.

Both sides train the same model with the same LoRA config, batch size, steps, learning rate, device and
dtype on the same real KAT records (GSM8K think-on, fanoutqa think-off; lengths vary from ~70 to ~450
tokens, so padding costs a lot):

- katdata: what `katdata train` builds with ``packing: true`` (katdata.train.prepare's token-id masks,
  katdata.train_packing's best-fit rows of <= max_length tokens with restarting position ids and no
  attention across records, SDPA on the CPU / flash-attention 2 on a GPU that has it). A batch is
  ``--batch`` packed rows.
- plain TRL: the stock prompt/completion dataset with TRL's defaults (completion-only loss, padding to
  the longest record of the batch, no packing). A batch is ``--batch`` records.

Trained tokens = the non-padding tokens of the batches the optimizer steps consumed (counted at the
collator on both sides); tokens/s = trained tokens / wall time of ``trainer.train()``, and "after step 1" the
same over steps 2..N (the first step's warm-up varies a lot on a shared CPU). The two sides alternate ``--rounds``
times (the machine is shared): read each round's ratio katdata / plain.

    .venv/bin/python bench/train_throughput.py [--model PATH] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--steps 3] [--batch 4] [--records 64] [--rounds 2] [--threads N]
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
from katdata.train import TrainConfig  # noqa: E402


class CountingCollator:
    """Wraps a collator; records each batch's non-padding tokens, in order. Accelerate's loader fetches one batch
    ahead, so only the first ``steps`` entries were trained on."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        if "attention_mask" in batch:  # padded: the tokens under the mask
            self.batches.append(int(batch["attention_mask"].sum()))
        else:  # packed rows: the records' own lengths
            self.batches.append(sum(sum(ex.get("seq_lengths") or [len(ex["input_ids"])]) for ex in examples))
        return batch


def _clock():
    """A trainer callback noting the time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return Clock()


def _common_args(cfg: TrainConfig, out: Path, device: str, dtype: str) -> dict:
    return dict(output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
                logging_steps=cfg.logging_steps, save_strategy="no", bf16=dtype == "bfloat16",
                use_cpu=device == "cpu", seed=cfg.seed, report_to=[], max_length=cfg.max_length,
                disable_tqdm=True, dataloader_num_workers=0)


def _lora(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")


def _timed(trainer) -> dict:
    """Train; tokens/s over the whole ``train()`` and over the steps after the first (``steady``: without the
    first step's warm-up, which on a shared CPU varies by several x)."""
    counter = trainer.data_collator = CountingCollator(trainer.data_collator)
    clock = _clock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    steps = trainer.state.global_step * trainer.args.gradient_accumulation_steps
    tokens = sum(counter.batches[:steps])
    out = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
           "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4)}
    if len(clock.ends) >= 2 and trainer.args.gradient_accumulation_steps == 1:
        later = sum(counter.batches[1:steps])
        out["steady_tokens_per_s"] = round(later / (clock.ends[-1] - clock.ends[0]), 1)
    return out


def katdata_packed(run_dir: Path, cfg: TrainConfig, device: str, dtype: str) -> dict:
    """The trainer `katdata train` builds with packing on (see katdata.train.run and katdata.train_packing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from katdata.model import resolve
    from katdata.train import prepare
    from katdata.train_packing import attn_implementation, collator_for, packed_dataset

    base = resolve(cfg.model)
    tok = AutoTokenizer.from_pretrained(base)
    _, encs, _, _ = prepare(cfg, run_dir, tok)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation=attn_implementation(device))
    tok.pad_token = tok.pad_token or tok.eos_token
    collator = collator_for(model, tok.pad_token_id)
    args = SFTConfig(**_common_args(cfg, run_dir / "katdata", device, dtype), packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=packed_dataset(encs, cfg.max_length),
                         processing_class=tok, peft_config=_lora(cfg), data_collator=collator)
    return _timed(trainer) | {"attn": model.config._attn_implementation}


def plain_trl(records, cfg: TrainConfig, out: Path, device: str, dtype: str) -> dict:
    """What a TRL user writes: a prompt/completion dataset, TRL's defaults (padding, completion-only loss)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from katdata.chat_template import render_chat
    from katdata.model import resolve

    rows = [{"prompt": render_chat(r.messages()[:-1], add_generation_prompt=True),
             "completion": r.response[len("<judge>\n"):] + "<|im_end|>"} for r in records]
    base = resolve(cfg.model)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(**_common_args(cfg, out, device, dtype))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=_lora(cfg))
    return _timed(trainer) | {"attn": model.config._attn_implementation}


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model folder or hub id (default: the embedded SmolLM2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="training precision (bfloat16 = bf16 autocast over float32 weights, as katdata trains); "
                    "default bfloat16 on cuda and on a CPU with native bf16, else float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="per-step batch: packed rows (katdata), records (plain)")
    ap.add_argument("--records", type=int, default=64, help="records per mode")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides")
    ns = ap.parse_args()
    if ns.dtype is None:
        from katdata.backends.hf import native_bf16_cpu

        ns.dtype = "bfloat16" if ns.device == "cuda" or native_bf16_cpu() else "float32"
    if ns.threads:
        torch.set_num_threads(ns.threads)
    records = demo_records(ns.records, ns.records, seed=2)
    cfg = TrainConfig(model=ns.model, holdout=0, max_steps=ns.steps, batch_size=ns.batch, max_length=ns.max_length,
                      warmup_steps=1, save_steps=10_000, packing=True)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with RowWriter(tmp / "records.jsonl") as w:
            w.write_all(records)
        for i in range(ns.rounds):
            sides = {}
            order = ("katdata", "plain") if i % 2 == 0 else ("plain", "katdata")
            for side in order:
                sides[side] = (katdata_packed(tmp, cfg, ns.device, ns.dtype) if side == "katdata"
                               else plain_trl(records, cfg, tmp / f"plain{i}", ns.device, ns.dtype))
            ratio = sides["katdata"]["tokens_per_s"] / sides["plain"]["tokens_per_s"]
            row = {"round": i + 1, "order": list(order), **sides, "ratio": round(ratio, 2)}
            line = (f"round {i + 1} ({' then '.join(order)}): trained tokens/s katdata (packed) "
                    f"{sides['katdata']['tokens_per_s']}, plain TRL SFTTrainer {sides['plain']['tokens_per_s']}, "
                    f"ratio {ratio:.2f}")
            if all("steady_tokens_per_s" in v for v in sides.values()):
                row["steady_ratio"] = round(sides["katdata"]["steady_tokens_per_s"]
                                            / sides["plain"]["steady_tokens_per_s"], 2)
                line += (f"; after step 1: {sides['katdata']['steady_tokens_per_s']} vs "
                         f"{sides['plain']['steady_tokens_per_s']}, ratio {row['steady_ratio']:.2f}")
            rounds.append(row)
            print(line, flush=True)
    print(json.dumps({"model": ns.model or "embedded", "device": ns.device, "dtype": ns.dtype, "steps": ns.steps,
                      "batch": ns.batch, "max_length": ns.max_length, "threads": torch.get_num_threads(),
                      "rounds": rounds}, indent=1))
    k = sum(r["katdata"]["tokens_per_s"] for r in rounds) / len(rounds)
    p = sum(r["plain"]["tokens_per_s"] for r in rounds) / len(rounds)
    print(f"overall ({len(rounds)} rounds): trained tokens/s katdata (packed) {k:.1f}, plain TRL SFTTrainer {p:.1f}, "
          f"ratio {k / p:.2f} (goal >= 1.3 on a CPU)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
