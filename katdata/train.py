"""Stage `train`: mode-aware LoRA fine-tuning on the KAT records (`katdata train`).

Loss falls only on the final assistant completion after the pre-filled ``<judge>\\n``: the judge
rationale, the mode tag, the think block, the answer and the end-of-turn token. The boundary comes
from token ids: the rendered prompt (ending in ``<judge>\\n``) is tokenized and must be a token
prefix of the full chat rendered with the training template; every token after it up to and
including ``<|im_end|>`` carries loss. The template's own assistant mask (``{% generation %}``) is
computed too, as a cross-check. Nothing is masked by pad id (SmolLM2's pad is its EOS).

Data: ``RUN_DIR/export`` (a Hub dataset folder, ``data/*.parquet`` with ``messages``) when present,
else ``RUN_DIR/records.jsonl`` (KatRecord rows), read by katdata.train_data. A seeded, mode-stratified share
of the ids is held out for `katdata eval` and listed in ``train/split.json``.

Output in ``RUN_DIR/train``: ``adapter/`` (peft adapter + tokenizer with the KAT chat template),
optionally ``merged/``, ``log.jsonl`` (the trainer's log), ``train.json`` (stats). Checkpoints go to
``checkpoints/``; a rerun resumes from the last one, and a finished run is not trained again.
Multi-GPU: ``katdata cp accelerate/multi_gpu``, then
``accelerate launch --config_file multi_gpu.yaml -m katdata.train RUN_DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from pydantic import ConfigDict, Field, model_validator

from katdata.errors import KatdataError, require
from katdata.model_load import LoadSettings
from katdata.review_routing import hold_policy
from katdata.run_folder import RunFolder
from katdata.settings import no_output_key
from katdata.stage import Stage
from katdata.stage_command import main_rank
from katdata.train_data import (  # noqa: F401  (split_rows, load_examples: re-exported)
    _source, _split_record, balance, load_examples, split, split_rows,
)
from katdata.template import MARKERS

log = logging.getLogger(__name__)

SPANS = ("judge", "mode", "think", "answer", "eot")
# Words whose embeddings initialise the marker tokens when add_marker_tokens is on.
MARKER_WORDS = {"<judge>": "judge", "</judge>": "end judge", "<think_on>": "think on", "<think_off>": "think off",
                "<think>": "think", "</think>": "end think", "<answer>": "answer", "</answer>": "end answer"}


class TrainConfig(LoadSettings):
    model_config = ConfigDict(extra="forbid")
    _no_output = model_validator(mode="before")(classmethod(lambda cls, data: no_output_key(data, "train")))

    model: Optional[str] = Field(None, description="base model folder or hub id; None or 'embedded' = the embedded "
                                 "SmolLM2")
    data: Optional[str] = Field(None, description="a Hub dataset folder or a records.jsonl; default RUN_DIR/export, "
                                "else RUN_DIR/records.jsonl")
    holdout: int = Field(32, ge=0, description="records held out for `katdata eval` (seeded, stratified by mode) "
                         "when the data has no test split; never trained on")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch; 0 (peft's default) skips "
                                "the op, which on the CPU made a step about 1.5x faster than 0.05")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="modules that get LoRA adapters")
    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (cosine schedule); 1e-3 suits short runs "
                                 "on small models, lower it for larger ones")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up steps")
    epochs: float = Field(1.0, gt=0, description="passes over the data (used when max_steps is -1)")
    max_steps: int = Field(50, ge=-1, description="optimizer steps; -1 = run `epochs` passes")
    batch_size: int = Field(4, ge=1, description="examples per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(512, ge=16, description="longest example in tokens; longer ones are skipped (counted), "
                            "never cut")
    balance_modes: bool = Field(False, description="repeat the rarer mode's examples until both modes have as many "
                                "(the mode choice is learned from both sides even when the labels are skewed)")
    packing: bool = Field(False, description="pack examples end to end into rows of up to max_length tokens (best-fit "
                          "decreasing, padding-free, position ids restart per record, no attention across records); "
                          "batch_size then counts packed rows")
    bf16: Optional[bool] = Field(None, description="bf16 mixed precision; None = on where the hardware supports it")
    add_marker_tokens: bool = Field(False, description="add the KAT markers as new tokens and train their embedding "
                                    "rows and the output head; such an adapter must be merged before vLLM can serve it")
    merge: bool = Field(False, description="also write a merged full model to OUTPUT/merged")
    save_steps: int = Field(25, ge=1, description="checkpoint every N steps (resume point after a crash)")
    logging_steps: int = Field(5, ge=1, description="log loss every N steps")
    seed: int = Field(0, description="seed for the split, the shuffling and the LoRA init")
    num_threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch during training; None = torch's "
                                       "default. On a CPU shared with other jobs, 1 avoids thread contention (measured "
                                       "4-8x faster there)")


# ---------------------------------------------------------------- tokens and spans
def encode(tok, messages: list[dict], training_template: str) -> dict:
    """input_ids, labels (-100 off the completion) and the span type of each loss token."""
    from katdata.chat_template import render_chat

    full = tok.apply_chat_template(messages, chat_template=training_template, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids, amask = list(full["input_ids"]), list(full["assistant_masks"])
    prompt_ids = tok(render_chat(messages[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    completion = messages[-1]["content"][len("<judge>\n"):] + "<|im_end|>"
    comp = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    start, end = len(prompt_ids), len(prompt_ids) + len(comp["input_ids"])
    if ids[:start] != prompt_ids or ids[start:end] != comp["input_ids"]:
        raise KatdataError("the training template does not tokenize as prompt + completion: the loss boundary "
                           f"cannot be taken from token ids (chat starting {messages[-1]['content'][:40]!r})")
    labels = [-100] * start + ids[start:end] + [-100] * (len(ids) - end)
    bounds = _span_bounds(completion)
    spans = [next(name for name, stop in bounds if a < stop) for a, _ in comp["offset_mapping"]]
    return {"input_ids": ids, "labels": labels, "spans": spans, "start": start,
            "mask_agrees": [int(x != -100) for x in labels] == amask}


def _span_bounds(completion: str) -> list[tuple[str, int]]:
    """(span, end offset) over the completion text; used only to label loss tokens for the audit."""
    judge_end = completion.index("</judge>") + len("</judge>\n\n")
    mode_end = completion.index("\n", judge_end) + 1
    answer_at = completion.rindex("<answer>")
    out = [("judge", judge_end), ("mode", mode_end)]
    if completion[judge_end:mode_end].startswith("<think_on>"):
        out.append(("think", answer_at))
    return out + [("answer", completion.rindex("<|im_end|>")), ("eot", len(completion) + 1)]


def audit(tok, examples: list[dict], encoded: list[dict], n: int) -> str:
    """N examples with loss-bearing spans marked ⟦span|…⟧, and loss tokens per span type over all examples."""
    lines = []
    for ex, enc in list(zip(examples, encoded))[:n]:
        ids, start, stop = enc["input_ids"], enc["start"], enc["start"] + len(enc["spans"])
        out, k = [tok.decode(ids[:start])], start
        while k < stop:
            span, j = enc["spans"][k - start], k
            while j < stop and enc["spans"][j - start] == span:
                j += 1
            out.append(f"⟦{span}|{tok.decode(ids[k:j])}⟧")
            k = j
        out.append(tok.decode(ids[stop:]))
        lines += [f"=== {ex['id']} (mode {ex['mode']}, {len(ids)} tokens, {stop - start} with loss)", "".join(out), ""]
    totals = {s: 0 for s in SPANS}
    for enc in encoded:
        for s in enc["spans"]:
            totals[s] += 1
    masked = sum(len(e["input_ids"]) - len(e["spans"]) for e in encoded)
    lines.append(f"loss tokens per span type over {len(encoded)} examples:")
    lines += [f"  {s:<7}{totals[s]:>9}" for s in SPANS]
    lines.append(f"  {'total':<7}{sum(totals.values()):>9}   (masked prompt/history tokens: {masked})")
    disagree = sum(not e["mask_agrees"] for e in encoded)
    lines.append(f"template generation-mask cross-check: {len(encoded) - disagree}/{len(encoded)} agree")
    return "\n".join(lines)


def prepare(cfg: TrainConfig, run_dir: Path, tok, hold=None) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train rows, their encodings, held-out rows, stats); over-long rows are skipped and counted; records that
    wait for review under ``hold`` (review_routing.hold_policy) are left out of a records.jsonl."""
    from katdata.chat_template import template_text

    rows, held = load_examples(cfg.data, run_dir, hold)
    train, held = split(rows, cfg.holdout, cfg.seed) if held is None else (rows, held)
    kept, encs, too_long = [], [], 0
    for r in train:
        enc = encode(tok, r["messages"], template_text(training=True))
        if len(enc["input_ids"]) > cfg.max_length:
            too_long += 1
            continue
        kept.append(r)
        encs.append(enc)
    if not kept:
        raise KatdataError(f"no training example fits max_length={cfg.max_length}")
    distinct, repeated = len(kept), 0
    if cfg.balance_modes:
        kept, encs, repeated = balance(kept, encs)
    stats = {"rows_in": len(train) + len(held), "train": distinct, "heldout": len(held), "skipped_too_long": too_long,
             "repeated_for_balance": repeated,
             "mask_disagreements": sum(not e["mask_agrees"] for e in encs),
             "loss_tokens": sum(len(e["spans"]) for e in encs), "tokens": sum(len(e["input_ids"]) for e in encs)}
    return kept, encs, held, stats


