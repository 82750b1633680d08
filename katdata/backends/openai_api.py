"""The OpenAI-compatible backend: any server (``vllm serve``, SGLang, TGI, a hosted API).

- async, a rolling window of at most ``config.concurrency`` requests in flight (a worker pool
  pulling from a queue, not batch-by-batch gather);
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
ids, continue_final_message), ``endpoint`` ("completions" | "chat"), ``retry_base_s``, ``retry_cap_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
from typing import Callable, Optional

from katdata.backends.base import Backend, BackendConfig, Completion, Request, SamplingParams
from katdata.errors import EngineError, KatdataError, require
from katdata.redact import scrub

log = logging.getLogger(__name__)

OnDone = Callable[[int, list[Completion]], None]
_CTX = re.compile(r"maximum context length is (\d+) tokens.*?(\d+) input tokens", re.S)


class _Fatal(Exception):
    """An error that fails the whole run (wrong key, wrong model, server unreachable)."""


class OpenAIBackend(Backend):
    """``generate`` through an OpenAI-compatible HTTP server."""

    name = "openai"

    def __init__(self, config: BackendConfig):
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

    # -- the sync entry point --------------------------------------------------------------------

    def generate(self, requests: list[Request], params: SamplingParams,
                 on_done: Optional[OnDone] = None) -> list[list[Completion]]:
        """``params.n`` completions per request; ``on_done(i, completions)`` as each one finishes."""
        coro = self.agenerate(requests, params, on_done)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        box: dict = {}  # called from inside an event loop (a notebook): run in a thread

        def target():
            try:
                box["out"] = asyncio.run(coro)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["err"] = exc

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    async def agenerate(self, requests: list[Request], params: SamplingParams,
                        on_done: Optional[OnDone] = None) -> list[list[Completion]]:
        openai = require("openai", "openai")
        # several servers: the workers of the rolling window are spread over them round-robin
        clients = [openai.AsyncOpenAI(base_url=url, api_key=self._key or "none", max_retries=0,
                                      timeout=self.config.timeout_s) for url in self.base_urls]
        results: list[Optional[list[Completion]]] = [None] * len(requests)
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(len(requests)):
            queue.put_nowait(i)

        async def worker(client):
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await self._one(client, requests[i], params)
                if on_done:
                    on_done(i, results[i])

        width = max(1, min(self.config.concurrency, len(requests)))
        workers = [asyncio.create_task(worker(clients[k % len(clients)])) for k in range(width)]
        try:
            await asyncio.gather(*workers)
        except _Fatal as exc:
            raise EngineError(self.scrub(str(exc))) from None
        finally:
            for w in workers:
                w.cancel()
            for client in clients:
                await client.close()
        return results  # type: ignore[return-value]

    # -- one request -----------------------------------------------------------------------------

    async def _one(self, client, request: Request, params: SamplingParams) -> list[Completion]:
        comps: list[Completion] = []
        max_tokens, rounds = params.max_tokens, 0
        total = 1 if params.temperature == 0 else params.n  # greedy: decode once, copy (vLLM refuses n>1)
        while len(comps) < total:
            want = total - len(comps)
            seed = None if params.seed is None else params.seed + len(comps)
            try:
                got = await self._call(client, request, params, want, seed, max_tokens)
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

    async def _call(self, client, request: Request, params: SamplingParams, n: int, seed, max_tokens: int):
        openai = require("openai", "openai")
        for attempt in range(self.config.max_retries + 1):
            self.attempts += 1
            try:
                return await self._post(client, request, params, n, seed, max_tokens)
            except openai.AuthenticationError as exc:
                raise _Fatal(f"server {self.base_url} rejected the API key (from env var "
                             f"{self.config.api_key_env}): {self.scrub(str(exc))}") from None
            except openai.PermissionDeniedError as exc:
                raise _Fatal(f"server {self.base_url} denied access: {self.scrub(str(exc))}") from None
            except openai.NotFoundError as exc:
                raise _Fatal(f"server {self.base_url}: model '{self.model_id}' or endpoint "
                             f"'{self.endpoint}' not found: {self.scrub(str(exc))}") from None
            except openai.BadRequestError as exc:
                msg = self.scrub(str(exc))
                m = _CTX.search(msg)
                if m or "context length" in msg or "too long" in msg:
                    limit, used = (int(m.group(1)), int(m.group(2))) if m else (None, 0)
                    raise _ContextError(msg, limit - used if limit else None, used) from None
                raise _BadRequest(f"server {self.base_url} refused the request: {msg}") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as exc:
                if attempt == self.config.max_retries:
                    what = "unreachable" if isinstance(exc, openai.APIConnectionError) else "failing"
                    raise _Fatal(f"server {self.base_url} is {what} after {attempt + 1} tries: "
                                 f"{type(exc).__name__}: {self.scrub(str(exc))}") from None
                delay = random.uniform(0, min(self.retry_cap, self.retry_base * 2 ** attempt))
                log.warning("server %s: %s; retry %d in %.1f s", self.base_url, type(exc).__name__, attempt + 1, delay)
                await asyncio.sleep(delay)
            except openai.APIStatusError as exc:  # other 4xx
                raise _Fatal(f"server {self.base_url} answered {exc.status_code}: {self.scrub(str(exc))}") from None
        raise AssertionError("unreachable")

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
        finish = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
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

