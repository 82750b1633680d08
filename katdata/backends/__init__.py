"""Engines behind one interface, imported only when chosen (lm-eval style table).

``BACKENDS`` is what recipes may name. The scripted backend (``backends/scripted.py``) is not in it:
it is for unit tests of pure logic, which construct ``ScriptedBackend`` directly.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from katdata.backends.base import Backend, BackendConfig, Completion, Request, SamplingParams
from katdata.errors import EngineError, KatdataError

BACKENDS = {
    "transformers": ("katdata.backends.hf:TransformersBackend", "local"),
    "vllm": ("katdata.backends.vllm_engine:VLLMBackend", "vllm' (GPU) or 'cpu"),
    "openai": ("katdata.backends.openai_api:OpenAIBackend", "openai"),
}

__all__ = ["BACKENDS", "Backend", "BackendConfig", "Completion", "Request", "SamplingParams", "get_backend"]


def get_backend(name: str, config: BackendConfig | None = None) -> Backend:
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
    return getattr(mod, cls)(config or BackendConfig())


def engine_factory(backend: str, model: Optional[str]) -> Callable[[str], Backend]:
    """One cached backend for every engine name (the CLI's stand-in for a recipe's engines table)."""
    cache: dict[str, Backend] = {}

    def engine(name: str) -> Backend:
        if "b" not in cache:
            cache["b"] = get_backend(backend, BackendConfig(model=model))
        return cache["b"]
    return engine
