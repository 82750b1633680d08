"""Escapes from the code sandbox: hostile programs, run the way katdata runs them, are contained.

They run as an unprivileged user (``nobody`` when the tests run as root), since that is how most
people run katdata: they must be contained by the isolation layer, not by root's powers. As root they
run once more as root, where the code runs as a fresh unprivileged uid of its own, from wherever the
project lives. ``nobody`` runs the venv's own interpreter; when a folder on the way is closed to it
(a clone in ``mktemp -d``, a pyenv build under /root), it gets them through bind mounts in a mount
namespace of its own.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
from test_sandbox import ROOT, _procs_of, needs_bwrap

ROOT_UID = 299_003  # the sandbox's uid when the driver runs as root
USERS = ["nobody", "root"] if os.geteuid() == 0 else ["self"]

ATTEMPTS = {
    "socket": "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('ESCAPED')",
    "ctypes": textwrap.dedent("""\
        import ctypes, struct
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
        fd = libc.socket(2, 1, 0)
        addr = struct.pack('<H', 2) + struct.pack('>H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)
        rc = libc.connect(fd, addr, len(addr))
        print('fd', fd, 'rc', rc, 'errno', ctypes.get_errno())
        if fd >= 0 and rc == 0:
            print('ESCAPED')
        """),
    "curl": "import subprocess\nr = subprocess.run(['curl', '-s', '-m', '2', 'http://127.0.0.1:{port}/'])\n"
            "print('curl exit', r.returncode)\nif r.returncode == 0:\n    print('ESCAPED')",
    "environ": textwrap.dedent("""\
        import os
        found = [k for k, v in os.environ.items() if '{secret}' in v]
        for pid in ['PARENT_PID', 'self', '1'] + os.listdir('/proc'):
            try:
                if b'{secret}' in open('/proc/%s/environ' % pid, 'rb').read():
                    found.append(pid)
            except OSError as e:
                pass
        print('ESCAPED' if found else 'nothing', found)
        """),
    "write": textwrap.dedent("""\
        import os
        for path in ['{outside}/pwned.txt', '{run_dir}/samples.jsonl', '{run_dir}/pwned.txt']:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, 'a').write('pwned')
                print('wrote', path)
            except OSError as e:
                print('refused', path, type(e).__name__)
        """),
    "kill": "import os, signal\nfor pid in (-1, PARENT_PID):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n        print('refused', pid, type(e).__name__)",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory": "x = bytearray(16 * 2**30)\nprint('ESCAPED')",
    "early_exit": "import os\nos._exit(0)",
}

DRIVER = r"""
import json, os, socket, sys
from katdata.sandbox import SandboxConfig, run_python
attempts, port, secret, uid = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[5]) or None
control = socket.create_connection(("127.0.0.1", port), timeout=5)  # unsandboxed: the port is reachable
control.close()
out = {"uid": os.getuid(), "control_env": secret in open("/proc/%d/environ" % os.getpid()).read()}
for name, code in attempts.items():
    cfg = SandboxConfig(timeout_s=4, cpu_s=4, max_procs=16, uid=uid)  # uid: as root, so leftovers can be seen
    r = run_python(code.replace("PARENT_PID", str(os.getpid())), cfg)  # the driver is the pipeline here
    out[name] = {"ok": r.ok, "reason": r.reason, "stdout": r.stdout[-500:], "stderr": r.stderr[-300:],
                 "isolation": r.isolation}
unisolated = SandboxConfig(allow_unisolated=True, bwrap="/nonexistent/bwrap")  # the control: escapes there
out["environ_unisolated"] = run_python(attempts["environ"].replace("PARENT_PID", str(os.getpid())), unisolated).stdout
out["alive"] = True
# the sample stage on a code query whose sampled answers are hostile programs, then the real solution
from katdata import sources, template
from katdata.backends.scripted import ScriptedBackend
from katdata.runfiles import RowWriter
from katdata.sample import SampleConfig, run as sample_run
stage_dir = sys.argv[4]
os.makedirs(stage_dir)
q = sources.load("humaneval")[0]
with RowWriter(os.path.join(stage_dir, "queries.jsonl")) as w:
    w.write_all([q])
answers = [attempts[k].replace("PARENT_PID", str(os.getpid())) for k in ("kill", "early_exit", "write", "environ")]
answers.append(q.meta["prompt"] + q.meta["canonical_solution"])
def script(req, i):
    code = "```python\n" + answers[i] + "\n```\n</answer>"
    return code if req.prefix.endswith(template.FORCE_PREFIX["off"]) else "x\n</think>\n<answer>\n" + code
