"""Split a KAT completion into reasoning and content, whole or delta by delta (no vLLM needed).

Content is the answer alone, as vLLM's reasoning parsers hand it to clients (DeepSeek-R1's parser
drops ``</think>`` the same way): the text after the answer opener ``<answer>`` (and its newline) up
to the closing ``</answer>`` (and the newline before it), both markers excluded. Reasoning is
everything before the opener: the judge rationale, the mode tag, the think block and their markers,
so a client still learns the mode. The opener counts only where the layout allows it: after
``</judge>``, and in think-on mode after ``</think>``. Until it has arrived (a reply cut before
``<answer>``, or one that never writes it) everything is reasoning and the content is empty.

After ``</answer>``, ``<tool_call>...</tool_call>`` blocks stay in the content, right after the
answer, for a tool parser (vLLM's ``hermes`` reads the text before the first ``<tool_call>`` as the
message content); any other text there is dropped, and :attr:`Split.dropped` holds it.

A completion continues a prompt: ``prefix`` is the assistant turn as far as the prompt wrote it
(``"<judge>\\n"`` with KAT's generation prompt, more when a mode is forced by a pre-fill, ``""`` when
the prompt pre-fills nothing). ``mode`` is read from the mode tag, in the prefix or the completion.

Streaming: reasoning needs no look-ahead (every character before the opener is reasoning whether or
not a marker it may belong to completes; the split is placed once the character after ``<answer>``
has arrived). Content holds back only a tail that may still become ``\\n</answer>`` (or, after the
answer, ``<tool_call>``). The deltas join to the same strings as :func:`split` of the whole text,
which likewise leaves out such an unfinished tail of a cut-off reply.

Used by the vLLM plugin (``katdata.vllm_reasoning``) and by clients of any other server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from katdata.template import (ANSWER_CLOSE, ANSWER_OPEN, GENERATION_PREFIX, JUDGE_CLOSE, THINK_CLOSE, THINK_OFF,
                              THINK_ON)

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# phases of the layout, in order
JUDGE, MODE, THINK, ANSWER, OPENED, CONTENT = "judge", "mode", "think", "answer", "opened", "content"
AFTER, CALL = "after", "call"  # after </answer>; inside a <tool_call> block after it
# what ends each reasoning phase, and the phase it leads to
_NEXT = {
    JUDGE: ((JUDGE_CLOSE, MODE),),
    MODE: ((THINK_ON, THINK), (THINK_OFF, ANSWER), (ANSWER_OPEN, OPENED)),
    THINK: ((THINK_CLOSE, ANSWER),),
    ANSWER: ((ANSWER_OPEN, OPENED),),
}
_LONGEST = max(len(m) for pairs in _NEXT.values() for m, _ in pairs)
_ENDED = (CONTENT, AFTER, CALL)


def _held(text: str, *markers: str) -> int:
    """The length of the longest tail of ``text`` that is a proper beginning of one of ``markers``."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class Split:
    """One completion split: ``reasoning`` (judge, mode tag, think block), ``content`` (the answer)."""

    reasoning: str
    content: str
    mode: Optional[str]  # "on", "off", or None while no mode tag has been seen
    ended: bool  # the answer has opened: later text is content
    closed: bool = False  # the answer's closing </answer> has arrived
    dropped: str = ""  # text after </answer> outside <tool_call> blocks: in neither field


