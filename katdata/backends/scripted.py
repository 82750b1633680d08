"""A scripted backend for unit tests of pure logic: replies come from a function or a list.

Never the only test of a feature, and never used by a shipped recipe.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from katdata.backends.base import Backend, EngineConfig, Completion, Request, SamplingParams

Reply = Union[str, Completion]


class ScriptedBackend(Backend):
    """``script(request, sample_index) -> str | Completion``; every call is recorded in ``calls``."""

    name = "scripted"

    def __init__(self, config: Optional[EngineConfig] = None,
                 script: Optional[Callable[[Request, int], Reply]] = None):
        super().__init__(config or EngineConfig(model="scripted"))
        self.script = script or (lambda req, i: "")
        self.calls: list[tuple[list[Request], SamplingParams]] = []

    def generate(self, requests: list[Request], params: SamplingParams, on_done=None) -> list[list[Completion]]:
        self.calls.append((list(requests), params))
        out = []
        for k, req in enumerate(requests):
            row = []
            for i in range(params.n):
                reply = self.script(req, i)
                if isinstance(reply, str):
                    reply = Completion(text=reply, finish_reason="stop", prompt_tokens=len(req.prompt().split()),
                                       completion_tokens=len(reply.split()))
                row.append(reply)
            out.append(row)
            if on_done:
                on_done(k, row)
        return out
