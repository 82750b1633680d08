"""The code sandbox: real HumanEval solutions pass; hostile programs are contained and harm nothing.

The escape attempts run as an unprivileged user (``nobody`` when the tests run as root), since that
is how most people run katdata: they must be contained by the isolation layer, not by root's powers.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from katdata import sources, template
from katdata.backends.scripted import ScriptedBackend
from katdata.errors import KatdataError
from katdata.recipe import load_recipe
from katdata.records import Query
from katdata.runfiles import RowWriter
from katdata.sample import run as sample_run
from katdata.sandbox import SandboxConfig, SandboxUnavailable, humaneval_program, isolation_problem, run_python
from katdata.verify import Verifier

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxConfig(timeout_s=3, cpu_s=3)
NO_BWRAP = {"bwrap": "/nonexistent/bwrap"}

needs_bwrap = pytest.mark.skipif(isolation_problem() is not None, reason=f"no isolation here: {isolation_problem()}")


def _procs_of(uid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
                zombie = "\nState:\tZ" in status
                if status.split("Uid:")[1].split()[0] == str(uid) and not zombie:
                    out.append(int(d.name))
            except (OSError, IndexError):
                pass
    return out


def _wait_gone(uid: int, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while _procs_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _procs_of(uid)


@needs_bwrap
def test_plain_program_runs_in_its_own_folder():
    r = run_python("import os\nprint(os.getcwd())\nopen('out.txt','w').write('ok')\nprint(open('out.txt').read())")
    assert r.ok, r.stderr
    assert r.isolation == "bwrap"
    assert r.stdout.splitlines() == ["/tmp/work", "ok"]  # the end-of-program token is not in stdout


@needs_bwrap
def test_failing_program_is_not_ok():
    r = run_python("assert 1 == 2")
    assert not r.ok and r.reason == "exit 1" and "AssertionError" in r.stderr


@needs_bwrap
def test_humaneval_canonical_solutions_all_pass():
    qs = sources.load("humaneval")
    assert len(qs) == 164

    def one(q):
        prog = humaneval_program(q.meta["canonical_solution"], q.reference, q.meta["prompt"])
        return q.id, run_python(prog, SandboxConfig(timeout_s=30))

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, qs))
    failed = [(i, r.reason, r.stderr[-200:]) for i, r in results if not r.ok]
    assert failed == []
    assert {r.isolation for _, r in results} == {"bwrap"}


@needs_bwrap
def test_humaneval_wrong_solution_fails():
    q = sources.load("humaneval")[0]
    prog = humaneval_program("    return None\n", q.reference, q.meta["prompt"])
    assert not run_python(prog).ok


@needs_bwrap
@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_checks_is_a_fail(exit_call):
    q = sources.load("humaneval")[2]
    body = q.meta["prompt"] + q.meta["canonical_solution"]
    assert run_python(humaneval_program(body, q.reference)).ok  # the control: the same program passes
    r = run_python(humaneval_program(body + "\n" + exit_call + "\n", q.reference))
    assert not r.ok and r.reason.startswith("exited early"), r
    # also from inside the function under test, while the checks run
    q0 = sources.load("humaneval")[0]
    cheat = q0.meta["prompt"] + f"    {exit_call}\n"
    assert not run_python(humaneval_program(cheat, q0.reference)).ok


@needs_bwrap
def test_endless_loop_is_killed():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", FAST)
    assert not r.ok and (r.timed_out or r.reason in ("signal SIGKILL", "signal SIGXCPU"))
    assert time.monotonic() - t0 < 8


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="checks the per-run uid, which is used when katdata runs as root")
def test_sleeping_children_are_killed_with_the_sandbox():
    cfg = FAST.model_copy(update={"timeout_s": 1.5, "uid": 299_002})
    code = "import subprocess, sys, time\nfor _ in range(3):\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)"
    r = run_python(code, cfg)
    assert r.timed_out
    assert _wait_gone(299_002) == []


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="checks the per-run uid, which is used when katdata runs as root")
def test_fork_bomb_is_capped_and_cleaned_up():
    cfg = FAST.model_copy(update={"uid": 299_001, "timeout_s": 2.0, "max_procs": 16})
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    r = run_python(code, cfg)
    assert not r.ok
    assert time.monotonic() - t0 < 10
    assert _wait_gone(299_001) == []  # nothing of the bomb survives


@needs_bwrap
def test_huge_allocation_is_refused():
    r = run_python("x = bytearray(16 * 2**30)\nprint('allocated')", SandboxConfig(memory_mb=512))
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


@needs_bwrap
def test_huge_file_is_refused():
    r = run_python("f = open('big', 'wb')\nf.write(b'x' * (8 * 2**20))\nf.close()\nprint('wrote')",
                   SandboxConfig(file_size_mb=1))
    assert not r.ok and "wrote" not in r.stdout


@needs_bwrap
def test_socket_shim_message():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 1))", FAST)
    assert not r.ok and "network access is disabled" in r.stderr


# ---------------------------------------------------------------- escapes, as an unprivileged user

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
attempts, port, secret = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
control = socket.create_connection(("127.0.0.1", port), timeout=5)  # unsandboxed: the port is reachable
control.close()
out = {"uid": os.getuid(), "control_env": secret in open("/proc/%d/environ" % os.getpid()).read()}
for name, code in attempts.items():
    cfg = SandboxConfig(timeout_s=4, cpu_s=4, max_procs=16)
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


def _unprivileged(argv: list[str]) -> list[str]:
    """argv as `nobody` when we are root (with the system interpreter, which nobody can run)."""
    if os.geteuid() != 0:
        return [sys.executable] + argv
    python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if not (python and shutil.which("setpriv")):
        pytest.skip("needs setpriv and a system python of this version to drop to nobody")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python] + argv


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
def test_escape_attempts_as_an_unprivileged_user_are_contained():
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    base = Path(tempfile.mkdtemp(prefix="katdata-escape-", dir="/var/tmp"))  # not under /tmp: the sandbox has its own
    outside, run_dir = base / "outside", base / "runs" / "demo"
    run_dir.mkdir(parents=True)
    outside.mkdir()
    (run_dir / "samples.jsonl").write_text("{}\n")
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    for p in (base, outside, run_dir.parent, run_dir, run_dir / "samples.jsonl", driver):  # the user's own files
        os.chown(p, nobody, -1)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    secret = "katdata-secret-" + os.urandom(8).hex()
    server = Listener()
    before = len(_procs_of(nobody))
    try:
        attempts = {k: v.format(port=server.port, secret=secret, outside=outside, run_dir=run_dir)
                    for k, v in ATTEMPTS.items()}
        env = {"PATH": "/usr/bin:/bin", "KATDATA_TEST_TOKEN": secret,
               "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}"}
        argv = [str(driver), json.dumps(attempts), str(server.port), secret, str(run_dir / "stage")]
        proc = subprocess.run(_unprivileged(argv),
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        connections = server.accepted
        files = {"pwned": [p for p in (outside / "pwned.txt", run_dir / "pwned.txt") if p.exists()],
                 "samples": (run_dir / "samples.jsonl").read_text()}
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    assert res["uid"] == nobody and res["alive"]  # the driver survived kill(-1) and the fork bomb
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
    while len(_procs_of(nobody)) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_procs_of(nobody)) <= before  # nothing of the sandboxes outlived them
    # the pipeline went on: hostile answers are wrong, the real solution right, all isolated
    assert res["stage"] == {"sandbox": "bwrap", "correct": [False, False, False, False, True]}, res["stage"]


# ---------------------------------------------------------------- no isolation layer

def test_no_isolation_layer_refuses_with_a_fix():
    cfg = SandboxConfig(**NO_BWRAP)
    assert "not an executable file" in isolation_problem(cfg)
    with pytest.raises(SandboxUnavailable) as err:
        run_python("print(1)", cfg)
    msg = str(err.value)
    assert "sandbox.allow_unisolated" in msg and "bubblewrap" in msg and "user namespaces" in msg
    # a bwrap that cannot make its namespaces (as in a container without user namespaces) fails its probe
    broken = SandboxConfig(bwrap=shutil.which("false") or "/bin/false")
    assert "the bwrap probe failed" in isolation_problem(broken)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        run_python("print(1)", broken)


def test_unisolated_runs_only_when_allowed_and_says_so():
    r = run_python("import os\nprint(os.environ.get('PATH'))", SandboxConfig(allow_unisolated=True, **NO_BWRAP))
    assert r.ok and r.isolation == "none" and r.stdout.strip() == "/usr/bin:/bin"
    r = run_python("import sys\nsys.exit(0)", SandboxConfig(allow_unisolated=True, **NO_BWRAP))
    assert not r.ok and r.reason.startswith("exited early")


def _recipe(tmp_path: Path, sandbox: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"sources": [{"name": "humaneval"}]},
                                    "sample": {"n": 2, "rounds": [], "grader_engine": None}, "vote": {"n": 2},
                                    "sandbox": sandbox}))
    return path


def _code_queries(run_dir: Path) -> list[Query]:
    qs = sources.load("humaneval")[:2]
    with RowWriter(run_dir / "queries.jsonl") as w:
        w.write_all(qs)
    return qs


def test_sample_stage_refuses_before_any_model_loads(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, NO_BWRAP))
    _code_queries(tmp_path)

    def engine(name):
        raise AssertionError("no engine may load when code cannot be isolated")

    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        sample_run(recipe.sample, tmp_path, engine)
    assert not (tmp_path / "samples.jsonl").exists()


def test_a_run_with_code_queries_refuses_before_the_first_stage(tmp_path, monkeypatch):
    """The pipeline checks the isolation layer before tagging loads a model: no run folder is made."""
    from katdata import pipeline

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(_recipe(tmp_path, NO_BWRAP))
    monkeypatch.setattr(pipeline.Engines, "__call__", lambda self, name="default": pytest.fail("an engine was built"))
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        pipeline.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sample_stage_unisolated_when_allowed_records_it(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, {"allow_unisolated": True, **NO_BWRAP}))
    qs = {q.query: q for q in _code_queries(tmp_path)}

    def script(req, i):
        q = next(q for text, q in qs.items() if text in req.messages[-1]["content"])
        code = q.meta["prompt"] + q.meta["canonical_solution"]
        return ("```python\n" + code + "```\n</answer>") if req.prefix.endswith(template.FORCE_PREFIX["off"]) \
            else "hmm\n</think>\n<answer>\nno\n</answer>"

    stats = sample_run(recipe.sample, tmp_path, lambda name: ScriptedBackend(script=script))
    assert stats["sandbox"] == "unisolated"
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {r["correct"] for r in rows if r["mode"] == "off"} == {True}


def test_recipe_sandbox_section_is_the_one_place(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, {"timeout_s": 3, "allow_unisolated": True}))
    for stage in (recipe.sample, recipe.solve):
        assert Verifier(stage.verify).sandbox == SandboxConfig(timeout_s=3, allow_unisolated=True)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": {"sources": [{"name": "humaneval"}]},
                                   "sample": {"verify": {"sandbox": {"timeout_s": 3}}}}))
    with pytest.raises(KatdataError, match="'sample.verify.sandbox' moved to the top-level 'sandbox:'"):
        load_recipe(old)


@needs_bwrap
def test_code_isolation_is_checked_only_for_code_queries():
    v = Verifier()
    assert v.code_isolation([Query(id="a", query="q", reference="1", kind="numeric")]) is None
    assert v.code_isolation(sources.load("humaneval")[:1]) == "bwrap"


@pytest.mark.parametrize("isolation", ["unisolated", "bwrap"])
def test_card_warns_when_code_ran_unisolated(tmp_path, isolation):
    from test_export import make_records, make_run  # the export tests' small run folder

    from katdata import export

    run = make_run(tmp_path / "run", make_records(4, 4))
    (run / "summary.json").write_text(json.dumps({"stages": {"sample": {"sandbox": isolation, "rows_in": 8}}}))
    export.run(export.ExportConfig(), run, None)
    card = (run / "export" / "README.md").read_text()
    assert ("WITHOUT isolation" in card) == (isolation == "unisolated")
