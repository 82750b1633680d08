"""The one interface every engine implements.

A request is a chat plus an optional assistant prefix that the model continues: ``"<judge>\\n"``
pre-fills the KAT judge; ``"<judge>\\n...</judge>\\n\\n<think_on>\\n<think>\\n"`` forces a mode.
``generate`` returns, per request, ``params.n`` completions of the same shape on every backend.

``stream`` is the stages' entry point: it takes a stage's pending work as it comes and yields each
request's completions as they finish, so an engine never waits for the slowest request of a chunk.
The source is an iterator of :class:`Job` (a request, its params and the stage's key) that may also
yield ``WAIT`` ("nothing now: give me results first", only while some job is in flight) and
``(job, completions)`` pairs already answered (the request cache), which come back out at once.
The base class serves it in waves (everything the source gives before it waits, grouped by params,
one ``generate`` call per group): a synchronous engine batches within a wave, and the waves depend
only on the source, never on timing, so a resumed run re-forms the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from katdata.chat_template import render_chat


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    prefix: Optional[str] = None  # assistant text to continue; None = a plain new assistant turn

    def prompt(self) -> str:
        """The prompt text under the KAT chat template (ChatML), prefix appended."""
        return render_chat(self.messages, add_generation_prompt=True, prefill_judge=False) + (self.prefix or "")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: Optional[int] = 0
    logprobs: Optional[int] = None  # top-k logprobs per generated token, where the engine has them
    repetition_penalty: float = 1.0  # > 1 damps tokens already in the prompt or the output (1 = off)

    def with_(self, **kw) -> "SamplingParams":
        return replace(self, **kw)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[list[dict[str, float]]] = None  # per token: {token: logprob} of the top-k
    error: Optional[str] = None  # why the request failed (finish_reason == "error")


@dataclass
class BackendConfig:
    """What a recipe says about an engine; each backend reads the fields it needs."""

    model: Optional[str] = None  # None / "embedded" = the embedded SmolLM2
    revision: Optional[str] = None
    dtype: str = "auto"
    chat_template: str = "kat"  # "kat" (ChatML, katdata's template) or "model" (the tokenizer's own)
    batch_size: int = 32
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: Optional[float] = None
    enforce_eager: Optional[bool] = None
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 600.0
    max_retries: int = 6
    lora_path: Optional[str] = None
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        """Secret-named entries (``extra``'s included) and a password in ``base_url`` are masked."""
        from dataclasses import fields
        from urllib.parse import urlsplit

        from katdata.redact import redact, scrub

        shown = redact({f.name: getattr(self, f.name) for f in fields(self)})
        text = "BackendConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
        for url in (self.base_url or "").split(","):
            try:
                text = scrub(text, [urlsplit(url.strip()).password or ""])
            except ValueError:
                pass
        return text


@dataclass(frozen=True)
class Job:
    """One request of a stage's stream: ``key`` is the stage's own handle on it (returned as is)."""

    key: Any
    request: Request
    params: SamplingParams


WAIT = None  # what a stream source yields when it has nothing until some result comes back
Answered = tuple  # (Job, list[Completion]): a source item that is already answered
SourceItem = Union[Job, None, tuple]


class Backend:
    """Base class: subclasses implement ``generate`` and set ``name`` and ``model_id``."""

    name = "base"

    def __init__(self, config: BackendConfig):
        self.config = config
        self.model_id = config.model or "embedded"

    def render_prompt(self, request: Request) -> str:
        """The exact prompt text the engine is fed (the request cache keys on it)."""
        return request.prompt()

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done: Optional[Callable[[int, list[Completion]], None]] = None) -> list[list[Completion]]:
        """``params.n`` completions per request; ``on_done(i, completions)`` as each request finishes."""
        raise NotImplementedError

    def stream(self, source: Iterable[SourceItem], wave_limit: int = 4096) -> Iterator[tuple[Job, list[Completion]]]:
        """Yield ``(job, completions)`` for every job ``source`` gives, as they finish (see the module doc).

        This default works in waves of at most ``wave_limit`` jobs through ``generate``."""
        it = iter(source)
        exhausted = False
        while not exhausted:
            wave: list[Job] = []
            while len(wave) < wave_limit:
                item = next(it, StopIteration)
                if item is StopIteration:
                    exhausted = True
                    break
                if item is WAIT:
                    if not wave:
                        raise RuntimeError("stream source waits with nothing in flight")
                    break
                if isinstance(item, tuple):
                    yield item
                    continue
                wave.append(item)
            groups: dict[SamplingParams, list[Job]] = {}
            for job in wave:
                groups.setdefault(job.params, []).append(job)
            for params, jobs in groups.items():
                outs = self.generate([j.request for j in jobs], params)
                yield from zip(jobs, outs)

    def close(self) -> None:
        """Free the engine (processes, GPU memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
