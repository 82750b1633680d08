"""Stage `rl`: mode-aware GRPO after the cold-start SFT (`katdata rl RUN_DIR`), on TRL's GRPOTrainer.

Policy: the SFT adapter from ``train/adapter`` (trained further; with ``beta > 0`` TRL keeps a frozen
copy of it as the KL reference), or a merged model folder (a fresh LoRA is put on it). Prompts: the
training queries of ``train/split.json`` rendered with the KAT chat template, ending in the
pre-filled ``<judge>\\n``.

Groups: TRL samples ``num_generations`` completions per prompt (one group). In each group the first
``forced_per_mode`` completions get the think-on prefix and the next ``forced_per_mode`` the think-off
prefix (the tags-written rationale for that mode, then the mode tag, as `katdata eval` forces a mode)
appended to their prompt; the rest choose freely. So every group holds rollouts of both modes, and
the decision reward has evidence even when the policy always picks one mode. Forced completions hold
no decision tokens (their decision is in the prompt): they train the answer only.

Rewards and the step-level advantage: :mod:`katdata.rl_rewards`. The trainer subclass
(:func:`trainer_class`) does two things only: it forces the modes in each group, and with
``step_level`` it replaces TRL's one advantage per sequence by a per-token one (decision segment:
mode reward; answer segment: format + answer (+ cost)), split at the mode tag found by token ids.
``step_level: false`` is plain sequence-level GRPO on the weighted sum of all rewards.

Output in ``RUN_DIR/rl``: ``adapter/``, ``log.jsonl`` (TRL's log: reward components, KL with beta > 0,
``mode/think_on_rate_auto``, ``tokens/mean_on|off``), ``rl.json``. Checkpoints go to ``checkpoints/``;
a rerun resumes from the last, and a finished run is not trained again.
GPU: ``use_vllm`` (TRL's colocate or server mode) and ``accelerate launch -m katdata.rl RUN_DIR``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

from pydantic import ConfigDict, Field, model_validator

from katdata.errors import KatdataError, require
from katdata.model_load import LoadSettings
from katdata.rl_rewards import EVIDENCE, decision_length, mode_tag_ids, reward_functions, segment_advantages
from katdata.template import FORCE_PREFIX, GENERATION_PREFIX
from katdata.run_folder import RunFolder
from katdata.settings import no_output_key
from katdata.stage import Stage

log = logging.getLogger(__name__)


class RLConfig(LoadSettings):
    model_config = ConfigDict(extra="forbid")
    _no_output = model_validator(mode="before")(classmethod(lambda cls, data: no_output_key(data, "rl")))

    model: Optional[str] = Field(None, description="base model; None = the base_model train.json names (else the "
                                 "embedded SmolLM2)")
    policy: Optional[str] = Field(None, description="the SFT policy: an adapter folder (trained further) or a merged "
                                  "model folder (a fresh LoRA goes on it); default RUN_DIR/train/adapter")
    limit: Optional[int] = Field(None, ge=1, description="use at most this many training queries")
    num_generations: int = Field(4, ge=2, description="completions per query (one GRPO group)")
    forced_per_mode: int = Field(1, ge=0, description="completions per group forced to think-on, and as many to "
                                 "think-off (the rest choose their mode); 2 x this must stay below num_generations")
    prompts_per_step: int = Field(1, ge=1, description="queries per optimizer step (each with num_generations "
                                  "completions)")
    step_level: bool = Field(True, description="separate advantages for the decision tokens (judge + mode tag) and "
                             "the answer tokens; false = plain sequence-level GRPO on the weighted reward sum")
    mode_evidence: list[Literal[EVIDENCE]] = Field(
        default_factory=lambda: list(EVIDENCE), description="where the better mode of a query comes from, first with "
        "evidence wins: group (this step's rollouts of both modes), vote (the vote's pass rates), label (the record's "
        "cold-start label)")
    delta: Optional[float] = Field(None, ge=0, le=1, description="think-off is the better mode when its pass rate is "
                                   "within delta of think-on's; None = each record's vote delta (0.1 without one)")
    format_weight: float = Field(0.2, ge=0, description="weight of the format reward (HiPO: 0.2)")
    answer_weight: float = Field(1.0, ge=0, description="weight of the answer reward")
    mode_weight: float = Field(1.0, ge=0, description="weight of the mode reward (scale of the decision advantage)")
    cost_weight: float = Field(0.0, ge=0, description="weight of the token-cost reward (-tokens / "
                               "max_completion_length); 0 = off")
    max_completion_length: int = Field(192, ge=16, description="token limit of one completion (cut ones score 0)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    repetition_penalty: float = Field(1.0, ge=1.0, description="> 1 damps repeated tokens in the rollouts")
    beta: float = Field(0.02, ge=0, description="KL coefficient against the SFT policy (0 = no reference model and "
                        "no KL in the log)")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate of the LoRA weights")
    max_steps: int = Field(20, ge=1, description="optimizer steps")
    save_steps: int = Field(5, ge=1, description="checkpoint every N steps (resume point)")
    logging_steps: int = Field(1, ge=1, description="log every N steps")
    lora_r: int = Field(16, ge=1, description="LoRA rank when the policy is a merged model")
    seed: int = Field(0, description="seed of the shuffling and sampling")
    bf16: Optional[bool] = Field(None, description="bf16 mixed precision; None = on a GPU that supports it, off on CPU")
    use_vllm: bool = Field(False, description="generate with vLLM (GPU; TRL's vllm_mode)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="colocate: vLLM inside the training "
                                                     "process; server: a `trl vllm-serve` process")
    vllm_server_base_url: Optional[str] = Field(None, description="server mode: URL of `trl vllm-serve`")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate mode: vLLM's share of GPU "
                                               "memory")
    num_threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch; None = torch's default")


# ---------------------------------------------------------------- data
def load_queries(cfg: RLConfig, run_dir: Path) -> list[dict]:
    """The training queries of train/split.json as dataset rows (prompt text and the reward columns)."""
    from katdata.chat_template import render_chat
    from katdata.runfiles import query_meta
    from katdata.train_data import split_rows

    rows = split_rows(run_dir, "train", "rl starts from its adapter and split")
    if cfg.limit:
        rows = rows[: cfg.limit]
    metas = query_meta(run_dir, rows)
    out = []
    for r in rows:
        vote = r["vote"]
        out.append({"prompt": render_chat(r["messages"][:-1], add_generation_prompt=True), "id": r["id"],
                    "label": vote.get("label") or r["mode"], "p_on": float(vote.get("p_on") or 0.0),
                    "p_off": float(vote.get("p_off") or 0.0),
                    "vote_n": int(vote.get("n_on") or 0) + int(vote.get("n_off") or 0),
                    "delta": cfg.delta if cfg.delta is not None else float(vote.get("delta") or 0.1),
                    "task_type": str(r["tags"].get("task_type") or "other"),
                    "domain": str(r["tags"].get("domain") or "unknown"),
                    "kind": r["kind"], "reference": r["reference"], "query": r["query"], "meta": metas[r["id"]]})
    return out


def forced_prefix(mode: str, task_type: str, domain: str) -> str:
    """The assistant prefix of a forced completion: the tags-written rationale for the mode, then its tag."""
    from katdata.judge import tags_rationale

    return f"{GENERATION_PREFIX}{tags_rationale(task_type, domain, mode)}\n</judge>\n\n{FORCE_PREFIX[mode]}"


def force(inputs: list[dict], group: int, per_mode: int, offset: int = 0) -> list[dict]:
    """The batch with the first per_mode completions of each group forced on, the next per_mode forced off.

    ``offset`` is where this process's slice starts in the global batch (groups are contiguous there)."""
    out = []
    for i, x in enumerate(inputs):
        j = (offset + i) % group
        mode = "on" if j < per_mode else "off" if j < 2 * per_mode else None
        pre = forced_prefix(mode, x["task_type"], x["domain"]) if mode else GENERATION_PREFIX
        out.append({**x, "forced": mode, "prefix": pre, "prompt": x["prompt"] + pre[len(GENERATION_PREFIX):]})
    return out


