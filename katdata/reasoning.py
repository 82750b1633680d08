"""Split a KAT completion into reasoning and content, whole or delta by delta (no vLLM needed).

The split point is just after the answer opener ``<answer>`` (and its newline): everything before it
(the judge rationale, the mode tag, the think block and the markers) is *reasoning*, everything
after it is *content*, so ``reasoning + content`` is the text exactly. The opener counts only where
the layout allows it: after ``</judge>``, and in think-on mode after ``</think>``. Until the opener
has arrived (a truncated response, or one that never writes it) everything is reasoning.

A completion continues a prompt: ``prefix`` is the assistant turn as far as the prompt wrote it
(``"<judge>\\n"`` with KAT's generation prompt, more when a mode is forced by a pre-fill, ``""`` when
the prompt pre-fills nothing). ``mode`` is read from the mode tag, in the prefix or the completion.

Streaming needs no look-ahead: every character before the split is reasoning whether or not a
marker it may belong to completes, and the split is only placed once the character after
``<answer>`` has arrived (a newline there still belongs to the opener). So a marker split across
deltas, or a ``>`` fused with its newline into one token, needs nothing special, and the deltas
join to the same two strings as :func:`split` of the whole text.

Used by the vLLM plugin (``katdata.vllm_reasoning``) and by clients of any other server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from katdata.template import (ANSWER_CLOSE, ANSWER_OPEN, GENERATION_PREFIX, JUDGE_CLOSE, THINK_CLOSE, THINK_OFF,
                              THINK_ON)

# phases of the layout, in order
JUDGE, MODE, THINK, ANSWER, OPENED, CONTENT = "judge", "mode", "think", "answer", "opened", "content"
# what ends each phase, and the phase it leads to
_NEXT = {
    JUDGE: ((JUDGE_CLOSE, MODE),),
    MODE: ((THINK_ON, THINK), (THINK_OFF, ANSWER), (ANSWER_OPEN, OPENED)),
    THINK: ((THINK_CLOSE, ANSWER),),
    ANSWER: ((ANSWER_OPEN, OPENED),),
}
_LONGEST = max(len(m) for pairs in _NEXT.values() for m, _ in pairs)


@dataclass
class Split:
    """One completion split: ``reasoning + content`` is the completion text exactly."""

    reasoning: str
    content: str
    mode: Optional[str]  # "on", "off", or None while no mode tag has been seen
    ended: bool  # the answer has opened: later text is content


class StreamSplitter:
    """Feeds a completion delta by delta: ``feed(delta) -> (reasoning_part, content_part)``.

    The parts of all deltas joined give the same strings as :func:`split` of the joined text.
    """

    def __init__(self, prefix: str = GENERATION_PREFIX):
        self.text = ""  # prefix + completion so far
        self.phase = JUDGE
        self.mode: Optional[str] = None
        self.split_at: Optional[int] = None  # index in self.text where content starts
        self._pos = 0  # where the search for the current phase's marker starts
        self._advance(prefix)
        self._prefix_len = len(self.text)

    @property
    def ended(self) -> bool:
        return self.phase == CONTENT

    def _advance(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        while self.phase in _NEXT or self.phase == OPENED:
            if self.phase == OPENED:
                if len(self.text) <= self._pos:
                    return  # the character after <answer> decides where content starts
                self.split_at = self._pos + (self.text[self._pos] == "\n")
                self.phase = CONTENT
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

    def feed(self, delta: str) -> tuple[str, str]:
        """The reasoning part and the content part of ``delta`` (either may be empty)."""
        begin = len(self.text)
        self._advance(delta)
        if self.split_at is None or self.split_at >= len(self.text):
            return delta, ""
        cut = max(self.split_at - begin, 0)
        return delta[:cut], delta[cut:]

    def result(self) -> Split:
        """The split of everything fed so far (the prefix excluded)."""
        out = self.text[self._prefix_len:]
        if self.split_at is None:
            return Split(out, "", self.mode, False)
        cut = max(self.split_at - self._prefix_len, 0)
        return Split(out[:cut], out[cut:], self.mode, True)


def split(text: str, prefix: str = GENERATION_PREFIX) -> Split:
    """Split a whole completion that continues a prompt ending with ``prefix`` (see the module doc)."""
    splitter = StreamSplitter(prefix)
    splitter.feed(text)
    return splitter.result()


def answer_text(content: str) -> str:
    """The answer without the closing ``\\n</answer>`` a complete response ends with (when present).

    ``katdata serve`` stops generation at that closing tag, so its content is the bare answer already;
    other servers return it, and this drops it.
    """
    for tail in ("\n" + ANSWER_CLOSE, ANSWER_CLOSE):
        if content.rstrip().endswith(tail):
            return content.rstrip()[: -len(tail)]
    return content
