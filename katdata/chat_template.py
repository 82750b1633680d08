"""The KAT chat template (kat-format.md sections 1, 1b and 3), as Jinja for tokenizers and vLLM.

One source file, ``chat_templates/kat.jinja``, holds the training variant: the final assistant
completion after the pre-filled ``<judge>\\n`` is wrapped in ``{% generation %}`` markers so that
``return_assistant_tokens_mask`` works. The inference variant is the same text with the markers
removed, so the two cannot render differently.

Besides ``messages``, ``tools`` and ``add_generation_prompt`` the template reads ``think_mode``:
``auto`` (the default, KAT's own behaviour) pre-fills ``<judge>\\n``; ``on`` / ``off`` pre-fill a
fixed neutral judge (``prompts/judge_neutral.txt``, the text the sampler forces modes with) and the
mode tag, so the model answers in that mode. A vLLM client sends it per request as
``extra_body={"chat_template_kwargs": {"think_mode": "off"}}``; transformers takes
``tokenizer.apply_chat_template(messages, think_mode="off", ...)``. The switch Qwen3-style clients
already send works as well: ``enable_thinking`` ``true`` -> ``on``, ``false`` -> ``off``, absent ->
``auto`` (``think_mode`` wins when both are given); see :func:`think_mode_of`.

Tools follow section 1b: JSON through transformers' ``tojson`` (``", "`` and ``": "``, keys in
order, non-ASCII kept); tool-call arguments given as a JSON string are inserted as they are (vLLM
parses OpenAI's argument strings into objects before it renders).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Optional

DEFAULT_SYSTEM = "You are a helpful assistant."
GENERATION_PROMPT = "<|im_start|>assistant\n<judge>\n"
THINK_MODES = ("auto", "on", "off")
NEUTRAL_JUDGE_PROMPT = "judge_neutral.txt"  # the neutral judge text kat.jinja pre-fills for on/off
_MARKER = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}\n?")


@lru_cache(maxsize=2)
def template_text(training: bool = False) -> str:
    """The Jinja chat template; ``training=True`` keeps the ``{% generation %}`` markers."""
    text = resources.files("katdata").joinpath("chat_templates/kat.jinja").read_text("utf-8")
    return text if training else _MARKER.sub("", text)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson`` (and so vLLM's): plain json.dumps, non-ASCII kept, keys in order.

    Jinja's built-in filter sorts keys, escapes ``<>&'`` and non-ASCII; the template must render
    the same bytes here as in a tokenizer, so this environment uses transformers' definition.
    """
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=1)
def _compiled():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(template_text(training=False))


def chat_template_kwargs(think_mode: str = "auto") -> dict:
    """The template variables that select a mode per request.

    Pass them as ``tokenizer.apply_chat_template(..., **chat_template_kwargs("off"))``, or to a
    vLLM OpenAI server as ``extra_body={"chat_template_kwargs": chat_template_kwargs("off")}``.
    """
    if think_mode not in THINK_MODES:
        raise ValueError(f"think_mode must be one of {', '.join(THINK_MODES)}, got {think_mode!r}")
    return {"think_mode": think_mode}


def think_mode_of(kwargs: Optional[dict]) -> str:
    """The mode that chat-template variables select, as ``kat.jinja`` reads them.

    ``think_mode`` when given (and not None); else ``enable_thinking``: ``True`` -> ``"on"``,
    ``False`` -> ``"off"``; else ``"auto"``. Raises ValueError on any other value.
    """
    kwargs = kwargs or {}
    mode = kwargs.get("think_mode")
    if mode is None:
        thinking = kwargs.get("enable_thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise ValueError(f"enable_thinking must be true or false, got {thinking!r}")
        mode = "auto" if thinking is None else ("on" if thinking else "off")
    chat_template_kwargs(mode)
    return mode


def _check_call(i: int, j: int, call) -> None:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (dict, str))):
        raise ValueError(f"message {i}: tool call {j} needs a name (string) and arguments (object or JSON "
                         f"string), directly or under 'function', got {call!r}")


def _check(messages: list[dict], tools: Optional[list], think_mode: str) -> None:
    if not messages:
        raise ValueError("a chat needs at least one message")
    chat_template_kwargs(think_mode)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"tools must be a list of JSON schema objects (dicts), got {tools!r}")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f"message {i}: tool_calls must be a list, got {calls!r}")
            for j, call in enumerate(calls):
                _check_call(i, j, call)
        content_ok = isinstance(m.get("content"), str) or (bool(calls) and m.get("content") is None)
        if role not in ("system", "user", "assistant", "tool") or not content_ok:
            raise ValueError(f"message {i}: needs role system/user/assistant/tool and string content "
                             f"(an assistant message with tool_calls may have none), got {m!r}")


def render_chat(messages: list[dict], add_generation_prompt: bool = False, prefill_judge: bool = True,
                tools: Optional[list[dict]] = None, think_mode: Optional[str] = None,
                enable_thinking: Optional[bool] = None) -> str:
    """Render a chat exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

    ``tools`` are JSON schemas (kat-format.md section 1b); ``think_mode`` is ``auto``, ``on`` or
    ``off`` (see the module docstring). With ``prefill_judge=False`` the generation prompt stops at
    ``<|im_start|>assistant\\n``: a plain chat turn, for agents (solver, critic, tagger) whose
    replies are not KAT responses; it cannot be combined with a forced ``think_mode``.
    ``enable_thinking`` is the Qwen3-style switch (``think_mode`` wins when both are given).
    """
    think_mode = think_mode_of({"think_mode": think_mode, "enable_thinking": enable_thinking})
    _check(messages, tools, think_mode)
    if add_generation_prompt and not prefill_judge and think_mode != "auto":
        raise ValueError(f"think_mode={think_mode!r} pre-fills a judge, so it needs prefill_judge=True")
    text = _compiled().render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                              think_mode=think_mode)
    if add_generation_prompt and not prefill_judge:
        text = text[: -len("<judge>\n")]
    return text
