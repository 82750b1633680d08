"""How train and rl load the base model: its dtype (katdata.dtypes), QLoRA through bitsandbytes, and gradient
checkpointing. The three settings are one mixin of both stages' config classes, so a recipe says them the same
way under ``train:`` and ``rl:``.

- ``dtype: auto``: bf16 on a GPU (fp16 where bf16 is unsupported), whatever the folder was saved in; float32 on a
  CPU. A 40B base is about 160 GB in float32, 80 GB in bf16, about 22 GB in 4-bit NF4.
- ``quantization: 4bit``: NF4 with double quantization and bf16 compute (float32 compute on a CPU without a GPU);
  ``8bit``: LLM.int8. The LoRA weights train in bf16 (TRL's QLoRA rule); on a GPU the optimizer is bitsandbytes'
  paged 8-bit AdamW. bitsandbytes 0.50 also runs both on a CPU (measured here: the embedded model loads in 4-bit
  and a LoRA step runs), slowly: it is for checks, not for speed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field

from katdata import dtypes
from katdata.errors import KatdataError

log = logging.getLogger(__name__)

Quantization = Literal["4bit", "8bit"]


class LoadSettings(BaseModel):
    """The base model's loading settings, shared by ``train:`` and ``rl:``."""

    dtype: Literal[dtypes.NAMES] = Field("auto", description="dtype the base model loads in; auto = bf16 on a GPU "
                                         "(fp16 without bf16 support) whatever the folder's dtype, float32 on a CPU")
    quantization: Optional[Quantization] = Field(None, description="QLoRA: 4bit (NF4, double quantization, bf16 "
                                                 "compute, paged 8-bit AdamW on a GPU) or 8bit; needs bitsandbytes")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: much less "
                                         "activation memory for about a third more compute")


def check_quantization(settings: LoadSettings, section: str) -> None:
    """One line, before anything loads, when the settings ask for bitsandbytes and it is not installed."""
    if settings.quantization and importlib.util.find_spec("bitsandbytes") is None:
        raise KatdataError(f"{section}.quantization: {settings.quantization} needs bitsandbytes, which is not "
                           "installed: pip install 'katdata[qlora]' (or drop the key to train in the dtype)")


def device() -> str:
    return "cuda" if dtypes.on_gpu() else "cpu"


def load(path: str | Path, settings: LoadSettings, section: str, **kw):
    """(model, what was used: dtype, quantization, device): the causal LM at ``path`` as ``settings`` say."""
    import torch
    import transformers

    check_quantization(settings, section)
    where = device()
    name = dtypes.choose(settings.dtype, where)
    kw["dtype"] = dtypes.torch_dtype(name)
    if settings.quantization:
        compute = name if (name != "float32" or where == "cuda") else "float32"
        if settings.quantization == "4bit":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtypes.torch_dtype(compute))
        else:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        # each process puts its copy on its own device (accelerate/torchrun: one GPU per rank)
        kw["device_map"] = {"": torch.cuda.current_device() if where == "cuda" else "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)
    used = {"dtype": name, "quantization": settings.quantization, "device": where,
            "gradient_checkpointing": settings.gradient_checkpointing}
    log.info("%s: base model %s in %s%s on %s", section, path, name,
             f" ({settings.quantization})" if settings.quantization else "", where)
    return model, used


def trainer_args(settings: LoadSettings) -> dict:
    """The TRL config arguments these settings imply (gradient checkpointing; the 8-bit paged optimizer for QLoRA on a
    GPU)."""
    args: dict = {"gradient_checkpointing": settings.gradient_checkpointing}
    if settings.gradient_checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if settings.quantization and device() == "cuda":
        args["optim"] = "paged_adamw_8bit"
    return args


def sharded_over() -> int:
    """How many GPUs share the weights: the world size under accelerate's FSDP or DeepSpeed ZeRO-3, else 1 (plain
    data parallel keeps a whole copy per process). 1 on a CPU: there every process's shard is in the same RAM."""
    import os

    if device() != "cuda":
        return 1
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    zero3 = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    return int(os.environ.get("WORLD_SIZE", "1")) if fsdp or zero3 else 1


def plan(cfg, model_path, stage: str):
    """The memory plan (katdata.memory_plan) of ``stage`` ("train" or "rl") with ``cfg`` on ``model_path`` and the
    devices present (FSDP / ZeRO-3 shards counted)."""
    from katdata import memory_plan

    make = memory_plan.plan_for_train if stage == "train" else memory_plan.plan_for_rl
    return make(cfg, model_path, shards=sharded_over())


def planned(cfg, model_path, stage: str):
    """:func:`plan`, checked: a setup that cannot fit stops here, in one line, before any weight loads. None (logged)
    when the model cannot be planned (no local config.json yet, as for a hub id not downloaded, or a layout the
    plan does not know)."""
    from katdata import memory_plan

    try:
        found = plan(cfg, model_path, stage)
    except KatdataError as exc:
        log.warning("%s: %s; going on without a memory plan", stage, exc)
        return None
    memory_plan.check(found)
    log.info("%s: memory plan %.1f GiB of %.1f GiB a device", stage, found.total / 2**30, found.devices.memory / 2**30)
    return found