# ---------------------------------------------------------------- training
def _marker_tokens(tok, model) -> list[int]:
    """Add the markers as tokens; initialise each new row from the embedding of descriptive words."""
    import torch

    tok.add_tokens(list(MARKERS))
    ids = tok.convert_tokens_to_ids(list(MARKERS))
    model.resize_token_embeddings(len(tok))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for marker, i in zip(MARKERS, ids):
            words = tok(MARKER_WORDS[marker], add_special_tokens=False)["input_ids"]
            emb[i] = emb[words].mean(0)
    log.warning("add_marker_tokens: the adapter carries trained embedding rows and output head, so it must be "
                "merged (merge: true) before vLLM can serve it (vLLM refuses such adapters)")
    return ids


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _save_atomic(save, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)


def _last_checkpoint(ckpt: Path) -> Optional[str]:
    steps = [(int(p.name.split("-")[-1]), p) for p in ckpt.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(steps)[1]) if steps else None


def _gathered_state(trainer) -> Optional[dict]:
    """The model's full state dict when FSDP or DeepSpeed ZeRO-3 shards it over the ranks (each rank holds a slice
    of every weight, so saving from rank 0 alone would write slices or hang): a collective that every rank must
    call, the same way Trainer.save_model gathers. None when rank 0 holds the whole model (one process, DDP)."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # needs stage3_gather_16bit_weights_on_model_save (accelerate: zero3_save_16bit_model: true)
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def _merge_saved(base: str, adapter: Path, tok, resize: bool, dtype: str):
    """merged/ under sharding: the saved adapter merged into a fresh copy of the base (in the dtype training loaded
    it in) on rank 0 (the trained model itself is sharded over the ranks)."""
    import peft
    import transformers

    from katdata.dtypes import torch_dtype

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype))
    if resize:  # add_marker_tokens: the adapter carries the grown embedding rows
        model.resize_token_embeddings(len(tok))
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def run(cfg: TrainConfig, run_dir: Path, engine=None, hold=None) -> dict:
    """Train the LoRA adapter; returns the stats for summary.json (also written to OUTPUT/train.json). ``hold``:
    the review policy records of a records.jsonl wait under (review_routing.hold_policy; None: none wait)."""
    from katdata import fingerprint

    run_dir = Path(run_dir)
    out = RunFolder(run_dir).train
    from katdata.output_paths import check_replaceable  # new, empty or its own: never a user's folder
    check_replaceable(out, run_dir=run_dir, kind="train")
    current = {"settings": fingerprint.section_settings("train", cfg),
               "inputs": fingerprint.hash_inputs([_source(cfg.data, run_dir)], run_dir)}
    fingerprint.check_folder(out, current, f"to retrain, move {out} aside (in a pipeline: rerun with --from train); "
                             "to keep it, copy the run folder and train in the copy")
    if RunFolder(run_dir).train_record.is_file() and RunFolder(run_dir).adapter.is_dir():
        log.info("train: %s already holds a finished adapter made with these settings, skipping", out)
        return json.loads(RunFolder(run_dir).train_record.read_text())
    from katdata import model_load

    model_load.check_quantization(cfg, "train")  # one line before torch or the model loads
    torch = require("torch", "local")
    transformers = require("transformers", "local")
    peft = require("peft", "train")
    trl = require("trl", "train")
    datasets = require("datasets", "local")
    from katdata.chat_template import template_text
    from katdata.model import resolve

    base = resolve(cfg.model)
    plan = model_load.planned(cfg, base, "train")  # a setup that cannot fit stops here: nothing loaded or written
    tok = transformers.AutoTokenizer.from_pretrained(base)
    train_rows, encs, held, stats = prepare(cfg, run_dir, tok, hold)
    out.mkdir(parents=True, exist_ok=True)
    if main_rank():
        fingerprint.write_folder(out, current)
    split_doc = {"seed": cfg.seed, "data": _split_record(_source(cfg.data, run_dir), run_dir), "holdout": cfg.holdout,
                 "train": [r["id"] for r in train_rows], "heldout": [r["id"] for r in held]}
    if main_rank():  # under torchrun / accelerate launch every process gets here; one writes
        _write_json(RunFolder(run_dir).split, split_doc)

    from katdata.backends.hf import native_bf16_cpu

    bf16 = cfg.bf16 if cfg.bf16 is not None else (
        torch.cuda.is_bf16_supported() if torch.cuda.is_available() else native_bf16_cpu())
    from katdata.train_packing import attn_implementation, collator_for, packed_dataset

    # packing: records end to end in rows of max_length, position ids restarting per record, no attention across
    # records (flash-attention varlen on a GPU that has it, else SDPA's block mask from the position ids)
    model, loaded = model_load.load(base, cfg, "train",
                                    **({"attn_implementation": attn_implementation()} if cfg.packing else {}))
    modules_to_save = None
    if cfg.add_marker_tokens:
        _marker_tokens(tok, model)
        encs = [encode(tok, r["messages"], template_text(training=True)) for r in train_rows]
        modules_to_save = ["embed_tokens", "lm_head"]
    tied = {"ensure_weight_tying": True} if modules_to_save and getattr(model.config, "tie_word_embeddings", False) else {}
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                           target_modules=cfg.target_modules, modules_to_save=modules_to_save, **tied)
    data = (packed_dataset(encs, cfg.max_length) if cfg.packing else
            datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encs]))
    ckpt = out / "checkpoints"
    args = trl.SFTConfig(
        output_dir=str(ckpt), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, bf16=bool(bf16),
        seed=cfg.seed, report_to=[], max_length=cfg.max_length, packing=False, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        **model_load.trainer_args(cfg))
    tok.pad_token = tok.pad_token or tok.eos_token
    collator = collator_for(model, tok.pad_token_id) if cfg.packing else None  # packed rows: katdata's own collator
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                             data_collator=collator)
    from katdata.train_progress import attach
    attach(trainer, "train")  # a bar with step, loss, ETA; TRL's printed dicts only with -v
    resume = _last_checkpoint(ckpt)
    if resume:
        log.info("train: resuming from %s", resume)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    # packed rows have no attention mask, and the trainer's count (input_ids != pad) misses the pad-valued
    # <|im_end|> inside every record: the collator counts real tokens instead
    tokens = collator.tokens if collator is not None and not resume else int(trainer.state.num_input_tokens_seen)

    tok.chat_template = template_text(training=False)
    state = _gathered_state(trainer)  # FSDP / ZeRO-3: every rank takes part in the gather
    if trainer.accelerator.is_main_process:
        def save_adapter(path):
            trainer.model.save_pretrained(path, state_dict=state)
            tok.save_pretrained(path)

        _save_atomic(save_adapter, out / "adapter")
        if cfg.merge:
            merged = trainer.model.merge_and_unload() if state is None else _merge_saved(
                base, out / "adapter", tok, cfg.add_marker_tokens, loaded["dtype"])
            _save_atomic(lambda p: (merged.save_pretrained(p), tok.save_pretrained(p)), out / "merged")
        with open(out / ".log.jsonl.tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in trainer.state.log_history)
        os.replace(out / ".log.jsonl.tmp", out / "log.jsonl")
    stats |= {"base_model": base, "steps": trainer.state.global_step, "resumed_from": resume, "bf16": bool(bf16),
              "train_loss": result.training_loss, "seconds": round(seconds, 2), "input_tokens_seen": tokens,
              "tokens_per_s": round(tokens / seconds, 1) if seconds else None, "marker_tokens": cfg.add_marker_tokens,
              "adapter": str(out / "adapter"), "merged": str(out / "merged") if cfg.merge else None,
              "processes": trainer.accelerator.num_processes, **loaded,
              "memory_plan_gib": round(plan.total / 2**30, 2) if plan else None}
    if trainer.accelerator.is_main_process:
        _write_json(RunFolder(run_dir).train_record, stats)
    return stats


# ---------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    """`katdata train RUN_DIR`: the train stage as a stage command (katdata.stage_command: the checks and
    fingerprints of `katdata run`, a flag per setting); a folder of records without recipe.yaml trains from the
    flags alone. ``--audit N`` prints N examples with their loss spans instead of training."""
    import sys

    from katdata import stage_command

    def extra(p):
        p.add_argument("--audit", type=int, metavar="N", help="print N examples with loss spans marked and per-span "
                       "loss-token counts, then exit without training")
        p.add_argument("--plan", action="store_true", help="print the memory plan (weights, LoRA, optimizer, "
                       "activations against the devices present) from the model's config.json, then exit")

    def audited(args, recipe, run_dir):
        if args.plan:
            return _plan(recipe.train)
        if args.audit is None:
            return None
        return _audit(recipe.train, run_dir, hold_policy(recipe.review, recipe.export.require_review), args.audit)

    def bare(args):  # no recipe: the review hold's defaults (a record the vote flagged waits for review)
        from katdata.export import ExportConfig
        from katdata.preflight import run_folder
        from katdata.review_routing import ReviewConfig

        cfg = stage_command.section(STAGE, args)
        run_folder(args.run_dir, "train", data=cfg.data, models={"model": cfg.model})  # before torch is imported
        hold = hold_policy(ReviewConfig(), ExportConfig().require_review)
        if args.plan:
            return _plan(cfg)
        if args.audit is not None:
            return _audit(cfg, args.run_dir, hold, args.audit)
        stats = run(cfg, args.run_dir, hold=hold)
        if main_rank():
            print(json.dumps(stats, indent=1))
        return 0

    return stage_command.main("train", list(sys.argv[1:] if argv is None else argv), extra=extra, after=audited,
                              bare=bare)


def _plan(cfg: TrainConfig) -> int:
    from katdata.memory_plan import format_plan
    from katdata.model import resolve
    from katdata.model_load import plan

    print(format_plan(plan(cfg, resolve(cfg.model), "train")))
    return 0


def _audit(cfg: TrainConfig, run_dir: Path, hold, n: int) -> int:
    transformers = require("transformers", "local")
    from katdata.model import resolve

    tok = transformers.AutoTokenizer.from_pretrained(resolve(cfg.model))
    rows, encs, _, stats = prepare(cfg, run_dir, tok, hold)
    print(audit(tok, rows, encs, n))
    print(f"train rows {stats['train']}, held out {stats['heldout']}, skipped (> max_length) {stats['skipped_too_long']}")
    return 0


STAGE = Stage("train", "LoRA-fine-tune a model on a run's dataset (--audit N: the loss spans; --plan: the memory plan)",
              lambda ctx: run(ctx.cfg, ctx.folder.root, hold=hold_policy(ctx.section("review"),
                                                                         ctx.section("export").require_review)),
              TrainConfig, may_read=("export", "records"), writes=("train",), sections=("review", "export"), optional=True,
              inputs=lambda recipe, run_dir: [_source(recipe.train.data, run_dir)])


if __name__ == "__main__":  # accelerate launch -m katdata.train RUN_DIR
    raise SystemExit(main())
