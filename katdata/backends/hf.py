"""The transformers backend: ``model.generate`` batched with left padding.

- prompt: ``Request.prompt()`` (the KAT ChatML) for ``chat_template="kat"``, the tokenizer's own chat
  template plus the prefix for ``"model"``;
- threads: ``config.num_threads`` (or ``extra["threads"]``, or ``KATDATA_THREADS``); on a 2-core CPU without
  ``OMP_NUM_THREADS`` it uses 1 torch thread (2 threads thrash as soon as another process runs);
- dtype (``katdata.dtypes.choose``; the one used is logged and kept as ``dtype_name``): ``auto`` is bf16 on a CUDA
  GPU (fp16 where bf16 is unsupported) whatever dtype the folder holds (the embedded model's is float32), bf16 on a
  CPU that computes it natively (AVX512-BF16 or AMX: 2.5-3x faster than fp32 there), fp32 on other CPUs (AVX2
  emulates bf16: 2.5x slower than fp32);
- requests are sorted by length and cut into batches of about ``config.batch_size`` sequences; ``n``
  samples come from ``num_return_sequences`` (greedy ``n>1`` decodes once and copies); each batch is
  seeded from ``params.seed`` and its own token ids, so a resumed run that re-issues the same batch
  draws the same samples (the stages keep their call boundaries fixed for this);
- stop strings that are one special token stop as end token ids; the others stop a row through transformers'
  ``StopStringCriteria``, built once per set of strings and kept (``generate(stop_strings=...)`` maps the whole
  vocabulary on every call: 1-2 s a batch on a CPU); the text is cut before the first one and ``finish_reason`` is
  "stop"; the EOS token also gives "stop", the token limit "length";
- per step, beyond the model, only a progress counter runs (a stopping criterion that stops nothing: its end ids
  live on the device, and on an accelerator it reads its count, which waits for the device, every 8th step);
  prompts are tokenized in one call;
- ``extra["cache_implementation"]`` (e.g. ``"static"``) is passed to ``generate``; off by default: on a CPU a static
  cache took 1.16x the CPU time of the dynamic one (16 prompts x 64 tokens, SmolLM2-135M, bf16) and changed half the
  greedy texts; on a CUDA GPU transformers then compiles the forward (``torch.compile``), which can pay only once
  the shapes repeat (a batch of a new width or token budget is a new cache length: a recompile); unmeasured there;
- a prompt that leaves no room in the context gets ``finish_reason="error"``; the rest go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from katdata import dtypes
from katdata.backends.base import Backend, EngineConfig, Completion, Request, SamplingParams
from katdata.errors import EngineError, require

log = logging.getLogger(__name__)

OnDone = Callable[[int, list[Completion]], None]


def check_model_path(model: str) -> None:
    """Fail early, naming the path, when a model given as a local path does not exist."""
    looks_local = model.startswith(("/", "./", "../", "~")) or Path(model).suffix in (".gguf", ".safetensors")
    if looks_local and not Path(model).expanduser().exists():
        raise EngineError(f"model '{model}' not found: no such folder")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it torch emulates bf16 and is
    slower than fp32: 4 prompts x 16 tokens of SmolLM2-135M took 43 s in bf16 and 17 s in fp32 on an AVX2 EPYC."""
    torch = require("torch", "local")
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


