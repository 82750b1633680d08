"""Run untrusted Python (model-written code plus its tests) in a locked-down subprocess.

Layers, strongest first (each one is reported in ``SandboxResult.isolation``):

- ``netns``: a fresh, empty network namespace (no interface but a down loopback): no network;
- ``mountns``: a private mount namespace with fresh tmpfs over /tmp, /var/tmp and /dev/shm, and
  the run's own temporary folder bind-mounted as the working directory;
- ``uid``: the code runs as an unprivileged user (nobody by default), so it cannot write to any
  root-owned path, and RLIMIT_NPROC (which root ignores) really caps its processes;
- always: rlimits on CPU time, address space, processes, file size and open files, no core files,
  an empty environment, ``python -I``, its own session (process group) killed on timeout, and a
  socket-blocking shim inside the interpreter as a last line of defence.

The namespace and uid layers need root (we run as root on these machines); without it the run
still happens with the rlimits and the shim, and ``isolation`` says what was missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 4096, 16384, 1 << 18, 2, 4
WORK = "/tmp/work"  # where the run's folder appears inside the mount namespace
PYROOT = "/tmp/python"  # where the interpreter's prefix is bind-mounted (its real home may be 0700)

# Executed before the candidate: no sockets, even if the network namespace is missing.
SHIM = '''\
import socket as _s
def _no_net(*a, **k):
    raise PermissionError("network access is disabled in the katdata sandbox")
for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_s, _n, _no_net)
del _s, _n
'''


class SandboxConfig(BaseModel):
    """Limits of one sandboxed run."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="wall-clock limit; the whole process group is killed after it")
    cpu_s: int = Field(10, ge=1, description="RLIMIT_CPU: CPU seconds before the kernel kills the process")
    memory_mb: int = Field(1024, ge=1, description="RLIMIT_AS: address-space limit in MiB")
    max_procs: int = Field(32, description="RLIMIT_NPROC: processes the sandbox user may own")
    file_size_mb: int = Field(16, description="RLIMIT_FSIZE: largest file it may write, MiB")
    max_files: int = Field(64, description="RLIMIT_NOFILE: open file descriptors")
    max_output_chars: int = Field(20000, description="stdout/stderr kept per stream")
    uid: Optional[int] = Field(None, description="unprivileged uid the code runs as when we are root; "
                               "None = a fresh uid per run from a high range, so runs never share one")
    isolate: bool = Field(True, description="use network/mount namespaces and the uid drop when root")
    python: Optional[str] = Field(None, description="interpreter to run (default: the current one)")


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0 within the limits
    returncode: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float
    isolation: list[str] = field(default_factory=list)
    reason: Optional[str] = None  # why not ok: "timeout", "exit 1", "signal SIGKILL", ...


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _preexec(cfg: SandboxConfig, host_dir: str, isolate: bool):
    """Runs in the child between fork and exec: namespaces, then rlimits, then the uid drop."""
    import resource

    def setup():
        os.setsid()
        if isolate:
            libc = _libc()
            _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
            _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
            # Open what we bind later before the tmpfs hides it (fds must belong to this namespace).
            work_fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY)
            py_fd = os.open(sys.base_prefix, os.O_RDONLY | os.O_DIRECTORY)
            for path in (b"/tmp", b"/var/tmp", b"/dev/shm"):
                if os.path.isdir(path):
                    opts = b"size=64m,mode=1777"
                    _check(libc.mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs")
            for fd, target in ((work_fd, WORK), (py_fd, PYROOT)):
                os.mkdir(target, 0o755)
                _check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND, None), "bind")
                os.close(fd)
            os.chdir(WORK)
        mb = 1024 * 1024
        limits = {
            resource.RLIMIT_CPU: cfg.cpu_s,
            resource.RLIMIT_AS: cfg.memory_mb * mb,
            resource.RLIMIT_FSIZE: cfg.file_size_mb * mb,
            resource.RLIMIT_NOFILE: cfg.max_files,
            resource.RLIMIT_CORE: 0,
            resource.RLIMIT_NPROC: cfg.max_procs,
        }
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))
        if isolate:
            os.setgroups([])
            os.setgid(cfg.uid)
            os.setuid(cfg.uid)

    return setup