stats = sample_run(SampleConfig(n=5, rounds=[]), stage_dir, lambda name: ScriptedBackend(script=script))
rows = [json.loads(line) for line in open(os.path.join(stage_dir, "samples.jsonl"))]
out["stage"] = {"sandbox": stats.get("sandbox"), "correct": [r["correct"] for r in rows if r["mode"] == "off"]}
print(json.dumps(out))
"""


def _closed_top(path) -> Optional[Path]:
    """The outermost folder on the way to ``path`` (itself included) that other users cannot enter."""
    path = Path(os.path.realpath(path))
    return next((p for p in [*reversed(path.parents), path] if p.is_dir() and not p.stat().st_mode & 0o001), None)


def _command(user: str, argv: list[str], base: Path) -> tuple[list[str], str]:
    """The driver's command line as ``user``, and the PYTHONPATH that gives it katdata and its packages."""
    python, pythonpath = sys.executable, ":".join([str(ROOT)] + [p for p in sys.path if p])
    if user != "nobody":
        return [python] + argv, pythonpath
    if not shutil.which("setpriv"):
        pytest.fail("dropping to nobody needs setpriv (util-linux)")
    drop = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    home = os.path.realpath(sys.base_prefix)  # the interpreter's own folder (a pyenv build under /root, say)
    if not any(_closed_top(p) for p in (ROOT / "katdata", sys.prefix, home)):
        return drop + [python] + argv, pythonpath
    # nobody cannot enter a folder on the way (a `mktemp -d` clone, root's home): in a mount namespace of
    # the driver alone, katdata and the venv are bound at open paths, and the interpreter's folder at its
    # own path (which the venv's links name) under an empty, open tmpfs over the closed folder
    view = base / "view"
    q = shlex.quote
    script = [f"mkdir -p {q(f'{view}/project/katdata')} {q(f'{view}/venv')} {q(f'{view}/home')}",
              f"mount --bind {q(str(ROOT / 'katdata'))} {q(f'{view}/project/katdata')}"]
    if sys.prefix != sys.base_prefix:
        script.append(f"mount --rbind {q(sys.prefix)} {q(f'{view}/venv')}")
        python = f"{view}/venv/bin/{Path(sys.executable).name}"
    top = _closed_top(home)
    if top is not None:
        if top == Path(home):
            pytest.fail(f"the interpreter's folder {home} is closed to other users: nobody cannot run it")
        script += [f"mount --bind {q(home)} {q(f'{view}/home')}", f"mount -t tmpfs -o mode=755 tmpfs {q(str(top))}",
                   f"mkdir -p {q(home)}", f"mount --bind {q(f'{view}/home')} {q(home)}"]
    script.append('exec "$@"')
    return (["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(script), "sh"] + drop
            + [python] + argv), f"{view}/project"


class Listener:
    """A local TCP port that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port, self.accepted, self.stop = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@needs_bwrap
@pytest.mark.parametrize("user", USERS)
def test_escape_attempts_are_contained(user):
    import pwd

    owner = {"nobody": pwd.getpwnam("nobody").pw_uid, "root": 0}.get(user, os.getuid())
    watched = ROOT_UID if user == "root" else owner  # whose processes must not outlive the sandboxes
    base = Path(tempfile.mkdtemp(prefix="katdata-escape-", dir="/var/tmp"))  # not under /tmp: the sandbox has its own
    outside, run_dir = base / "outside", base / "runs" / "demo"
    run_dir.mkdir(parents=True)
    outside.mkdir()
    (run_dir / "samples.jsonl").write_text("{}\n")
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    for p in (base, outside, run_dir.parent, run_dir, run_dir / "samples.jsonl", driver):  # the user's own files
        os.chown(p, owner, -1)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    secret = "katdata-secret-" + os.urandom(8).hex()
    server = Listener()
    before = len(_procs_of(watched))
    try:
        attempts = {k: v.format(port=server.port, secret=secret, outside=outside, run_dir=run_dir)
                    for k, v in ATTEMPTS.items()}
        argv = [str(driver), json.dumps(attempts), str(server.port), secret, str(run_dir / "stage"),
                str(ROOT_UID if user == "root" else 0)]
        command, pythonpath = _command(user, argv, base)
        env = {"PATH": "/usr/bin:/bin", "KATDATA_TEST_TOKEN": secret, "PYTHONPATH": pythonpath}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        connections = server.accepted
        files = {"pwned": [p for p in (outside / "pwned.txt", run_dir / "pwned.txt") if p.exists()],
                 "samples": (run_dir / "samples.jsonl").read_text()}
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    assert res["uid"] == owner and res["alive"]  # the driver survived kill(-1) and the fork bomb
    assert res["control_env"] is True and connections >= 1  # the controls: outside the sandbox both work
    assert "ESCAPED" in res["environ_unisolated"]  # and unisolated, the secret is read
    for name in ATTEMPTS:
        assert res[name]["isolation"] == "bwrap"
        assert "ESCAPED" not in res[name]["stdout"], (name, res[name])
    assert connections == 1  # only the driver's own control connection reached the port
    assert not res["socket"]["ok"]
    assert "rc -1" in res["ctypes"]["stdout"], res["ctypes"]
    if shutil.which("curl"):
        assert "curl exit 0" not in res["curl"]["stdout"]
    assert res["environ"]["ok"] and "nothing" in res["environ"]["stdout"], res["environ"]
    assert not files["pwned"]
    assert res["write"]["stdout"].count("refused") == 3, res["write"]
    assert res["kill"]["stdout"].count("refused") == 2, res["kill"]
    assert files["samples"] == "{}\n"
    assert not res["fork_bomb"]["ok"] and not res["memory"]["ok"] and "MemoryError" in res["memory"]["stderr"]
    assert not res["early_exit"]["ok"] and res["early_exit"]["reason"].startswith("exited early")
    deadline = time.monotonic() + 5
    while len(_procs_of(watched)) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_procs_of(watched)) <= before  # nothing of the sandboxes outlived them
    # the pipeline went on: hostile answers are wrong, the real solution right, all isolated
    assert res["stage"] == {"sandbox": "bwrap", "correct": [False, False, False, False, True]}, res["stage"]