class TransformersBackend(Backend):
    """``generate`` on a local transformers model (default: the embedded SmolLM2)."""

    name = "transformers"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        torch = require("torch", "local")
        transformers = require("transformers", "local")
        from katdata.model import resolve

        self.path = resolve(config.model)
        check_model_path(self.path)
        device = str(config.extra.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        cpu_auto = "bfloat16" if device == "cpu" and config.dtype == "auto" and native_bf16_cpu() else "float32"
        self.dtype_name = dtypes.choose(config.dtype, device, cpu_auto=cpu_auto)  # eval records it
        dtype = dtypes.torch_dtype(self.dtype_name)
        kw = dict(revision=config.revision, trust_remote_code=config.trust_remote_code)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, **kw)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kw)
        except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError for a corrupt file, ...
            if isinstance(exc, (MemoryError, KeyboardInterrupt)):
                raise
            why = " ".join(str(exc).split())[:300]
            raise EngineError(f"cannot load model '{self.path}': {type(exc).__name__}: {why}") from exc
        if config.lora_path:
            peft = require("peft", "train")
            self.model = peft.PeftModel.from_pretrained(self.model, config.lora_path)
        self.model.to(device).eval()
        threads = config.num_threads or config.extra.get("threads") or os.environ.get("KATDATA_THREADS")
        if threads is None and device == "cpu" and (os.cpu_count() or 1) <= 2 and "OMP_NUM_THREADS" not in os.environ:
            threads = 1  # on 2 shared cores, 2 torch threads thrash when anything else runs (16 tokens: 45 s vs 3 s)
        if threads:
            torch.set_num_threads(int(threads))
        self.device = device
        self._adapter: Optional[str] = None  # the adapter loaded by with_adapter (off unless a view asks)
        self._adapter_active = False
        self._stop_criteria: dict[tuple[str, ...], object] = {}
        cache = config.extra.get("cache_implementation")  # e.g. "static" (see the module doc)
        self._cache_kw = {"cache_implementation": cache} if cache else {}
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_len = config.max_model_len or getattr(self.model.config, "max_position_embeddings", None) or 4096
        log.info("transformers backend: %s (%s, %s)", self.path, device, self.dtype_name)

    # -- prompts ---------------------------------------------------------------------------------

    def render_prompt(self, request: Request) -> str:
        """The exact prompt text this backend feeds the model (also the request cache's key)."""
        if self.config.chat_template == "model":
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return text + (request.prefix or "")
        return request.prompt()

    def _special_stops(self, stop: tuple[str, ...]) -> tuple[set[int], list[str]]:
        """Stop strings that are one special token become stop token ids; the rest stay strings."""
        ids, strings = set(), []
        special = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        for s in stop:
            tid = self.tokenizer.convert_tokens_to_ids(s) if s in special else None
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
            else:
                strings.append(s)
        return ids, strings

    # -- generation ------------------------------------------------------------------------------

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done: Optional[OnDone] = None) -> list[list[Completion]]:
        """``params.n`` completions per request; ``on_done(i, completions)`` after each batch."""
        results: list[Optional[list[Completion]]] = [None] * len(requests)
        encoded = []
        texts = [self.render_prompt(req) for req in requests]
        all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # one call, not one each
        for i, ids in enumerate(all_ids):
            if len(ids) >= self.max_len:
                err = (f"prompt is longer than the context: {len(ids)} prompt tokens, "
                       f"max_model_len {self.max_len}")
                results[i] = [Completion("", "error", len(ids), 0, error=err) for _ in range(params.n)]
                if on_done:
                    on_done(i, results[i])
            else:
                encoded.append((i, ids))
        encoded.sort(key=lambda item: len(item[1]))
        copies = 1 if params.temperature == 0 else params.n
        per_batch = max(1, self.config.batch_size // copies)
        stop_ids, stop_strings = self._special_stops(tuple(params.stop))
        for start in range(0, len(encoded), per_batch):
            chunk = encoded[start:start + per_batch]
            outs = self._generate_batch([ids for _, ids in chunk], params, copies, stop_ids, stop_strings)
            for (i, _), comps in zip(chunk, outs):
                if copies < params.n:
                    comps = [Completion(**vars(comps[0])) for _ in range(params.n)]
                results[i] = comps
                if on_done:
                    on_done(i, comps)
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, copies: int,
                        stop_ids: set[int], stop_strings: list[str]) -> list[list[Completion]]:
        torch = require("torch", "local")
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)
        max_new = max(1, min(params.max_tokens, self.max_len - width))
        eos = sorted(self.eos_ids | stop_ids)
        kw = dict(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad, num_return_sequences=copies,
                  top_k=None, use_cache=True)
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None)
        if params.repetition_penalty != 1.0:
            kw.update(repetition_penalty=params.repetition_penalty)
        if params.frequency_penalty:
            kw.update(logits_processor=_frequency_penalty(params.frequency_penalty, width))
        finished = _finish_counter(len(batch) * copies, self.eos_ids | stop_ids | {pad}, params.n // copies)
        if stop_strings:  # transformers' own criterion, built once per stop strings (1-2 s each on a CPU)
            finished.append(self._stop_criterion(tuple(stop_strings)))
        kw.update(stopping_criteria=finished)
        if params.logprobs:
            kw.update(output_logits=True, return_dict_in_generate=True)
        if params.seed is not None:  # seeded by the batch's content, so a resumed run redraws the same batch alike
            digest = hashlib.sha256(repr((params.seed, batch)).encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        off = self.model.disable_adapter() if self._adapter and not self._adapter_active else contextlib.nullcontext()
        with torch.inference_mode(), off:
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      **kw, **self._cache_kw)
        finished[0].rest()
        seqs = out.sequences if params.logprobs else out
        gen = seqs[:, width:].tolist()
        logits = out.logits if params.logprobs else None
        comps = []
        for row, toks in enumerate(gen):
            prompt_len = len(batch[row // copies])
            comps.append(self._completion(toks, prompt_len, stop_ids, stop_strings, params, logits, row))
        return [comps[k * copies:(k + 1) * copies] for k in range(len(batch))]

    def _stop_criterion(self, stop_strings: tuple[str, ...]):
        """transformers' ``StopStringCriteria`` for these strings, kept: building one maps the whole vocabulary
        (what ``generate(stop_strings=...)`` does on every call)."""
        crit = self._stop_criteria.get(stop_strings)
        if crit is None:
            from transformers.generation.stopping_criteria import StopStringCriteria

            crit = self._stop_criteria[stop_strings] = StopStringCriteria(self.tokenizer, list(stop_strings))
        return crit

    def _completion(self, toks: list[int], prompt_len: int, stop_ids: set[int], stop_strings: list[str],
                    params: SamplingParams, logits, row: int) -> Completion:
        end = next((k for k, t in enumerate(toks) if t in self.eos_ids or t in stop_ids), None)
        body = toks if end is None else toks[:end]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        if cut >= 0:
            text, finish, n_tokens = text[:cut], "stop", len(body)
        elif end is not None:
            finish, n_tokens = "stop", end + 1
        else:
            finish, n_tokens = "length", len(toks)
        comp = Completion(text=text, finish_reason=finish, prompt_tokens=prompt_len, completion_tokens=n_tokens)
        if logits is not None:
            comp.logprobs = self._logprobs(logits, row, toks[:n_tokens], params.logprobs)
        return comp

    def _logprobs(self, logits, row: int, toks: list[int], k: int) -> list[dict[str, float]]:
        """Top-k log-probabilities of the raw model distribution per generated token, plus the chosen one."""
        torch = require("torch", "local")
        out = []
        for step, tok in enumerate(toks):
            lp = torch.log_softmax(logits[step][row].float(), dim=-1)
            top = torch.topk(lp, k)
            entry = {self.tokenizer.decode([t]): float(v) for t, v in zip(top.indices.tolist(), top.values.tolist())}
            entry.setdefault(self.tokenizer.decode([tok]), float(lp[tok]))
            out.append(entry)
        return out

    def with_adapter(self, path: str):
        """The adapter is loaded onto this model once and switched off for plain calls."""
        if self.config.lora_path or (self._adapter and self._adapter != path):
            return None
        if self._adapter is None:
            peft = require("peft", "train")
            self.model = peft.PeftModel.from_pretrained(self.model, path).to(self.device).eval()
            self._adapter = path
        from katdata.backends.base import AdapterView

        return AdapterView(self, path)

    @contextlib.contextmanager
    def adapter_on(self, path: str):
        self._adapter_active = True
        try:
            yield
        finally:
            self._adapter_active = False

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()


def _frequency_penalty(penalty: float, prompt_width: int):
    """OpenAI's and vLLM's ``frequency_penalty`` as a transformers logits processor: each token's logit minus
    ``penalty`` times how often it occurs in the output so far (prompt tokens, left of ``prompt_width``, do not
    count). transformers has no such processor (its ``repetition_penalty`` scales a logit once, whatever the
    count, so a "0000..." loop is damped no further as it grows)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FrequencyPenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = input_ids[:, prompt_width:]
            if out.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
            return scores - penalty * counts

    return LogitsProcessorList([FrequencyPenalty()])


def _finish_counter(rows: int, end_ids: set[int], weight: int):
    """A stopping criterion that stops nothing: it reports each of the batch's ``rows`` sequences to
    ``katdata.report.generated`` (``weight`` completions each) in the step it ends, its newest token an end
    token (EOS, a stop token, or the pad that follows a stop string), so a stage's progress bar moves
    before the whole batch is back; ``rest()`` reports the ones that ran to the token limit."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from katdata.report import generated

    class FinishCounter(StoppingCriteria):
        def __init__(self):
            self.ended = self.ids = self.never = None
            self.counted = self.steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            if self.ids is None:  # made on the device once, not copied there every step
                self.ids = torch.tensor(sorted(end_ids), device=input_ids.device)
                self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                self.never = torch.zeros_like(self.ended)
            self.ended |= torch.isin(input_ids[:, -1], self.ids)
            self.steps += 1
            if input_ids.device.type == "cpu" or self.steps % 8 == 0:  # reading the count waits for an accelerator
                self._report(int(self.ended.sum()))
            return self.never

        def rest(self):
            self._report(rows)

        def _report(self, n: int):
            if n > self.counted:
                generated((n - self.counted) * weight)
                self.counted = n

    return StoppingCriteriaList([FinishCounter()])
