"""The openai backend against a real vLLM server: retries, the rolling window, a server killed and
restarted mid-run, bad input, and the API key kept out of logs, errors and files.

Faults (429, 5xx, dropped connections, a held request) come from a small real HTTP proxy in front
of the real server; the crash is a real kill -9 of the server's process group.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from katdata import servers
from katdata.backends import Request, SamplingParams, get_backend
from katdata.cache import CachedBackend
from katdata.errors import KatdataError

pytestmark = pytest.mark.vllm


def chat(text: str) -> Request:
    return Request(messages=[{"role": "user", "content": text}])


class FaultProxy:
    """Forwards to the real server; ``faults`` are served first, one per request: an HTTP status
    code, or "drop" (close the connection without an answer). A request whose prompt contains
    HOLD waits until ``release`` is set. While ``down`` is set every request, ``/health`` included,
    is dropped (counted in ``dropped``); otherwise ``/health`` is asked of the real server."""

    def __init__(self, upstream_port: int, faults=()):
        self.faults = list(faults)
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.in_flight = self.max_in_flight = self.forwarded = self.dropped = self.health_ok = 0
        self.down = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def drop(self):
                with proxy.lock:
                    proxy.dropped += 1
                self.close_connection = True
                self.connection.shutdown(2)

            def do_GET(self):
                if proxy.down:
                    return self.drop()
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                data = resp.read()
                with proxy.lock:
                    proxy.health_ok += self.path == "/health" and resp.status == 200
                self.send_response(resp.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    fault = proxy.faults.pop(0) if proxy.faults else None
                if proxy.down:
                    return self.drop()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None:
                    msg = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if b"HOLD" in body:
                        proxy.release.wait(120)
                    conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=300)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1
                        proxy.forwarded += 1
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def proxied(openai_config, server, proxy, **kw):
    cfg = openai_config(server, **kw)
    cfg.base_url = proxy.base_url
    return get_backend("openai", cfg)


def test_retries_429_5xx_and_dropped_connections(vllm_server, openai_config, openai_backend):
    req = [chat("What is the capital of France?")]
    p = SamplingParams(max_tokens=8)
    direct = openai_backend.generate(req, p)[0][0].text
    proxy = FaultProxy(vllm_server.port, faults=["429", "503", "drop", "500"])
    try:
        backend = proxied(openai_config, vllm_server, proxy, max_retries=6)
        out = backend.generate(req, p)
        assert out[0][0].text == direct
        assert backend.attempts == 5 and proxy.forwarded == 1
        proxy.faults = ["503"] * 10
        few = proxied(openai_config, vllm_server, proxy, max_retries=2)
        with pytest.raises(KatdataError, match="failing after 3 tries"):
            few.generate(req, p)
    finally:
        proxy.close()


def test_rolling_window_is_bounded_and_not_batch_by_batch(vllm_server, openai_config):
    """One request is held back; with a window of 3 the other 9 still finish before it."""
    proxy = FaultProxy(vllm_server.port)
    order: list[int] = []
    reqs = [chat("HOLD: say one word.")] + [chat(f"Say the number {i}.") for i in range(9)]

    def done(i, comps):
        order.append(i)
        if len(order) == 9:
            proxy.release.set()

    try:
        backend = proxied(openai_config, vllm_server, proxy, concurrency=3)
        out = backend.generate(reqs, SamplingParams(max_tokens=4), on_done=done)
    finally:
        proxy.close()
    assert order[-1] == 0 and sorted(order) == list(range(10))
    assert 2 <= proxy.max_in_flight <= 3
    assert all(len(r) == 1 and r[0].finish_reason in ("stop", "length") for r in out)


@pytest.mark.slow  # about a minute (a second vLLM server start): keeps the default run under 15 minutes here
def test_server_killed_and_restarted_mid_run(vllm_server, openai_config, openai_backend):
    """kill -9 the server after a few answers, restart it on the same port: the run completes and
    every request is answered exactly once, with the answer an undisturbed run gives."""
    reqs = [chat(f"Write one sentence about the number {i}.") for i in range(16)]
    p = SamplingParams(max_tokens=32)
    expected = [r[0].text for r in openai_backend.generate(reqs, p)]
    backend = get_backend("openai", openai_config(vllm_server, concurrency=4, max_retries=60,
                                                  extra={"retry_base_s": 0.5, "retry_cap_s": 3.0}))
    answered: list[int] = []
    crash = {}

    def restart():
        try:
            crash["killed_at"] = len(answered)
            vllm_server.kill()
            t0 = time.monotonic()
            vllm_server.restart()
            crash["restart_s"] = time.monotonic() - t0
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            crash["error"] = exc

    worker = threading.Thread(target=restart)

    def done(i, comps):
        answered.append(i)
        if len(answered) == 3:
            worker.start()

    try:
        out = backend.generate(reqs, p, on_done=done)
    finally:
        if worker.is_alive():
            worker.join()
    assert "error" not in crash, f"the restart failed: {crash.get('error')}"
    assert sorted(answered) == list(range(16))  # each request answered exactly once
    assert crash["killed_at"] < 16 and backend.attempts > 16  # the crash hit the run, retries followed
    assert [r[0].text for r in out] == expected
    print(f"server restart took {crash['restart_s']:.1f} s")


def test_bad_input_is_named(vllm_server, openai_config, monkeypatch):
    port = servers.free_port()
    cfg = openai_config(vllm_server, max_retries=1, extra={"retry_base_s": 0.05})
    cfg.base_url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(KatdataError, match=f"127.0.0.1:{port}.*unreachable"):
        get_backend("openai", cfg).generate([chat("hi")], SamplingParams(max_tokens=2))
    with pytest.raises(KatdataError, match="model 'no-such-model'"):
        get_backend("openai", openai_config(vllm_server, model="no-such-model")).generate(
            [chat("hi")], SamplingParams(max_tokens=2))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = openai_config(vllm_server)
    cfg.base_url = None
    with pytest.raises(KatdataError, match="base URL"):
        get_backend("openai", cfg)


def test_api_key_never_leaks(vllm_server, openai_config, api_key, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-" + api_key[-12:][::-1]
    monkeypatch.setenv("KATDATA_WRONG_KEY", wrong)
    bad = get_backend("openai", openai_config(vllm_server, api_key_env="KATDATA_WRONG_KEY"))
    with pytest.raises(KatdataError) as err:
        bad.generate([chat("hi")], SamplingParams(max_tokens=2))
    assert "KATDATA_WRONG_KEY" in str(err.value) and "API key" in str(err.value)
    assert wrong not in str(err.value) and wrong not in repr(bad)

    good = CachedBackend(get_backend("openai", openai_config(vllm_server)), tmp_path / "cache.jsonl")
    out = good.generate([chat("Say hi.")], SamplingParams(max_tokens=4))
    good.close()
    assert out[0][0].finish_reason in ("stop", "length")
    for secret in (api_key, wrong):
        assert secret not in caplog.text
        assert secret not in (tmp_path / "cache.jsonl").read_text()
        assert secret not in vllm_server.log_path.read_text(errors="replace")
        assert secret not in " ".join(vllm_server.process.args)
        assert secret not in repr(vllm_server) and secret not in repr(good) and secret not in repr(good.backend.config)
    assert os.environ["KATDATA_TEST_KEY"] == api_key


def test_several_servers_share_the_rolling_window(vllm_server, openai_config, openai_backend):
    """base_url with several comma-separated servers: requests spread over all, each answered once."""
    reqs = [chat(f"Name a colour, number {i}.") for i in range(8)]
    p = SamplingParams(max_tokens=6)
    direct = [c[0].text for c in openai_backend.generate(reqs, p)]
    a, b = FaultProxy(vllm_server.port), FaultProxy(vllm_server.port)
    try:
        cfg = openai_config(vllm_server, concurrency=4)
        cfg.base_url = f"{a.base_url},{b.base_url}"
        out = get_backend("openai", cfg).generate(reqs, p)
        assert [c[0].text for c in out] == direct
        assert a.forwarded > 0 and b.forwarded > 0 and a.forwarded + b.forwarded == len(reqs)
    finally:
        a.close()
        b.close()


def test_a_server_out_of_rotation_rejoins_once_its_health_answers(vllm_server, openai_config, openai_backend):
    """Two base URLs: the first drops every connection, so the pool takes it out of the rotation and
    the second serves alone; once healed, its /health answers, it rejoins and serves requests again.
    Every request is answered once, with the answer an undisturbed run gives."""
    from katdata.backends.base import Job

    reqs = [chat(f"Name an animal, number {i}.") for i in range(16)]
    p = SamplingParams(max_tokens=6)
    direct = [c[0].text for c in openai_backend.generate(reqs, p)]
    a, b = FaultProxy(vllm_server.port), FaultProxy(vllm_server.port)
    a.down = True
    try:
        cfg = openai_config(vllm_server, concurrency=2, extra={"health_interval_s": 0.1})
        cfg.base_url = f"{a.base_url},{b.base_url}"
        backend = get_backend("openai", cfg)
        got, healed_at = {}, None
        for job, comps in backend.stream(Job(i, r, p) for i, r in enumerate(reqs)):
            assert job.key not in got
            got[job.key] = comps[0].text
            if len(got) == 4:  # a is out of the rotation by now: heal it and wait for its health check
                assert a.dropped >= 1 and a.forwarded == 0
                a.down, healed_at = False, b.forwarded
                deadline = time.monotonic() + 30
                while a.health_ok == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # the health task puts it back right after the answer
                assert a.health_ok >= 1, "the healed server's /health was never asked"
        assert [got[i] for i in range(len(reqs))] == direct
        assert a.forwarded > 0, "the healed server got no request after rejoining"
        assert a.forwarded + b.forwarded == len(reqs) and healed_at < len(reqs)
    finally:
        a.close()
        b.close()


def test_stream_keeps_the_window_full_from_first_to_last(vllm_server, openai_config):
    """Backend.stream with jobs of very different lengths: the window is refilled as each one
    finishes, so the server never has fewer than the window while work remains."""
    from katdata.backends.base import Job

    proxy = FaultProxy(vllm_server.port)
    try:
        backend = proxied(openai_config, vllm_server, proxy, concurrency=4)
        jobs = [Job(i, chat(f"Count from 1 to {i}."), SamplingParams(max_tokens=4 + 12 * (i % 4), seed=i))
                for i in range(24)]
        keys = [job.key for job, comps in backend.stream(iter(jobs))]
    finally:
        proxy.close()
    assert sorted(keys) == list(range(24)) and keys != list(range(24))  # finishing order, each once
    assert proxy.max_in_flight == 4 and proxy.forwarded == 24
    assert backend.occupancy.mean >= 0.9, backend.occupancy.mean


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_servers_one_killed_mid_sample_stage(vllm_server, openai_config, embedded_model, api_key, tmp_path):
    """Two real vLLM servers; the one listed first is killed with kill -9 in the middle of a sample
    stage: the stage completes, every row is written once, and the rows equal a run against one
    healthy server with the same seeds."""
    from katdata import sample, servers
    from katdata.records import Query
    from katdata.runfiles import RowWriter
    from katdata.verify import VerifyConfig

    queries = [Query(id=f"q{i}", query=f"What is {i} + {i + 3}?", reference=str(2 * i + 3), kind="numeric")
               for i in range(8)]
    cfg = sample.SampleConfig(n=4, rounds=[2], max_tokens_on=48, max_tokens_off=16, seed=5,
                              verify=VerifyConfig())
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        with RowWriter(d / "queries.jsonl") as w:
            w.write_all(queries)
    healthy = get_backend("openai", openai_config(vllm_server, concurrency=8))
    sample.run(cfg, one, lambda name: healthy)

    other = servers.start(str(embedded_model), max_model_len=vllm_server_len(), enforce_eager=True,
                          api_key_env="KATDATA_TEST_KEY")
    killed = {}
    try:
        conf = openai_config(vllm_server, concurrency=8, extra={"health_interval_s": 0.5})
        conf.base_url = f"{other.base_url},{vllm_server.base_url}"
        backend = get_backend("openai", conf)
        inner = backend.stream

        def stream(source, wave_limit=0):
            for n, item in enumerate(inner(source)):
                if n == 6:  # mid-stage, with requests in flight on both servers
                    killed["at"] = (two / "samples.jsonl").read_text().count("\n")
                    other.kill()
                yield item

        backend.stream = stream
        stats = sample.run(cfg, two, lambda name: backend)
    finally:
        other.stop()
        other.log_path.unlink(missing_ok=True)
    a = sorted((one / "samples.jsonl").read_text().splitlines())
    b = (two / "samples.jsonl").read_text().splitlines()
    assert 0 < killed["at"] < len(b) == stats["rows_out"]
    assert len({(r["id"], r["mode"], r["index"]) for r in map(json.loads, b)}) == len(b)  # each once
    assert sorted(b) == a


def vllm_server_len() -> int:
    import conftest

    return conftest.MAX_MODEL_LEN


def test_run_fails_clearly_once_no_server_has_answered_for_unavailable_s(vllm_server, openai_config):
    """Both servers answer, then both go away: the run waits ``unavailable_s`` and fails naming them."""
    from katdata.backends.base import Job

    a, b = FaultProxy(vllm_server.port), FaultProxy(vllm_server.port)
    cfg = openai_config(vllm_server, concurrency=2, max_retries=1,
                        extra={"unavailable_s": 2.0, "health_interval_s": 0.2, "retry_base_s": 0.05})
    cfg.base_url = f"{a.base_url},{b.base_url}"
    backend = get_backend("openai", cfg)
    jobs = [Job(i, chat(f"Say {i}."), SamplingParams(max_tokens=2)) for i in range(12)]
    got = []
    with pytest.raises(KatdataError, match=r"no server has answered for \d+ s .*unavailable_s") as err:
        for job, comps in backend.stream(iter(jobs)):
            got.append(job.key)
            if len(got) == 3:  # both go away: kept-alive connections dropped, new ones refused
                for proxy in (a, b):
                    proxy.faults = ["drop"] * 1000
                    proxy.close()
    assert 3 <= len(got) < 12
    assert "127.0.0.1" in str(err.value)
