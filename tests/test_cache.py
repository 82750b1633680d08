"""The request cache: exact key logic on the scripted backend, crash-resume on the real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from katdata.backends import EngineConfig, Completion, Request, SamplingParams
from katdata.backends.scripted import ScriptedBackend
from katdata.cache import CachedBackend, cache_key


def chat(text: str) -> Request:
    return Request(messages=[{"role": "user", "content": text}])


def counting_backend():
    """Replies name the query, the sample index and the seed, so a wrong sample is visible."""
    def script(req: Request, i: int) -> str:
        return f"{req.messages[-1]['content']}#{i}"
    return ScriptedBackend(EngineConfig(model="scripted", batch_size=2), script=script)


def generated(backend) -> int:
    return sum(len(reqs) * p.n for reqs, p in backend.calls)


def test_hits_skip_the_engine(tmp_path):
    inner = counting_backend()
    cache = CachedBackend(inner, tmp_path / "cache.jsonl")
    reqs = [chat("a"), chat("b"), chat("c")]
    first = cache.generate(reqs, SamplingParams(n=2))
    assert generated(inner) == 6 and cache.misses == 6
    again = cache.generate(reqs, SamplingParams(n=2))
    assert generated(inner) == 6 and cache.hits == 6
    assert [[c.text for c in r] for r in again] == [[c.text for c in r] for r in first]
    # a fresh process reading the same file also serves everything from it
    reopened = CachedBackend(counting_backend(), tmp_path / "cache.jsonl")
    assert [[c.text for c in r] for r in reopened.generate(reqs, SamplingParams(n=2))] == \
        [["a#0", "a#1"], ["b#0", "b#1"], ["c#0", "c#1"]]
    assert generated(reopened.backend) == 0


def test_key_covers_prompt_params_and_index(tmp_path):
    b = counting_backend()
    base = SamplingParams(n=1, temperature=0.7, seed=1)
    k = cache_key(b, "p", base, 0)
    assert k != cache_key(b, "p", base, 1)
    assert k != cache_key(b, "q", base, 0)
    for change in ({"temperature": 0.8}, {"top_p": 0.9}, {"max_tokens": 9}, {"stop": ("x",)}, {"seed": 2},
                   {"logprobs": 1}, {"repetition_penalty": 1.1}, {"frequency_penalty": 0.3}):
        assert k != cache_key(b, "p", base.with_(**change), 0), change
    assert k == cache_key(b, "p", base.with_(n=5), 0)  # n is not part of the key
    other = ScriptedBackend(EngineConfig(model="other"))
    assert k != cache_key(other, "p", base, 0)


def test_more_samples_generate_only_the_missing_ones(tmp_path):
    inner = counting_backend()
    cache = CachedBackend(inner, tmp_path / "c.jsonl")
    cache.generate([chat("a")], SamplingParams(n=2, temperature=1.0, seed=5))
    out = cache.generate([chat("a")], SamplingParams(n=4, temperature=1.0, seed=5))
    reqs, params = inner.calls[-1]
    assert params.n == 2 and params.seed == 7  # samples 2 and 3, seed moved by the first missing index
    # the scripted backend numbers its replies from 0: samples 2-3 hold the new replies, 0-1 the cached ones
    assert [c.text for c in out[0]] == ["a#0", "a#1", "a#0", "a#1"]
    assert generated(inner) == 4


def test_errors_are_not_cached_and_torn_tail_is_repaired(tmp_path):
    path = tmp_path / "c.jsonl"
    failing = ScriptedBackend(EngineConfig(model="m"), script=lambda r, i: Completion("", "error", error="boom"))
    cache = CachedBackend(failing, path)
    cache.generate([chat("a")], SamplingParams())
    cache.close()
    assert not path.exists() or path.read_text() == ""
    ok = CachedBackend(ScriptedBackend(EngineConfig(model="m"), script=lambda r, i: "fine"), path)
    ok.generate([chat("a"), chat("b")], SamplingParams())
    ok.close()
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a crash mid-line
    reopened = CachedBackend(ScriptedBackend(EngineConfig(model="m")), path)
    assert [r[0].text for r in reopened.generate([chat("a"), chat("b")], SamplingParams())] == ["fine", "fine"]
    assert reopened.hits == 2
    assert path.read_text().endswith("\n")


CHILD = textwrap.dedent("""
    import sys
    from katdata.backends import EngineConfig, Request, SamplingParams, get_backend
    from katdata.cache import CachedBackend
    if __name__ == "__main__":
        backend = get_backend("transformers", EngineConfig(batch_size=4, max_model_len=1024))
        cache = CachedBackend(backend, sys.argv[1])
        reqs = [Request([{"role": "user", "content": f"Write a sentence about the number {i}."}]) for i in range(12)]
        cache.generate(reqs, SamplingParams(n=2, temperature=0.9, max_tokens=24, seed=3))
        print("finished", flush=True)
""")


def test_resume_after_kill_reuses_every_finished_completion(tmp_path, hf_backend):
    """kill -9 a real run once part of it is cached; the rerun generates only what is missing."""
    path = tmp_path / "cache.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= 4:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert b"finished" not in proc.stdout.read(), "the run ended before it could be killed"
    before = {json.loads(line)["key"]: json.loads(line)["completion"] for line in path.read_text().splitlines()
              if line.endswith("}")}
    assert 4 <= len(before) < 24

    cache = CachedBackend(hf_backend, path)
    reqs = [Request([{"role": "user", "content": f"Write a sentence about the number {i}."}]) for i in range(12)]
    params = SamplingParams(n=2, temperature=0.9, max_tokens=24, seed=3)
    out = cache.generate(reqs, params)
    assert cache.hits == len(before) and cache.misses == 24 - len(before)
    for i, req in enumerate(reqs):
        for j, comp in enumerate(out[i]):
            key = cache_key(hf_backend, req.prompt(), params, j)
            if key in before:
                assert comp.text == before[key]["text"]  # sample j is served as sample j
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 24  # each completion written exactly once
    assert all(c.finish_reason in ("stop", "length") for row in out for c in row)
