"""Shared session fixtures. Each one starts its engine only when a test asks for it.

- ``embedded_model``: the embedded SmolLM2 safetensors folder (converted once);
- ``tokenizer``: its tokenizer (to count tokens independently of the backends);
- ``hf_backend``: one TransformersBackend for the session;
- ``vllm_backend``: one in-process vLLM engine for the session (about 30 s to start eager on CPU);
- ``vllm_server``: one ``vllm.entrypoints.openai.api_server`` of the embedded model on 127.0.0.1,
  started with an API key from ``KATDATA_TEST_KEY``, stopped by PID at the end;
- ``openai_backend``: an OpenAIBackend on that server.

Both vLLM engines run eager (``enforce_eager``): measured on this CPU it starts about 2x faster than
with torch.compile. Tests shorter than about 4 minutes run by default; longer ones are marked slow.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

# No test asks the Hugging Face Hub (this machine, like CI, reaches no network; a name lookup would already
# leave it): a test of katdata's behaviour with the Hub unreachable points HF_ENDPOINT at a closed local port.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

MAX_MODEL_LEN = 2048  # small context: quick to start, cheap KV cache, a long prompt is easy to build
TEST_KEY_ENV = "KATDATA_TEST_KEY"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from katdata.model import embedded_path

    return embedded_path()


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


@pytest.fixture(scope="session")
def hf_backend(embedded_model):
    from katdata.backends import EngineConfig, get_backend

    backend = get_backend("transformers", EngineConfig(max_model_len=MAX_MODEL_LEN, batch_size=16))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_backend(embedded_model):
    from katdata.backends import EngineConfig, get_backend

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    backend = get_backend("vllm", EngineConfig(max_model_len=MAX_MODEL_LEN, enforce_eager=True))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def api_key() -> str:
    """A random key for the test server, only ever held in the environment."""
    key = "sk-katdata-test-" + secrets.token_hex(12)
    os.environ[TEST_KEY_ENV] = key
    return key


@pytest.fixture(scope="session")
def vllm_server(embedded_model, api_key):
    import shutil
    import tempfile

    from katdata import servers

    # not under pytest's basetemp: concurrent pytest sessions prune those while the server runs
    log_dir = Path(tempfile.mkdtemp(prefix="katdata-test-server-"))
    server = servers.start(str(embedded_model), max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                           api_key_env=TEST_KEY_ENV, log_path=str(log_dir / "vllm-server.log"))
    yield server
    server.stop()
    shutil.rmtree(log_dir, ignore_errors=True)


def _openai_config(server, **extra):
    """A EngineConfig for the openai backend on ``server`` (test defaults: short backoff)."""
    from katdata.backends import EngineConfig

    opts = {"server": "vllm", "retry_base_s": 0.2, "retry_cap_s": 2.0}
    opts.update(extra.pop("extra", {}))
    fields = dict(model=server.served_name, base_url=server.base_url, api_key_env=TEST_KEY_ENV,
                  concurrency=8, timeout_s=120)
    fields.update(extra)
    return EngineConfig(extra=opts, **fields)


@pytest.fixture(scope="session")
def openai_config():
    """``openai_config(server, **EngineConfig fields)`` -> a config for the openai backend on it."""
    return _openai_config


@pytest.fixture(scope="session")
def openai_backend(vllm_server):
    from katdata.backends import get_backend

    return get_backend("openai", _openai_config(vllm_server))