def _sweep_uid(uid: int) -> None:
    """Kill every process of ``uid`` at once (kill(-1) from a child that became that user)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


_UID_BASE, _UID_SPAN = 200_000, 100_000
_uid_lock = threading.Lock()
_uid_next = [0]


def _fresh_uid() -> int:
    """A uid no other run of this process uses now (and unlikely for other processes: pid-spread)."""
    with _uid_lock:
        _uid_next[0] += 1
        return _UID_BASE + (os.getpid() * 1009 + _uid_next[0]) % _UID_SPAN


def can_isolate() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


def _interpreter(cfg: SandboxConfig, isolate: bool) -> tuple[str, dict]:
    """The interpreter path as the child sees it, and the environment it needs."""
    if cfg.python:
        return cfg.python, {}
    real = os.path.realpath(sys.executable)
    if isolate and real.startswith(sys.base_prefix.rstrip("/") + "/"):
        inner = PYROOT + real[len(sys.base_prefix.rstrip("/")):]
        return inner, {"LD_LIBRARY_PATH": PYROOT + "/lib"}
    return sys.executable, {}


def run_python(code: str, cfg: Optional[SandboxConfig] = None, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a Python program under ``cfg``'s limits; never raises for what the code does."""
    cfg = cfg or SandboxConfig()
    isolate = cfg.isolate and can_isolate()
    if isolate and cfg.uid is None:
        cfg = cfg.model_copy(update={"uid": _fresh_uid()})
    host_dir = tempfile.mkdtemp(prefix="katdata-sbx-")
    try:
        with open(os.path.join(host_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(SHIM + "\n" + code)
        if isolate:
            os.chown(host_dir, cfg.uid, cfg.uid)
            os.chown(os.path.join(host_dir, "main.py"), cfg.uid, cfg.uid)
        python, extra_env = _interpreter(cfg, isolate)
        home = WORK if isolate else host_dir
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home,
               "PYTHONDONTWRITEBYTECODE": "1", **extra_env}
        t0 = time.monotonic()
        proc = subprocess.Popen([python, "-I", "main.py"], cwd=None if isolate else host_dir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_preexec(cfg, host_dir, isolate))
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode(), timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        finally:
            _kill_group(proc.pid)
            if isolate:
                _sweep_uid(cfg.uid)
        wall = time.monotonic() - t0
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
    rc = proc.returncode
    if timed_out:
        reason = "timeout"
    elif rc and rc < 0:
        reason = f"signal {signal.Signals(-rc).name}"
    elif rc:
        reason = f"exit {rc}"
    else:
        reason = None
    cut = cfg.max_output_chars
    return SandboxResult(ok=rc == 0 and not timed_out, returncode=rc, timed_out=timed_out,
                         stdout=out.decode("utf-8", "replace")[-cut:], stderr=err.decode("utf-8", "replace")[-cut:],
                         wall_s=wall, isolation=(["netns", "mountns", "uid"] if isolate else []) + ["rlimits", "shim"],
                         reason=reason)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def humaneval_program(completion: str, test: str, prompt: Optional[str] = None) -> str:
    """A HumanEval program: the prompt (signature) when the completion lacks it, the body, the tests."""
    body = completion if prompt is None or _defines_entry(completion, prompt) else prompt + completion
    return body + "\n\n" + test + "\n"


def _defines_entry(completion: str, prompt: str) -> bool:
    """True when the completion already defines the function the prompt declares."""
    import re

    names = re.findall(r"^def\s+(\w+)\s*\(", prompt, re.M)
    return bool(names) and re.search(rf"^def\s+{re.escape(names[-1])}\s*\(", completion, re.M) is not None