# ---------------------------------------------------------------- the trainer subclass
def trainer_class():
    """GRPOTrainer with mode-forced groups and (``step_level``) per-token decision / answer advantages."""
    trl = require("trl", "train")

    class StepGRPOTrainer(trl.GRPOTrainer):
        def __init__(self, *args, kat: RLConfig, tag_ids: list, **kwargs):
            super().__init__(*args, **kwargs)
            self.kat, self.tag_ids, self._rewards = kat, tag_ids, None

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self._rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._rewards

        def _generate_and_score_completions(self, inputs):
            group = self.num_generations if self.model.training else self.num_generations_eval
            inputs = force(inputs, group, self.kat.forced_per_mode, self.accelerator.process_index * len(inputs))
            out = super()._generate_and_score_completions(inputs)
            if not self.kat.step_level:
                return out
            names = self.reward_func_names
            weights = dict(zip(names, self.reward_weights.tolist()))
            rows = [{n: v for n, v in zip(names, row)} for row in self._rewards.tolist()]  # all processes, grouped
            decision, answer = segment_advantages(rows, weights, group)
            start = self.accelerator.process_index * len(inputs)
            ids, mask = out["completion_ids"].tolist(), out["completion_mask"].sum(1).tolist()
            splits = [decision_length(seq[:n], self.tag_ids, x["forced"] is not None)
                      for seq, n, x in zip(ids, mask, inputs)]
            from katdata.rl_rewards import token_advantages

            adv = token_advantages(decision[start:start + len(inputs)], answer[start:start + len(inputs)], splits,
                                   out["completion_ids"].size(1))
            out["advantages"] = adv.to(out["completion_ids"].device, dtype=out["advantages"].dtype)
            return out

    return StepGRPOTrainer


