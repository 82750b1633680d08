"""The code sandbox: real HumanEval solutions pass; hostile programs are stopped and harm nothing."""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from katdata import sources
from katdata.sandbox import SandboxConfig, can_isolate, humaneval_program, run_python

FAST = SandboxConfig(timeout_s=3, cpu_s=3)


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


def test_plain_program_runs_in_its_own_folder():
    r = run_python("import os\nprint(os.getcwd())\nopen('out.txt','w').write('ok')\nprint(open('out.txt').read())")
    assert r.ok, r.stderr
    assert r.stdout.splitlines()[-1] == "ok"
    assert r.stdout.splitlines()[0] != os.getcwd()


def test_failing_program_is_not_ok():
    r = run_python("assert 1 == 2")
    assert not r.ok and r.reason == "exit 1" and "AssertionError" in r.stderr


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


def test_humaneval_wrong_solution_fails():
    q = sources.load("humaneval")[0]
    prog = humaneval_program("    return None\n", q.reference, q.meta["prompt"])
    assert not run_python(prog).ok


def test_endless_loop_is_killed():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", FAST)
    assert not r.ok and (r.timed_out or r.reason in ("signal SIGKILL", "signal SIGXCPU"))
    assert time.monotonic() - t0 < 8


def test_sleeping_children_are_killed_with_the_group(tmp_path):
    cfg = FAST.model_copy(update={"timeout_s": 1.5, "uid": 299_002})
    code = "import subprocess, sys, time\nfor _ in range(3):\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)"
    r = run_python(code, cfg)
    assert r.timed_out
    if can_isolate():
        assert "uid" in r.isolation
        deadline = time.monotonic() + 5
        while _procs_of(299_002) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _procs_of(299_002) == []


@pytest.mark.skipif(not can_isolate(), reason="the uid/namespace layers need root")
def test_fork_bomb_is_capped_and_cleaned_up():
    uid = 299_001
    cfg = FAST.model_copy(update={"uid": uid, "timeout_s": 2.0, "max_procs": 16})
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    r = run_python(code, cfg)
    assert not r.ok
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while _procs_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _procs_of(uid) == []  # nothing of the bomb survives


def test_huge_allocation_is_refused():
    r = run_python("x = bytearray(16 * 2**30)\nprint('allocated')", SandboxConfig(memory_mb=512))
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_huge_file_is_refused():
    r = run_python("f = open('big', 'wb')\nf.write(b'x' * (8 * 2**20))\nf.close()\nprint('wrote')",
                   SandboxConfig(file_size_mb=1))
    assert not r.ok and "wrote" not in r.stdout


@pytest.mark.skipif(not can_isolate(), reason="the uid/namespace layers need root")
def test_writing_outside_its_folder_harms_nothing(tmp_path):
    os.chmod(tmp_path, 0o755)
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    escape = Path("/tmp") / f"katdata-escape-{os.getpid()}.txt"
    code = (f"for p in [{str(victim)!r}, {str(tmp_path / 'new.txt')!r}, {str(escape)!r}]:\n"
            "    try:\n        open(p, 'w').write('pwned')\n        print('wrote', p)\n"
            "    except OSError as e:\n        print('refused', p, type(e).__name__)\n")
    r = run_python(code, FAST)
    assert victim.read_text() == "intact"
    assert not (tmp_path / "new.txt").exists()
    assert not escape.exists()  # /tmp inside the sandbox is a private tmpfs
    assert r.stdout.count("refused") == 2


def test_opening_a_socket_reaches_nothing():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(server.accept())
        except OSError:
            pass

    code = (f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
            "print('connected')")
    r = run_python(code, FAST)
    t = threading.Thread(target=accept)
    t.start()
    t.join()
    server.close()
    assert not r.ok and "connected" not in r.stdout
    assert got == []
    r2 = run_python("import socket\nsocket.create_connection(('127.0.0.1', 1))", FAST)
    assert not r2.ok and "network access is disabled" in r2.stderr
