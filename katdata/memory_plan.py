"""A memory plan before loading (issue 25): what `katdata train` / `katdata rl` will need per device, from the
model folder's config.json alone (no weights, no torch for the arithmetic), compared with the devices present.

Parts (bytes, per device):

* weights: linear layers in the load dtype (float32 4, bfloat16 / float16 2 bytes a parameter) or quantized
  (8bit: 1 byte + an fp32 scale per output row; 4bit NF4: 0.5 byte + the block scales, one per 64 weights, 1 byte
  each with double quantization plus an fp32 per 256 blocks, 4 bytes each without); embeddings, lm_head and norms
  stay in the compute dtype. Divided by N under FSDP over N devices.
* lora / gradients / optimizer: the trainable parameters (LoRA A and B, r x (in + out) per targeted linear, plus the
  embedding and lm_head copies with marker tokens) in fp32 (peft keeps adapters in fp32), their fp32 gradients, and
  AdamW's m and v (8 bytes a parameter; a paged 8-bit AdamW: 2). Divided by N under FSDP.
* fsdp gather: under FSDP, two layers' weights gathered whole (the one computing and the one prefetched).
* activations, logits: see :func:`activation_bytes` and :func:`logits_bytes`.
* kv cache (rl): rollouts generated with transformers keep 2 x layers x kv_heads x head_dim x bytes per token of
  every sequence; with vLLM colocated its share of the device memory is reserved instead ("vllm").
* overhead: CUDA context and allocator slack (1 GiB a GPU); on a CPU 0 (the plan counts what training adds).

rl's total is the persistent parts plus the larger of the rollout phase (kv cache) and the training phase
(activations + logits): the two do not overlap in time. Unsupported: MLA attention (DeepSeek), per-layer mixes of
dense and MoE layers (all layers are counted as MoE when num_experts is set), vision towers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Optional

from katdata.errors import KatdataError

log = logging.getLogger(__name__)

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FSDP_SIZES = (2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------- the model's shape
def _shape(cfg: dict) -> dict:
    """The dimensions a plan needs, with Llama / Qwen / Mistral defaults for the optional fields."""
    cfg = cfg.get("text_config", cfg)  # a multimodal wrapper: the language model's part
    try:
        h, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except KeyError as exc:
        raise KatdataError(f"memory plan: config.json has no {exc.args[0]}: only Llama / Qwen / Mistral-shaped "
                           "decoders are supported") from exc
    if "kv_lora_rank" in cfg:
        raise KatdataError("memory plan: MLA attention (DeepSeek-style kv_lora_rank) is not supported")
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    inter = int(cfg.get("intermediate_size") or 4 * h)
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    mtype = str(cfg.get("model_type", ""))
    return {"h": h, "layers": layers, "heads": heads, "kv": kv, "head_dim": head_dim, "vocab": vocab, "inter": inter,
            "experts": experts, "moe_inter": moe_inter, "top_k": int(cfg.get("num_experts_per_tok") or 2),
            "shared_inter": int(cfg.get("shared_expert_intermediate_size") or 0),
            "tied": bool(cfg.get("tie_word_embeddings", False)),
            "qkv_bias": bool(cfg.get("attention_bias", False)) or mtype.startswith("qwen2"),
            "o_bias": bool(cfg.get("attention_bias", False)) and not mtype.startswith("qwen2"),
            "mlp_bias": bool(cfg.get("mlp_bias", False)), "qk_norm": mtype.startswith("qwen3")}


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int, int]]:
    """Per decoder layer: module name -> (in_features, out_features, copies). Experts' projections count once per
    expert; a shared expert (Qwen-MoE) as ``shared_*``."""
    s = _shape(cfg)
    h, q, kvd = s["h"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    out = {"q_proj": (h, q, 1), "k_proj": (h, kvd, 1), "v_proj": (h, kvd, 1), "o_proj": (q, h, 1)}
    if s["experts"]:
        m, n = s["moe_inter"], s["experts"]
        out |= {"gate_proj": (h, m, n), "up_proj": (h, m, n), "down_proj": (m, h, n), "router": (h, n, 1)}
        if s["shared_inter"]:
            m = s["shared_inter"]
            out |= {"shared_gate_proj": (h, m, 1), "shared_up_proj": (h, m, 1), "shared_down_proj": (m, h, 1)}
    else:
        out |= {"gate_proj": (h, s["inter"], 1), "up_proj": (h, s["inter"], 1), "down_proj": (s["inter"], h, 1)}
    return out


def param_counts(cfg: dict) -> dict[str, int]:
    """Parameters by kind: ``linear`` (the decoder layers' projections, quantizable), ``embed``, ``lm_head`` (0 when
    tied to the embeddings), ``other`` (norms and biases), ``total``."""
    s = _shape(cfg)
    h, layers = s["h"], s["layers"]
    linear = layers * sum(i * o * n for i, o, n in linear_shapes(cfg).values())
    q, kvd = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    per_layer = 2 * h + (q + 2 * kvd if s["qkv_bias"] else 0) + (h if s["o_bias"] else 0)
    per_layer += 2 * s["head_dim"] if s["qk_norm"] else 0
    if s["mlp_bias"]:
        per_layer += sum(o * n for name, (_, o, n) in linear_shapes(cfg).items()
                         if name.endswith(("gate_proj", "up_proj", "down_proj")))
    embed = s["vocab"] * h
    counts = {"linear": linear, "embed": embed, "lm_head": 0 if s["tied"] else embed, "other": layers * per_layer + h}
    counts["total"] = sum(counts.values())
    return counts


def weight_bytes(cfg: dict, dtype: str, quantization: Optional[str] = None, double_quant: bool = True) -> int:
    """Bytes of the base weights loaded in ``dtype``, the linear layers optionally quantized (``4bit`` NF4 or
    ``8bit``); embeddings, lm_head and norms stay in ``dtype``."""
    c = param_counts(cfg)
    rest = (c["embed"] + c["lm_head"] + c["other"]) * DTYPE_BYTES[dtype]
    if quantization is None:
        return c["linear"] * DTYPE_BYTES[dtype] + rest
    if quantization == "4bit":
        scale = 1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64
        return int(c["linear"] * (0.5 + scale)) + rest
    if quantization == "8bit":
        rows = _shape(cfg)["layers"] * sum(o * n for _, o, n in linear_shapes(cfg).values())
        return c["linear"] + 4 * rows + rest
    raise KatdataError(f"memory plan: quantization '{quantization}': expected 4bit, 8bit or none")


def _target_names(shapes: dict, targets) -> list[str]:
    """peft's target_modules as module names: ``all-linear`` is every linear of a layer (lm_head excluded)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [n for n in shapes if n != "router"] if targets == ["all-linear"] else targets