# ---------------------------------------------------------------- the stage
def _base_model(cfg: RLConfig, run_dir: Path) -> Optional[str]:
    train_json = RunFolder(run_dir).train_record
    if cfg.model:
        return cfg.model
    return json.loads(train_json.read_text()).get("base_model") if train_json.is_file() else None


def _policy_path(cfg: RLConfig, run_dir: Path) -> Path:
    return Path(cfg.policy) if cfg.policy else run_dir / "train" / "adapter"


def _policy(cfg: RLConfig, run_dir: Path) -> Path:
    path = _policy_path(cfg, run_dir)
    if not ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        raise KatdataError(f"no SFT policy at {path}: run `katdata train` first, or set rl.policy to an adapter or a "
                           "merged model folder")
    return path


def _last_checkpoint(ckpt: Path) -> Optional[str]:
    from katdata.train import _last_checkpoint as last

    return last(ckpt)


def _weights(cfg: RLConfig, run_dir: Path):
    """The model whose weights load: a merged policy itself, else the base the SFT adapter goes on."""
    from katdata.model import resolve

    policy = _policy(cfg, run_dir)
    return policy if not (policy / "adapter_config.json").is_file() else resolve(_base_model(cfg, run_dir))


def _load_policy(cfg: RLConfig, run_dir: Path, torch, transformers, peft):
    """(model, tokenizer, lora config or None, how the base loaded): the SFT adapter made trainable, or a merged
    model for a new LoRA."""
    from katdata import model_load

    policy = _policy(cfg, run_dir)
    tok = transformers.AutoTokenizer.from_pretrained(policy)
    if (policy / "adapter_config.json").is_file():
        base, loaded = model_load.load(_weights(cfg, run_dir), cfg, "rl")
        if len(tok) > base.get_input_embeddings().weight.shape[0]:  # an adapter trained with marker tokens
            base.resize_token_embeddings(len(tok))
        return peft.PeftModel.from_pretrained(base, str(policy), is_trainable=True), tok, None, loaded
    model, loaded = model_load.load(policy, cfg, "rl")
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, task_type="CAUSAL_LM", target_modules="all-linear")
    return model, tok, lora, loaded


