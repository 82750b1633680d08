"""The one interface every engine implements.

A request is a chat plus an optional assistant prefix that the model continues: ``"<judge>\\n"``
pre-fills the KAT judge; ``"<judge>\\n...</judge>\\n\\n<think_on>\\n<think>\\n"`` forces a mode.
``generate`` returns, per request, ``params.n`` completions of the same shape on every backend.

``stream`` is the stages' entry point: it takes a stage's pending work as it comes and yields each
request's completions as they finish, so an engine never waits for the slowest request of a chunk.
The source is an iterator of :class:`Job` (a request, its params and the stage's key) that may also
yield ``WAIT`` ("nothing now: give me results first", only while some job is in flight) and
``(job, completions)`` pairs already answered (rows of a resumed run, the request cache), which come
back out unchanged. The base class serves it in waves (everything the source gives before it waits,
one ``generate`` call per params, results in the order taken): a synchronous engine batches within
a wave, and the waves depend only on the source, never on timing, so a resumed run re-forms the
very batches of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from katdata.backends.config import EngineConfig
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
    frequency_penalty: float = 0.0  # OpenAI's: each token's logit minus this times its count in the output (0 = off)

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

    def __init__(self, config: EngineConfig):
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
                wave.append(item)
            jobs = [item for item in wave if not isinstance(item, tuple)]
            outs = iter(self.generate_wave(jobs) if jobs else [])
            for item in wave:  # in the order taken, answered ones included: waves never depend on timing
                yield item if isinstance(item, tuple) else (item, next(outs))

    def generate_wave(self, jobs: list[Job]) -> list[list[Completion]]:
        """Completions for ``jobs`` (any mix of params): one ``generate`` call per params."""
        out: list[Optional[list[Completion]]] = [None] * len(jobs)
        groups: dict[SamplingParams, list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault(job.params, []).append(k)
        for params, ks in groups.items():
            for k, comps in zip(ks, self.generate([jobs[k].request for k in ks], params)):
                out[k] = comps
        return out  # type: ignore[return-value]

    def with_adapter(self, path: str) -> Optional["Backend"]:
        """A backend that generates through this very engine with the LoRA adapter at ``path`` on
        (one copy of the weights in memory), or None when this engine cannot do that."""
        return None

    def close(self) -> None:
        """Free the engine (processes, GPU memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AdapterView(Backend):
    """``parent`` with a LoRA adapter switched on for its own calls (``parent.adapter_on(path)``)."""

    def __init__(self, parent: Backend, path: str):
        super().__init__(parent.config.model_copy(update={"lora_path": path}))
        self.parent, self.path = parent, path
        self.name, self.model_id = parent.name, parent.model_id

    def render_prompt(self, request: Request) -> str:
        return self.parent.render_prompt(request)

    def generate(self, requests, params, on_done=None):
        with self.parent.adapter_on(self.path):
            return self.parent.generate(requests, params, on_done)

    def __getattr__(self, name: str):  # the engine's own attributes (model, tokenizer, ...)
        if name == "parent":
            raise AttributeError(name)
        return getattr(self.parent, name)

    def close(self) -> None:
        """The engine belongs to ``parent``: nothing to free here."""