def lora_params(cfg: dict, r: int, targets=DEFAULT_TARGETS) -> int:
    """Trainable LoRA parameters: r x (in + out) for every targeted linear of every layer (``all-linear``: all of
    them, lm_head excluded, as peft does). A target the model does not have counts 0 (logged)."""
    shapes = linear_shapes(cfg)
    names = _target_names(shapes, targets)
    missing = [n for n in names if n not in shapes and f"shared_{n}" not in shapes]
    if missing:
        log.warning("memory plan: the model has no %s; they get no adapter in the estimate", ", ".join(missing))
    total = 0
    for name in names:
        for key in (name, f"shared_{name}"):
            if key in shapes:
                i, o, n = shapes[key]
                total += r * (i + o) * n
    return _shape(cfg)["layers"] * total


def activation_bytes(cfg: dict, batch: int, length: int, checkpointing: bool, act_bytes: int, targets=(),
                     adapter_bytes: int = 4) -> int:
    """Activations autograd keeps for the backward pass of ``batch`` x ``length`` tokens.

    Per token and decoder layer, with SDPA / flash attention (no length x length score matrix is kept), values of
    ``act_bytes`` each: ``4 h + 3 q_dim + 2 kv_dim + 4 i``: the two RMSNorms' inputs and outputs (4 h), the rotated
    q, the attention output and o_proj's input (3 q_dim, q_dim = heads x head_dim), the rotated k and v (2 kv_dim),
    and in the MLP the gate and up outputs, the activation and the product fed to down_proj (4 i; for MoE
    ``i = top_k x moe_intermediate + shared``). LoRA adds r values per target (left out: r << h). This is what
    torch's saved-tensor hooks count on a float32 Llama with LoRA (4800 against 4610 counted). When the compute
    dtype is 16-bit, peft's fp32 adapters cast their input to fp32 and keep that copy: each targeted module adds
    its in_features x ``adapter_bytes`` (a bf16 Llama: 9248 bf16 values by this rule, 8432 counted).

    Without checkpointing: (layers + 1) such layers, the extra one for the gradients in flight during backward.
    With gradient checkpointing: each layer keeps only its input (h per token), plus the one layer being
    recomputed: ``layers x h + per-layer``.
    """
    s = _shape(cfg)
    inter = s["top_k"] * s["moe_inter"] + s["shared_inter"] if s["experts"] else s["inter"]
    q_dim, kv_dim = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    per_token = (4 * s["h"] + 3 * q_dim + 2 * kv_dim + 4 * inter) * act_bytes
    if act_bytes != adapter_bytes and targets:
        shapes = linear_shapes(cfg)
        for name in _target_names(shapes, targets):
            for key in (name, f"shared_{name}"):
                if key in shapes:
                    i, _, n = shapes[key]
                    per_token += i * min(n, s["top_k"]) * adapter_bytes
    layer = batch * length * per_token
    if checkpointing:
        return s["layers"] * batch * length * s["h"] * act_bytes + layer
    return (s["layers"] + 1) * layer


