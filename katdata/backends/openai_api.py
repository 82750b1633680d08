"""The OpenAI-compatible backend: any server (``vllm serve``, SGLang, TGI, a hosted API).

- ``stream``: a rolling window of ``config.concurrency`` requests in flight, refilled from the
  stage's source as each one finishes (an event loop in a thread; no batch-by-batch gather);
- several base URLs (comma-separated): each request goes to the healthy server with the fewest in
  flight; a server that refuses connections or times out leaves the rotation, its requests move to
  the others, and it rejoins once ``/health`` (or ``/v1/models``) answers; the run fails only when
  no server has answered for ``extra["unavailable_s"]`` (default 300);
- retries with exponential backoff and full jitter on 429, 5xx, timeouts and dropped connections;
- ``n`` in one request (if a server returns fewer choices, the rest are asked for again); greedy
  ``n>1`` asks once and copies (vLLM refuses greedy n>1);
- the assistant prefix: with ``chat_template="kat"`` the prompt is rendered here and sent to the raw
  completions endpoint; with ``"model"`` it goes to the chat endpoint as a final assistant message
  with vLLM's ``continue_final_message``;
- base URL from the config or ``OPENAI_BASE_URL``; the key from the env var ``config.api_key_env``.
  The key (and a password inside a base URL) never appears in logs, errors, reprs or files: every
  message is scrubbed of them with :func:`katdata.redact.scrub`.

``config.extra``: ``server`` ("vllm" sends vLLM's extra fields: per-choice token ids, stop token
ids, continue_final_message), ``endpoint`` ("completions" | "chat"), ``retry_base_s``, ``retry_cap_s``,
``unavailable_s``, ``health_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import re
import threading
from typing import Callable, Iterable, Iterator, Optional

from katdata.backends.base import WAIT, Backend, EngineConfig, Completion, Job, Request, SamplingParams, SourceItem
from katdata.backends.pool import Fatal as _Fatal, Occupancy, ServerPool
from katdata.errors import EngineError, KatdataError, require
from katdata.redact import scrub

log = logging.getLogger(__name__)

OnDone = Callable[[int, list[Completion]], None]
_CTX = re.compile(r"maximum context length is (\d+) tokens.*?(\d+) input tokens", re.S)


class OpenAIBackend(Backend):
    """``generate`` through an OpenAI-compatible HTTP server."""

    name = "openai"

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        require("openai", "openai")
        urls = config.base_url or os.environ.get("OPENAI_BASE_URL") or ""
        self.base_urls = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
        if not self.base_urls:
            raise KatdataError("openai backend: no base URL (set base_url in the recipe or OPENAI_BASE_URL)")
        self._key = os.environ.get(config.api_key_env) or ""
        self._secrets = [self._key] + [_url_password(u) for u in self.base_urls]
        self.base_url = self.scrub(",".join(self.base_urls))  # for messages: no password a URL may carry
        if not self._key:
            log.info("openai backend: env var %s is empty; sending no key", config.api_key_env)
        self.model_id = config.model or "embedded"
        self.server = config.extra.get("server", "openai")
        self.endpoint = config.extra.get("endpoint") or ("chat" if config.chat_template == "model" else "completions")
        self.retry_base = float(config.extra.get("retry_base_s", 0.5))
        self.retry_cap = float(config.extra.get("retry_cap_s", 20.0))
        self.attempts = 0  # HTTP calls made (retries included), for tests and stats
        self.occupancy = Occupancy()  # requests in flight over the window while work remains (bench)

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model_id!r}, key_env={self.config.api_key_env!r})"

    def scrub(self, text: str) -> str:
        """``text`` with the API key (and any base-URL password) masked."""
        return scrub(text, self._secrets)

    def render_prompt(self, request: Request) -> str:
        """The prompt text sent (completions endpoint), or a stable rendering of the chat (chat)."""
        if self.endpoint == "chat":
            import json

            return json.dumps({"messages": request.messages, "prefix": request.prefix}, sort_keys=True)
        return request.prompt()

    # -- the sync entry points ---------------------------------------------------------------------

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done: Optional[OnDone] = None) -> list[list[Completion]]:
        """``params.n`` completions per request; ``on_done(i, completions)`` as each one finishes."""
        results: list[Optional[list[Completion]]] = [None] * len(requests)
        for job, comps in self.stream(Job(i, r, params) for i, r in enumerate(requests)):
            results[job.key] = comps
            if on_done:
                on_done(job.key, comps)
        return results  # type: ignore[return-value]

    def stream(self, source: Iterable[SourceItem], wave_limit: int = 0) -> Iterator[tuple[Job, list[Completion]]]:
        """A rolling window of ``config.concurrency`` requests, refilled from ``source`` as each one
        finishes, from the first request to the last; completions come back in finishing order."""
        it = iter(source)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="katdata-openai", daemon=True)
        thread.start()
        done: queue.Queue = queue.Queue()
        pool = asyncio.run_coroutine_threadsafe(self._open_pool(), loop).result()
        window = max(1, self.config.concurrency)
        self.occupancy.reset(window)
        in_flight, exhausted, held = 0, False, None
        try:
            while True:  # fill the window before the stage looks at the last result
                while not exhausted and in_flight < window:
                    item = next(it, StopIteration)
                    if item is StopIteration:
                        exhausted = True
                        self.occupancy.more = False
                    elif item is WAIT:
                        break
                    elif isinstance(item, tuple):  # already answered (the request cache)
                        yield item
                    else:
                        asyncio.run_coroutine_threadsafe(self._job(pool, item, done), loop)
                        in_flight += 1
                if held is not None:  # the window is full again: now the stage gets the result
                    out, held = held, None
                    yield out
                    continue  # and what it queued goes out before we wait again
                if in_flight == 0:
                    if exhausted:
                        return
                    raise RuntimeError("stream source waits with nothing in flight")
                job, comps, err = done.get()
                in_flight -= 1
                if err is not None:
                    raise EngineError(self.scrub(err))
                held = (job, comps)
        finally:
            asyncio.run_coroutine_threadsafe(_shutdown(pool), loop).result(timeout=60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()

    async def _open_pool(self) -> "ServerPool":
        openai = require("openai", "openai")
        clients = [openai.AsyncOpenAI(base_url=url, api_key=self._key or "none", max_retries=0,
                                      timeout=self.config.timeout_s) for url in self.base_urls]
        names = [self.scrub(u) for u in self.base_urls]
        return ServerPool(clients, names, float(self.config.extra.get("unavailable_s", 300.0)),
                          float(self.config.extra.get("health_interval_s", 2.0)))

    async def _job(self, pool: "ServerPool", job: Job, done: queue.Queue) -> None:
        self.occupancy.change(+1)
        try:
            out = (job, await self._one(pool, job.request, job.params), None)
        except _Fatal as exc:
            out = (job, None, str(exc))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer thread, which raises it
            out = (job, None, f"{type(exc).__name__}: {exc}")
        self.occupancy.change(-1)
        done.put(out)

    # -- one request -----------------------------------------------------------------------------

    async def _one(self, pool: "ServerPool", request: Request, params: SamplingParams) -> list[Completion]:
        comps: list[Completion] = []
        max_tokens, rounds = params.max_tokens, 0
        total = 1 if params.temperature == 0 else params.n  # greedy: decode once, copy (vLLM refuses n>1)
        while len(comps) < total:
            want = total - len(comps)
            seed = None if params.seed is None else params.seed + len(comps)
            try:
                got = await self._call(pool, request, params, want, seed, max_tokens)
            except _ContextError as exc:
                if exc.room is not None and exc.room > 0 and max_tokens > exc.room:
                    max_tokens = exc.room  # the prompt fits, the token budget does not: shrink it
                    continue
                return [Completion("", "error", exc.prompt_tokens, 0, error=str(exc)) for _ in range(params.n)]
            except _BadRequest as exc:
                return [Completion("", "error", 0, 0, error=str(exc)) for _ in range(params.n)]
            comps.extend(got[:want])
            rounds += 1
            if rounds > params.n:
                raise _Fatal(f"server {self.base_url} keeps returning no choices")
        if total < params.n:
            comps = [Completion(**vars(comps[0])) for _ in range(params.n)]
        return comps

    async def _call(self, pool: "ServerPool", request: Request, params: SamplingParams, n: int, seed, max_tokens: int):
        """One HTTP call, retried; a server that stops answering leaves the rotation and the call
        moves to another one (see :class:`ServerPool`)."""
        openai = require("openai", "openai")
        attempt = 0
        while True:
            server = await pool.acquire()
            name = server.name
            self.attempts += 1
            try:
                out = await self._post(server.client, request, params, n, seed, max_tokens)
                pool.answered(server)
                return out
            except openai.AuthenticationError as exc:
                raise _Fatal(f"server {name} rejected the API key (from env var "
                             f"{self.config.api_key_env}): {self.scrub(str(exc))}") from None
            except openai.PermissionDeniedError as exc:
                raise _Fatal(f"server {name} denied access: {self.scrub(str(exc))}") from None
            except openai.NotFoundError as exc:
                raise _Fatal(f"server {name}: model '{self.model_id}' or endpoint "
                             f"'{self.endpoint}' not found: {self.scrub(str(exc))}") from None
            except openai.BadRequestError as exc:
                msg = self.scrub(str(exc))
                m = _CTX.search(msg)
                if m or "context length" in msg or "too long" in msg:
                    limit, used = (int(m.group(1)), int(m.group(2))) if m else (None, 0)
                    raise _ContextError(msg, limit - used if limit else None, used) from None
                raise _BadRequest(f"server {name} refused the request: {msg}") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                why = f"{type(exc).__name__}: {self.scrub(str(exc))}"
                if pool.others_up(server):  # another server can take it now: no backoff here
                    pool.down(server, why)
                    continue
                if attempt >= self.config.max_retries:
                    what = "unreachable" if not isinstance(exc, openai.APITimeoutError) else "failing"
                    pool.down(server, why)
                    if not pool.ever_answered:
                        raise _Fatal(f"server {name} is {what} after {attempt + 1} tries: {why}") from None
                    attempt = 0
                    continue  # acquire() waits for a server to come back (or gives up, naming them)
                await self._backoff(name, exc, attempt)
                attempt += 1
            except (openai.RateLimitError, openai.InternalServerError) as exc:
                if isinstance(exc, openai.RateLimitError):
                    pool.answered(server)  # alive, only busy
                if attempt >= self.config.max_retries:
                    if pool.others_up(server):  # a failing engine behind a live server: use the others
                        pool.down(server, f"{type(exc).__name__} after {attempt + 1} tries")
                        attempt = 0
                        continue
                    raise _Fatal(f"server {name} is failing after {attempt + 1} tries: "
                                 f"{type(exc).__name__}: {self.scrub(str(exc))}") from None
                await self._backoff(name, exc, attempt)
                attempt += 1
            except openai.APIStatusError as exc:  # other 4xx
                raise _Fatal(f"server {name} answered {exc.status_code}: {self.scrub(str(exc))}") from None
            finally:
                pool.release(server)

    async def _backoff(self, name: str, exc: Exception, attempt: int) -> None:
        delay = random.uniform(0, min(self.retry_cap, self.retry_base * 2 ** attempt))
        log.warning("server %s: %s; retry %d in %.1f s", name, type(exc).__name__, attempt + 1, delay)
        await asyncio.sleep(delay)

    async def _post(self, client, request: Request, params: SamplingParams, n: int, seed, max_tokens: int):
        extra: dict = {}
        stop = list(params.stop) or None
        kw = dict(model=self.model_id, n=n, temperature=params.temperature, max_tokens=max_tokens, stop=stop)
        if params.temperature > 0:
            kw["top_p"] = params.top_p
        if seed is not None:
            kw["seed"] = seed
        if params.repetition_penalty != 1.0:  # not in the OpenAI API; vLLM and most local servers read it
            extra["repetition_penalty"] = params.repetition_penalty
        if params.frequency_penalty:  # in the OpenAI API
            kw["frequency_penalty"] = params.frequency_penalty
        if self.server == "vllm":
            extra["return_token_ids"] = True
        if self.endpoint == "chat":
            messages = list(request.messages)
            if request.prefix:
                messages.append({"role": "assistant", "content": request.prefix})
                if self.server == "vllm":
                    extra.update(continue_final_message=True, add_generation_prompt=False)
            if params.logprobs:
                kw.update(logprobs=True, top_logprobs=params.logprobs)
            resp = await client.chat.completions.create(messages=messages, extra_body=extra or None, **kw)
            texts = [(c.message.content or "", c) for c in resp.choices]
        else:
            if params.logprobs:
                kw["logprobs"] = params.logprobs
            resp = await client.completions.create(prompt=request.prompt(), extra_body=extra or None, **kw)
            texts = [(c.text, c) for c in resp.choices]
        usage = resp.usage
        out = []
        for text, choice in sorted(texts, key=lambda tc: tc[1].index):
            out.append(self._completion(text, choice, usage, len(texts), params))
        return out

    def _completion(self, text: str, choice, usage, n_choices: int, params: SamplingParams) -> Completion:
        finish = choice.finish_reason or "stop"  # abort, content_filter, tool_calls are kept as they are
        tokens = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        logprobs = None
        lp = choice.logprobs
        if lp is not None and params.logprobs:
            if hasattr(lp, "top_logprobs") and lp.top_logprobs is not None:  # completions endpoint
                logprobs = [dict(step or {}) for step in lp.top_logprobs]
            elif getattr(lp, "content", None):  # chat endpoint
                logprobs = [{t.token: t.logprob for t in step.top_logprobs} for step in lp.content]
        if tokens is not None:
            n_tokens = len(tokens)
        elif logprobs is not None:
            n_tokens = len(logprobs)
        else:  # only the request's total is known: share it out (exact when n == 1)
            n_tokens = round((usage.completion_tokens if usage else 0) / max(1, n_choices))
        return Completion(text=text, finish_reason=finish, prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=n_tokens, logprobs=logprobs)


async def _shutdown(pool: ServerPool) -> None:
    """Cancel what is still in flight (a failed run), then close the clients."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await pool.close()


def _url_password(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


class _BadRequest(Exception):
    pass


class _ContextError(_BadRequest):
    def __init__(self, msg: str, room: Optional[int], prompt_tokens: int):
        super().__init__(f"prompt is longer than the context: {msg}")
        self.room, self.prompt_tokens = room, prompt_tokens