class StreamSplitter:
    """Feeds a completion delta by delta: ``feed(delta) -> (reasoning_part, content_part)``.

    The parts of all deltas joined give the same strings as :func:`split` of the joined text.
    """

    def __init__(self, prefix: str = GENERATION_PREFIX):
        self.text = ""  # prefix + completion so far
        self.phase = JUDGE
        self.mode: Optional[str] = None
        self.split_at: Optional[int] = None  # index in self.text where the answer starts
        self._pos = 0  # where the search for the current phase's marker starts
        self._out = 0  # index in self.text up to which content and dropped text are decided
        self._call = 0  # where the current <tool_call> block's body starts
        self.reasoning = self.content = self.dropped = ""
        self.feed(prefix)
        self.reasoning = self.content = self.dropped = ""

    @property
    def ended(self) -> bool:
        return self.phase in _ENDED

    @property
    def closed(self) -> bool:
        return self.phase in (AFTER, CALL)

    def _advance(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        while self.phase in _NEXT or self.phase == OPENED:
            if self.phase == OPENED:
                if len(self.text) <= self._pos:
                    return  # the character after <answer> decides where content starts
                self.split_at = self._pos + (self.text[self._pos] == "\n")
                self.phase, self._out = CONTENT, self.split_at
                return
            found = None
            for marker, nxt in _NEXT[self.phase]:
                at = self.text.find(marker, max(self._pos, start - _LONGEST))
                if at >= 0 and (found is None or at < found[0]):
                    found = (at, marker, nxt)
            if found is None:
                return
            at, marker, nxt = found
            if marker in (THINK_ON, THINK_OFF):
                self.mode = "on" if marker == THINK_ON else "off"
            self.phase, self._pos = nxt, at + len(marker)

    def _content(self) -> tuple[str, str]:
        """(content, dropped) decided by the text that has arrived since the last call."""
        content = dropped = ""
        text = self.text
        while True:
            if self.phase == CONTENT:
                at = text.find(ANSWER_CLOSE, self._out)
                if at < 0:
                    end = len(text) - _held(text[self._out:], "\n" + ANSWER_CLOSE, ANSWER_CLOSE)
                    content += text[self._out:end]
                    self._out = end
                    return content, dropped
                end = at - (at - 1 >= max(self._out, self.split_at) and text[at - 1] == "\n")
                content += text[self._out:end]
                self._out, self.phase = at + len(ANSWER_CLOSE), AFTER
            elif self.phase == AFTER:
                at = text.find(TOOL_OPEN, self._out)
                end = len(text) - _held(text[self._out:], TOOL_OPEN) if at < 0 else at
                dropped += text[self._out:end]
                self._out = end
                if at < 0:
                    return content, dropped
                self.phase, self._call = CALL, at + len(TOOL_OPEN)
            elif self.phase == CALL:  # emitted as it comes: the close may straddle earlier deltas
                at = text.find(TOOL_CLOSE, max(self._call, self._out - len(TOOL_CLOSE)))
                end = len(text) if at < 0 else at + len(TOOL_CLOSE)
                content += text[self._out:end]
                self._out = end
                if at < 0:
                    return content, dropped
                self.phase = AFTER
            else:
                return content, dropped

    def feed(self, delta: str) -> tuple[str, str]:
        """The reasoning part and the content part of ``delta`` (either may be empty).

        Text the content holds back arrives with a later delta; text dropped after ``</answer>``
        is in neither part (see :attr:`dropped`).
        """
        begin = len(self.text)
        self._advance(delta)
        cut = len(self.text) if self.split_at is None else min(max(self.split_at, begin), len(self.text))
        reasoning = self.text[begin:cut]
        content, dropped = self._content()
        self.reasoning += reasoning
        self.content += content
        self.dropped += dropped
        return reasoning, content

    def result(self) -> Split:
        """The split of everything fed so far (the prefix excluded)."""
        return Split(self.reasoning, self.content, self.mode, self.ended, self.closed, self.dropped)


def split(text: str, prefix: str = GENERATION_PREFIX) -> Split:
    """Split a whole completion that continues a prompt ending with ``prefix`` (see the module doc)."""
    splitter = StreamSplitter(prefix)
    splitter.feed(text)
    return splitter.result()


def answer_text(content: str) -> str:
    """The answer without a closing ``\\n</answer>`` (and what follows it), when ``content`` has one.

    :func:`split` returns the bare answer already; this is for content a server split another way
    (a server without the ``kat`` parser, or an older katdata).
    """
    at = content.find(ANSWER_CLOSE)
    if at < 0:
        return content
    return content[:at - 1] if at and content[at - 1] == "\n" else content[:at]