def logits_bytes(cfg: dict, batch: int, length: int) -> int:
    """The loss's logits: batch x length x vocab values of 4 bytes (the loss computes in fp32), four times at the
    loss's backward: the logits, their log-softmax, its gradient and the logits' gradient."""
    return 4 * batch * length * _shape(cfg)["vocab"] * 4


def kv_cache_bytes(cfg: dict, sequences: int, length: int, kv_bytes: int) -> int:
    """The KV cache of ``sequences`` rollouts of ``length`` tokens (prompt + completion):
    2 x layers x kv_heads x head_dim x bytes x sequences x length."""
    s = _shape(cfg)
    return 2 * s["layers"] * s["kv"] * s["head_dim"] * kv_bytes * sequences * length


# ---------------------------------------------------------------- devices
@dataclass(frozen=True)
class Devices:
    """What the plan is compared with: ``kind`` "cuda" or "cpu", ``memory`` bytes per device, ``count``."""

    kind: str
    memory: int
    count: int = 1
    name: str = ""
    bf16: bool = True

    def label(self) -> str:
        return f"{self.count} x {self.name or self.kind} ({self.memory / GiB:.1f} GiB)"


def detect() -> Devices:
    """The GPUs torch sees (when torch is installed and CUDA is present), else this machine's RAM as "cpu"."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Devices("cuda", int(props.total_memory), torch.cuda.device_count(), props.name,
                           bool(torch.cuda.is_bf16_supported()))
    try:
        import psutil

        memory = int(psutil.virtual_memory().total)
    except ImportError:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Devices("cpu", memory, 1, "cpu", False)


def resolve_dtype(requested: str, devices: Devices) -> str:
    """``auto``: bf16 on a GPU (fp16 where it lacks bf16), float32 on a CPU (katdata.dtypes.choose's rule)."""
    from katdata.dtypes import choose

    if devices.kind == "cuda" and requested == "auto":
        return "bfloat16" if devices.bf16 else "float16"
    return choose(requested, "cpu" if devices.kind == "cpu" else "cuda")


# ---------------------------------------------------------------- the setup and its plan
@dataclass(frozen=True)
class Setup:
    """One training job as the plan sees it. ``batch`` sequences of ``length`` tokens per device and step; the loss
    covers ``loss_length`` of them; rl rollouts: ``kv_sequences`` sequences of ``length`` in the KV cache, or
    ``vllm_share`` of the device reserved by a colocated vLLM; ``batch_unit``: the batch shrinks in steps of it."""

    stage: str
    config: dict = field(repr=False)
    dtype: str
    quantization: Optional[str]
    lora_r: int
    targets: tuple
    batch: int
    length: int
    loss_length: int
    checkpointing: bool = False
    optim_bytes: int = 8
    train_embeddings: bool = False
    kv_sequences: int = 0
    vllm_share: float = 0.0
    shards: int = 1
    batch_unit: int = 1

    def describe(self) -> str:
        quant = f", {self.quantization} QLoRA" if self.quantization else ""
        fsdp = f", FSDP over {self.shards}" if self.shards > 1 else ""
        return (f"{self.stage}: {param_counts(self.config)['total'] / 1e9:.2f}B params, {self.dtype}{quant}, "
                f"LoRA r={self.lora_r}, batch {self.batch} x {self.length}, checkpointing "
                f"{'on' if self.checkpointing else 'off'}{fsdp}")


@dataclass
class Plan:
    """The estimate: ``parts`` in bytes per device, ``total`` per device, the devices, ``fits``; ``options``: when it
    does not fit, (change, its Plan) for the changes that would (:func:`options`)."""

    setup: Setup
    parts: dict
    total: int
    devices: Devices
    fits: bool
    options: list = dataclasses.field(default_factory=list)


ROLLOUT, TRAINING = ("kv cache",), ("activations", "logits")


def estimate(setup: Setup, devices: Devices) -> Plan:
    """The plan of ``setup`` on ``devices`` (no options; see :func:`options`)."""
    cfg, n = setup.config, setup.shards
    compute = "bfloat16" if setup.quantization and setup.dtype == "float32" and devices.kind == "cuda" else setup.dtype
    act = DTYPE_BYTES[compute]
    counts = param_counts(cfg)
    trainable = lora_params(cfg, setup.lora_r, setup.targets)
    trainable += (counts["embed"] + max(counts["lm_head"], counts["embed"])) if setup.train_embeddings else 0
    parts = {"weights": weight_bytes(cfg, compute, setup.quantization) // n,
             "lora": trainable * 4 // n, "gradients": trainable * 4 // n, "optimizer": trainable * setup.optim_bytes // n}
    if n > 1:
        layer = (counts["linear"] + counts["other"]) // _shape(cfg)["layers"]
        parts["fsdp gather"] = 2 * layer * DTYPE_BYTES[compute]
    parts["activations"] = activation_bytes(cfg, setup.batch, setup.length, setup.checkpointing, act, setup.targets)
    parts["logits"] = logits_bytes(cfg, setup.batch, setup.loss_length)
    if setup.vllm_share:
        parts["vllm"] = int(setup.vllm_share * devices.memory)
    elif setup.kv_sequences:
        parts["kv cache"] = kv_cache_bytes(cfg, setup.kv_sequences, setup.length, act)
    parts["overhead"] = GiB if devices.kind == "cuda" else 0
    persistent = sum(v for k, v in parts.items() if k not in ROLLOUT + TRAINING)
    total = persistent + max(sum(parts.get(k, 0) for k in ROLLOUT), sum(parts.get(k, 0) for k in TRAINING))
    return Plan(setup, parts, total, devices, total <= devices.memory and devices.count >= n)


def _fsdp(setup: Setup, devices: Devices) -> Optional[Plan]:
    """The plan over the fewest devices of this kind (FSDP) that fits, or None."""
    for n in FSDP_SIZES:
        if n > setup.shards:
            plan = estimate(replace(setup, shards=n), replace(devices, count=max(devices.count, n)))
            if plan.fits:
                return plan
    return None


def _smaller_batch(setup: Setup, devices: Devices, fsdp: bool) -> Optional[Plan]:
    """The plan with the largest smaller batch (in steps of batch_unit) that fits, or None."""
    for b in range(setup.batch - setup.batch_unit, 0, -setup.batch_unit):
        plan = _fsdp(replace(setup, batch=b, kv_sequences=b if setup.kv_sequences else 0), devices) if fsdp \
            else estimate(replace(setup, batch=b, kv_sequences=b if setup.kv_sequences else 0), devices)
        if plan is not None and plan.fits:
            return plan
    return None


def _label(base: Setup, plan: Plan, devices: Devices) -> str:
    s, parts = plan.setup, []
    if s.quantization != base.quantization:
        parts.append(f"quantization {s.quantization} (QLoRA)")
    if s.checkpointing != base.checkpointing:
        parts.append("gradient_checkpointing on")
    if s.batch != base.batch:
        what = "batch_size" if base.stage == "train" else "prompts_per_step"
        value = s.batch if base.stage == "train" else s.batch // base.batch_unit
        parts.append(f"{what} {value}" + (f" (grad_accum x{base.batch // s.batch} keeps the batch)"
                                          if base.stage == "train" and base.batch % s.batch == 0 else ""))
    if s.shards != base.shards:
        parts.append(f"FSDP over {s.shards} GPUs" + (f" ({devices.count} present)" if s.shards > devices.count
                                                     else ""))
    return " + ".join(parts)


def options(setup: Setup, devices: Devices) -> list[tuple[str, Plan]]:
    """The changes that would make ``setup`` fit, each with its plan: 4bit QLoRA, gradient checkpointing, FSDP over
    the fewest GPUs of this kind, a smaller batch, and combinations of them where no single change fits (only the
    smallest combinations: none contains another that fits)."""
    toggles = []
    if setup.quantization != "4bit":
        toggles.append("4bit")
    if not setup.checkpointing:
        toggles.append("ckpt")
    if devices.kind == "cuda":
        toggles.append("fsdp")
    found: list[tuple[frozenset, str, Plan]] = []
    for size in range(1, len(toggles) + 1):
        for combo in combinations(toggles, size):
            key = frozenset(combo)
            if any(k <= key for k, _, _ in found):
                continue
            s = replace(setup, quantization="4bit" if "4bit" in key else setup.quantization,
                        checkpointing=setup.checkpointing or "ckpt" in key)
            plan = _fsdp(s, devices) if "fsdp" in key else estimate(s, devices)
            if plan is not None and plan.fits:
                found.append((key, _label(setup, plan, devices), plan))
    for key in [frozenset(c) for n in range(len(toggles) + 1) for c in combinations(toggles, n)]:
        if any(k <= key | {"batch"} for k, _, _ in found):
            continue  # a smaller batch alone, or with the fewest toggles where they do not fit alone
        s = replace(setup, quantization="4bit" if "4bit" in key else setup.quantization,
                    checkpointing=setup.checkpointing or "ckpt" in key)
        plan = _smaller_batch(s, devices, "fsdp" in key)
        if plan is not None:
            found.append((key | {"batch"}, _label(setup, plan, devices), plan))
    return [(label, plan) for _, label, plan in found]


def gib(n: int) -> str:
    """Bytes for people: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2 ** 20:.0f} MiB"


def format_plan(plan: Plan) -> str:
    """The lines `katdata train RUN --plan` prints: the setup, a part per line, the total against the devices."""
    lines = [f"memory plan ({plan.setup.describe()})"]
    for name, value in plan.parts.items():
        note = "  (rollout phase)" if name in ROLLOUT else "  (training phase)" if name in TRAINING else ""
        lines.append(f"  {name:<12}{gib(value):>12}{note}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<12}{gib(plan.total):>12}  per device; {plan.devices.label()}: {verdict}")
    if plan.setup.shards > plan.devices.count:
        lines.append(f"  FSDP over {plan.setup.shards} needs {plan.setup.shards} devices, {plan.devices.count} present")
    for label, option in plan.options:
        lines.append(f"  would fit: {label} -> {gib(option.total)}")
    if not plan.fits and not plan.options:
        lines.append("  no change katdata knows (4bit, checkpointing, smaller batch, FSDP up to 64) makes it fit")
    return "\n".join(lines)


def check(plan: Plan) -> None:
    """Raise KatdataError, one line, when the plan does not fit: the estimate, the memory present, what would fit."""
    if plan.fits:
        return
    present = plan.devices.label()
    if plan.setup.shards > plan.devices.count:
        present += f", FSDP over {plan.setup.shards} asked"
    fit = "; ".join(f"{label} ({gib(p.total)})" for label, p in plan.options) or "none of 4bit QLoRA, gradient " \
        "checkpointing, a smaller batch or FSDP over up to 64 GPUs"
    raise KatdataError(f"memory plan: {plan.setup.stage} needs about {gib(plan.total)} per device, {present} "
                       f"present; would fit: {fit}. (`katdata {plan.setup.stage} RUN --plan` prints the estimate)")


# ---------------------------------------------------------------- the stages
def read_config(model_path) -> dict:
    """config.json of a model folder (or of a hub id already in the local hub cache)."""
    path = Path(str(model_path)) / "config.json"
    if not path.is_file() and importlib.util.find_spec("huggingface_hub") is not None and not Path(str(model_path)).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model_path), "config.json")
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        raise KatdataError(f"memory plan: no config.json at {model_path} (a model folder or a cached hub id)")
    return json.loads(path.read_text())


def _optim_bytes(cfg) -> int:
    return 2 if "8bit" in str(getattr(cfg, "optim", "adamw_torch")) else 8


def plan_for_train(cfg, model_path, devices: Optional[Devices] = None, shards: int = 1) -> Plan:
    """The plan of `katdata train` with TrainConfig ``cfg`` on the model folder ``model_path``; ``shards``: FSDP
    over that many GPUs (1: each process holds the whole model, as with plain data parallel)."""
    devices = devices or detect()
    setup = Setup("train", read_config(model_path), resolve_dtype(getattr(cfg, "dtype", "auto"), devices),
                  getattr(cfg, "quantization", None), cfg.lora_r, tuple(cfg.target_modules), cfg.batch_size,
                  cfg.max_length, cfg.max_length, bool(getattr(cfg, "gradient_checkpointing", False)),
                  _optim_bytes(cfg), bool(getattr(cfg, "add_marker_tokens", False)), shards=shards)
    return _finish(setup, devices)


def plan_for_rl(cfg, model_path, devices: Optional[Devices] = None, shards: int = 1,
                prompt_length: Optional[int] = None) -> Plan:
    """The plan of `katdata rl` with RLConfig ``cfg``: num_generations x prompts_per_step rollouts of
    ``prompt_length`` (cfg.max_prompt_length where set, else 512) + max_completion_length tokens per step."""
    devices = devices or detect()
    prompt = prompt_length or getattr(cfg, "max_prompt_length", None) or 512
    batch = cfg.num_generations * cfg.prompts_per_step
    colocate = getattr(cfg, "use_vllm", False) and getattr(cfg, "vllm_mode", "colocate") == "colocate"
    setup = Setup("rl", read_config(model_path), resolve_dtype(getattr(cfg, "dtype", "auto"), devices),
                  getattr(cfg, "quantization", None), cfg.lora_r, DEFAULT_TARGETS, batch,
                  prompt + cfg.max_completion_length, cfg.max_completion_length,
                  bool(getattr(cfg, "gradient_checkpointing", False)), _optim_bytes(cfg),
                  kv_sequences=0 if getattr(cfg, "use_vllm", False) else batch,
                  vllm_share=float(getattr(cfg, "vllm_gpu_memory_utilization", 0.0)) if colocate else 0.0,
                  shards=shards, batch_unit=cfg.num_generations)
    return _finish(setup, devices)


def _finish(setup: Setup, devices: Devices) -> Plan:
    plan = estimate(setup, devices)
    if not plan.fits:
        plan.options = options(setup, devices)
    log.info("memory plan: %s needs %s per device of %s", setup.stage, gib(plan.total), devices.label())
    return plan
