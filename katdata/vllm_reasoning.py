"""The ``kat`` reasoning parser for vLLM's OpenAI server (imported only inside vLLM processes).

Load it either way vLLM supports:

- installed with katdata: the ``vllm.general_plugins`` entry point ``katdata.vllm_reasoning:register``
  registers it in every vLLM process; start the server with ``--reasoning-parser kat``;
- as a file: ``--reasoning-parser-plugin PATH/katdata/vllm_reasoning.py --reasoning-parser kat``
  (katdata must be importable there; the module registers the parser when it is imported).

What goes where (``katdata.reasoning``): the judge rationale, the mode tag and the think block are
``reasoning`` (the mode stays readable there: ``<think_on>`` / ``<think_off>``), and ``content`` is
the answer alone, without ``<answer>`` / ``</answer>``, whole and streamed (a streamed tail that may
still become ``</answer>`` is held back). A ``<tool_call>`` block after ``</answer>`` stays in the
content for the tool parser (``--enable-auto-tool-choice --tool-call-parser hermes``); any other
text after ``</answer>`` is dropped, and this module's logger counts it. A reply cut off before
``<answer>`` has empty content. Requests without tools also stop at the answer's closing
``\\n</answer>`` (added to ``stop``), so such text is not even generated; ``stop_reason`` then shows
that string.

Streamed, the reasoning phase lasts until a ``<tool_call>`` block starts (then vLLM's tool parser
takes the rest) or to the end: vLLM passes text after the reasoning phase to the client unfiltered,
so ending it at ``<answer>`` would let ``</answer>`` through.

The split is found on decoded text: KAT's markers are plain multi-token text, not special tokens.
Where the completion starts is read from the prompt (streaming: its token ids) or from the request
(a continued final assistant message, or the ``think_mode`` / ``enable_thinking`` chat-template variable).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Optional

from vllm.reasoning import ReasoningParser, ReasoningParserManager

try:
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
except ImportError:  # older vLLM
    from vllm.entrypoints.openai.protocol import DeltaMessage

from katdata.chat_template import think_mode_of
from katdata.reasoning import CALL, StreamSplitter, split
from katdata.template import ANSWER_CLOSE, ANSWER_OPEN, FORCE_PREFIX, GENERATION_PREFIX, JUDGE_CLOSE

NAME = "kat"
ANSWER_STOP = "\n" + ANSWER_CLOSE
TURN_START = "<|im_start|>"
_WINDOW = 12  # tokens before a step that can hold the rest of a split answer opener
logger = logging.getLogger(__name__)
DROPPED = {"replies": 0, "chars": 0}  # text after </answer> that was not a tool call, since start


def _count_dropped(text: str, first: bool) -> None:
    """Count text dropped after ``</answer>`` (non-space characters: whitespace between blocks is layout).

    Logged once per reply (streamed replies: when the first such text arrives), counted throughout.
    """
    chars = sum(not c.isspace() for c in text)
    if not chars:
        return
    DROPPED["chars"] += chars
    DROPPED["replies"] += first
    (logger.warning if first else logger.debug)(
        "kat parser: dropped text after </answer> that is not a tool call (%d non-space characters in "
        "%d replies since start)", DROPPED["chars"], DROPPED["replies"])


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class KatReasoningParser(ReasoningParser):
    """Reasoning = judge, mode tag, think block; content = the answer (see the module doc)."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self._template_kwargs = kwargs.get("chat_template_kwargs") or {}
        self._prefix: Optional[str] = None
        self._stream: Optional[StreamSplitter] = None
        self._last_content = ""

    # ------------------------------------------------------------ where the completion starts
    def _decode(self, ids: Sequence[int]) -> str:
        return self.model_tokenizer.decode(list(ids), skip_special_tokens=False)

    def _turn_text(self, ids: Sequence[int]) -> Optional[str]:
        """The text of the last chat turn in ``ids`` after its role line, or None without a turn start."""
        start = self.vocab.get(TURN_START)
        if start is None:
            return None
        ids = list(ids)
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == start:
                turn = self._decode(ids[i + 1:])
                return turn.split("\n", 1)[1] if "\n" in turn else ""
        return None

    def _request_prefix(self, request) -> str:
        """The assistant turn as the prompt of ``request`` wrote it (KAT's chat template)."""
        messages = getattr(request, "messages", None) or []
        if getattr(request, "continue_final_message", False) and messages:
            last = messages[-1]
            role = last.get("role") if isinstance(last, dict) else getattr(last, "role", None)
            if role == "assistant":
                return _text(last.get("content") if isinstance(last, dict) else getattr(last, "content", ""))
        if not getattr(request, "add_generation_prompt", True):
            return ""
        kwargs = {**self._template_kwargs, **(getattr(request, "chat_template_kwargs", None) or {})}
        try:
            mode = think_mode_of(kwargs)  # think_mode, or enable_thinking true/false
        except ValueError:
            mode = "auto"  # the template refuses such a request before anything is generated
        if mode in FORCE_PREFIX:
            return f"{GENERATION_PREFIX}.\n{JUDGE_CLOSE}\n\n{FORCE_PREFIX[mode]}"
        return GENERATION_PREFIX

    # ------------------------------------------------------------ whole responses
    def extract_reasoning(self, model_output: str, request) -> tuple[Optional[str], Optional[str]]:
        self._prefix = self._request_prefix(request)
        parts = split(model_output, self._prefix)
        _count_dropped(parts.dropped, True)
        return parts.reasoning or None, parts.content or None

    def adjust_request(self, request):
        if getattr(request, "tools", None) or not hasattr(request, "stop"):
            return request  # a tool call may follow the answer: do not stop there
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if ANSWER_STOP not in stops:
            request.stop = stops + [ANSWER_STOP]
        return request

    # ------------------------------------------------------------ streaming
    def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        tail = self._turn_text(prompt_token_ids)
        self._prefix = GENERATION_PREFIX if tail is None else tail
        self._stream = StreamSplitter(self._prefix)

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids):
        if self._stream is None:
            self._stream = StreamSplitter(self._prefix if self._prefix is not None else GENERATION_PREFIX)
        before = self._stream.dropped
        reasoning, content = self._stream.feed(delta_text)
        _count_dropped(self._stream.dropped[len(before):], not before.strip())
        self._last_content = content
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)

    # ------------------------------------------------------------ token ids (prompt, structured outputs)
    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        turn = self._turn_text(input_ids)
        if turn is not None:
            return StreamSplitter(turn).ended
        prefix = self._prefix if self._prefix is not None else GENERATION_PREFIX
        return split(self._decode(input_ids), prefix).ended

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        if self._stream is not None:  # the server's streaming parser: see the module doc
            return self._stream.phase == CALL
        delta = list(delta_ids)
        window = self._decode(list(input_ids)[-(len(delta) + _WINDOW):])
        if ANSWER_OPEN not in window:  # the opener cannot have completed in this step
            return False
        return self.is_reasoning_end(input_ids)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        if self._stream is not None:
            target = self._last_content
        else:
            prefix = self._prefix if self._prefix is not None else GENERATION_PREFIX
            target = split(self._decode(input_ids), prefix).content
        if not target:
            return []
        for i in range(len(input_ids)):
            if self._decode(input_ids[i:]) == target:
                return list(input_ids[i:])
        return list(input_ids[-1:])

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        ids = list(token_ids)
        prefix = self._prefix if self._prefix is not None else GENERATION_PREFIX
        parts = split(self._decode(ids), prefix)
        if not parts.ended:
            return len(ids)
        lo, hi = 0, len(ids)  # the fewest tokens whose text covers the reasoning
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[:mid])) >= len(parts.reasoning):
                hi = mid
            else:
                lo = mid + 1
        return lo


def register() -> None:
    """The ``vllm.general_plugins`` entry point: makes ``--reasoning-parser kat`` available."""
    if NAME not in ReasoningParserManager.reasoning_parsers:
        ReasoningParserManager.register_module(NAME, module=KatReasoningParser)


register()  # also when vLLM loads this file with --reasoning-parser-plugin