def input_paths(cfg: RLConfig, run_dir: Path) -> list[Path]:
    """What rl reads: the split of train/ and the SFT policy (its fingerprint covers both)."""
    return [RunFolder(run_dir).split, _policy_path(cfg, Path(run_dir))]


def run(cfg: RLConfig, run_dir: Path, engine=None) -> dict:
    """Run (or resume) GRPO; returns the stats for summary.json (also written to OUTPUT/rl.json)."""
    from katdata import fingerprint

    run_dir = Path(run_dir)
    out = RunFolder(run_dir).rl
    from katdata.output_paths import check_replaceable  # new, empty or its own: never a user's folder
    check_replaceable(out, run_dir=run_dir, kind="rl")
    current = {"settings": fingerprint.section_settings("rl", cfg),
               "inputs": fingerprint.hash_inputs(input_paths(cfg, run_dir), run_dir)}
    fingerprint.check_folder(out, current, f"to redo RL, move {out} aside (in a pipeline: rerun with --from rl); to "
                             "keep it, copy the run folder and run rl in the copy")
    if (out / "rl.json").is_file() and (out / "adapter").is_dir():
        log.info("rl: %s already holds a finished adapter made with these settings, skipping", out)
        return json.loads((out / "rl.json").read_text())
    if 2 * cfg.forced_per_mode >= cfg.num_generations:
        raise KatdataError(f"rl.forced_per_mode ({cfg.forced_per_mode}) x 2 must stay below rl.num_generations "
                           f"({cfg.num_generations}): some completions of each group must choose their mode")
    rows = load_queries(cfg, run_dir)  # bad input fails before any model loads
    _policy(cfg, run_dir)
    from katdata import model_load

    model_load.check_quantization(cfg, "rl")  # one line before torch or the model loads
    torch = require("torch", "local")
    transformers = require("transformers", "local")
    peft = require("peft", "train")
    trl = require("trl", "train")
    datasets = require("datasets", "local")
    from katdata.verify import Verifier

    plan = model_load.planned(cfg, _weights(cfg, run_dir), "rl")
    model, tok, lora, loaded = _load_policy(cfg, run_dir, torch, transformers, peft)
    tok.pad_token = tok.pad_token or tok.eos_token
    eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if i is not None and i >= 0]
    queries = {r["id"]: SimpleNamespace(kind=r["kind"], reference=r["reference"], query=r["query"], meta=r["meta"])
               for r in rows}
    from katdata.rl_rewards import Scorer

    scorer = Scorer(Verifier(), queries, eos)
    funcs = reward_functions(scorer, cfg.mode_evidence, cfg.delta if cfg.delta is not None else 0.1,
                             cfg.max_completion_length, cfg.cost_weight > 0, score_forced=cfg.step_level)
    weights = [cfg.format_weight, cfg.answer_weight, cfg.mode_weight] + ([cfg.cost_weight] if cfg.cost_weight else [])
    data = datasets.Dataset.from_list([{k: v for k, v in r.items() if k not in ("meta", "query")} for r in rows])
    gpu = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else (gpu and torch.cuda.is_bf16_supported())
    ckpt = out / "checkpoints"
    vllm = {"use_vllm": True, "vllm_mode": cfg.vllm_mode, "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            **({"vllm_server_base_url": cfg.vllm_server_base_url} if cfg.vllm_server_base_url else {})} \
        if cfg.use_vllm else {}
    args = trl.GRPOConfig(
        output_dir=str(ckpt), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.num_generations *
        cfg.prompts_per_step, gradient_accumulation_steps=1, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=1.0,
        repetition_penalty=cfg.repetition_penalty, beta=cfg.beta, learning_rate=cfg.learning_rate,
        reward_weights=weights, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, bf16=bool(bf16), report_to=[], disable_tqdm=True, use_cpu=not gpu, dataloader_num_workers=0,
        remove_unused_columns=False, **vllm, **model_load.trainer_args(cfg))
    cls = trainer_class()
    trainer = cls(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok,
                  peft_config=lora, kat=cfg, tag_ids=mode_tag_ids(tok))
    from katdata.train_progress import attach
    attach(trainer, "rl")  # a bar with step, loss, reward, ETA; TRL's printed dicts only with -v
    out.mkdir(parents=True, exist_ok=True)
    if trainer.accelerator.is_main_process:
        fingerprint.write_folder(out, current)
    resume = _last_checkpoint(ckpt)
    if resume:
        log.info("rl: resuming from %s", resume)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    stats = {"policy": str(_policy(cfg, run_dir)), "base_model": _base_model(cfg, run_dir), "queries": len(rows),
             "steps": trainer.state.global_step, "resumed_from": resume, "seconds": round(seconds, 2),
             "step_level": cfg.step_level, "num_generations": cfg.num_generations,
             "forced_per_mode": cfg.forced_per_mode, "reward_weights": dict(zip(trainer.reward_func_names, weights)),
             "adapter": str(out / "adapter"), "last": _last_metrics(history), **loaded,
             "memory_plan_gib": round(plan.total / 2**30, 2) if plan else None}
    if trainer.accelerator.is_main_process:
        from katdata.train import _save_atomic

        def save(path):
            trainer.model.save_pretrained(path, selected_adapters=["default"])
            tok.save_pretrained(path)

        _save_atomic(save, out / "adapter")
        with open(out / ".log.jsonl.tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        os.replace(out / ".log.jsonl.tmp", out / "log.jsonl")
        (out / ".rl.json.tmp").write_text(json.dumps(stats, indent=1))
        os.replace(out / ".rl.json.tmp", out / "rl.json")
    return stats


def _last_metrics(history: list[dict]) -> dict:
    """The means over the logged steps of the reward components, mode rate, tokens per mode and KL."""
    keys = sorted({k for row in history for k in row if k.startswith(("rewards/", "mode/", "tokens/"))
                   or k in ("reward", "kl")})
    out = {}
    for k in keys:
        vals = [row[k] for row in history if isinstance(row.get(k), (int, float)) and "train_runtime" not in row]
        if vals:
            out[k] = float(f"{sum(vals) / len(vals):.4g}")
    return out


def side_by_side(models: dict[str, dict]) -> dict[str, dict]:
    """eval.json's per-model metrics reduced to the comparison table (base, SFT = adapted, RL)."""
    table = {}
    for name, m in models.items():
        settings = m.get("settings", {})
        auto = settings.get("auto", {})
        table[name] = {"template_validity": m.get("template_validity"), "mode_agreement": m.get("mode_agreement"),
                       "think_on_rate": m.get("think_on_rate"),
                       "accuracy": {s: v.get("accuracy") for s, v in settings.items()},
                       "mean_tokens": auto.get("mean_tokens"), "mean_tokens_by_mode": auto.get("mean_tokens_by_mode")}
    return table


def main(argv: list[str] | None = None) -> int:
    """`katdata rl RUN_DIR`: the rl stage as a stage command (katdata.stage_command); a folder without recipe.yaml
    (a `katdata train` folder) runs from the flags alone."""
    import sys

    from katdata import stage_command

    def bare(args):
        from katdata.preflight import run_folder, train_record

        cfg = stage_command.section(STAGE, args)
        base = cfg.model or train_record(args.run_dir).get("base_model")
        run_folder(args.run_dir, "rl", models={"model" if cfg.model else "train/train.json base_model": base})
        stats = run(cfg, args.run_dir)  # (it checks the policy and its output folder before torch is imported)
        if stage_command.main_rank():
            print(json.dumps(stats, indent=1))
        return 0

    return stage_command.main("rl", list(sys.argv[1:] if argv is None else argv), bare=bare)


STAGE = Stage("rl", "mode-aware GRPO after train: decision and answer rewards, step-level advantages",
              lambda ctx: run(ctx.cfg, ctx.folder.root), RLConfig, reads=("split",), writes=("rl",), optional=True,
              inputs=lambda recipe, run_dir: input_paths(recipe.rl, run_dir))


if __name__ == "__main__":  # accelerate launch -m katdata.rl RUN_DIR
    raise SystemExit(main())
