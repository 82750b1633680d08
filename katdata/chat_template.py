"""The KAT chat template (kat-format.md sections 1 and 3), as Jinja for tokenizers and vLLM.

One source file, ``chat_templates/kat.jinja``, holds the training variant: the final assistant
completion after the pre-filled ``<judge>\\n`` is wrapped in ``{% generation %}`` markers so that
``return_assistant_tokens_mask`` works. The inference variant is the same text with the markers
removed, so the two cannot render differently.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

DEFAULT_SYSTEM = "You are a helpful assistant."
GENERATION_PROMPT = "<|im_start|>assistant\n<judge>\n"
_MARKER = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}\n?")


@lru_cache(maxsize=2)
def template_text(training: bool = False) -> str:
    """The Jinja chat template; ``training=True`` keeps the ``{% generation %}`` markers."""
    text = resources.files("katdata").joinpath("chat_templates/kat.jinja").read_text("utf-8")
    return text if training else _MARKER.sub("", text)


@lru_cache(maxsize=1)
def _compiled():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template_text(training=False))


def render_chat(messages: list[dict], add_generation_prompt: bool = False, prefill_judge: bool = True) -> str:
    """Render a chat exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

    With ``prefill_judge=False`` the generation prompt stops at ``<|im_start|>assistant\\n``: a plain
    chat turn, for agents (solver, critic, tagger) whose replies are not KAT responses.
    """
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: needs role system/user/assistant and string content, got {m!r}")
    text = _compiled().render(messages=messages, add_generation_prompt=add_generation_prompt)
    if add_generation_prompt and not prefill_judge:
        text = text[: -len("<judge>\n")]
    return text
