"""Engines behind one interface, imported only when chosen (lm-eval style table).

``BACKENDS`` is what recipes may name. The scripted backend (``backends/scripted.py``) is not in it:
it is for unit tests of pure logic, which construct ``ScriptedBackend`` directly.
"""

from __future__ import annotations

import importlib

from katdata.backends.base import Backend, Completion, Request, SamplingParams
from katdata.backends.config import BACKEND_NAMES, EngineConfig
from katdata.errors import EngineError, KatdataError

BACKENDS = {
    "transformers": ("katdata.backends.hf:TransformersBackend", "local"),
    "vllm": ("katdata.backends.vllm_engine:VLLMBackend", "vllm' (GPU) or 'cpu"),
    "openai": ("katdata.backends.openai_api:OpenAIBackend", "openai"),
}
assert tuple(BACKENDS) == BACKEND_NAMES

__all__ = ["BACKENDS", "Backend", "EngineConfig", "Completion", "Request", "SamplingParams", "get_backend"]


def get_backend(name: str, config: EngineConfig | None = None) -> Backend:
    """Build the backend called ``name``; a missing engine names the extra that installs it."""
    if name not in BACKENDS:
        hint = " (the scripted backend is for unit tests only)" if name == "scripted" else ""
        raise KatdataError(f"unknown backend '{name}'{hint}; known: {', '.join(sorted(BACKENDS))}")
    target, extra = BACKENDS[name]
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(f"backend '{name}' needs {exc.name or exc}: install the '{extra}' extra") from exc
    return getattr(mod, cls)(config or EngineConfig())

