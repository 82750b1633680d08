"""The KAT reasoning/content split (katdata.reasoning), on synthetic text and deltas.

Every split point of every marker, both modes, truncated at every length, with and without the
leading ``<judge>\\n``, forced-mode prefixes; the streamed parts always join to the whole-text split,
and the content is the answer alone (no ``</answer>``; tool-call blocks after it kept, other text dropped).
The vLLM parser class over it is exercised here on the real tokenizer (marked vllm), and against a
real server in test_serve.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from katdata import servers, template
from katdata.chat_template import render_chat
from katdata.reasoning import Split, StreamSplitter, answer_text, split
from katdata.template import FORCE_PREFIX, GENERATION_PREFIX, MARKERS

JUDGE = "A short question that needs a small calculation."
THINK = "2 apples plus 3 apples.\nThat is 5."
ANSWER = "There are 5 apples."
RESPONSES = {
    "on": template.render("on", JUDGE, ANSWER, THINK),
    "off": template.render("off", JUDGE, ANSWER),
}


def expected(full: str) -> tuple[str, str]:
    """(reasoning, content) of a complete rendered response, by its layout: content is the answer."""
    k = full.index("<answer>\n", full.index("</judge>")) + len("<answer>\n")
    return full[:k], full[k:full.rindex("\n</answer>")]


def stream(text: str, cuts, prefix=GENERATION_PREFIX) -> tuple[str, str, StreamSplitter]:
    s = StreamSplitter(prefix)
    r = c = ""
    points = [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(points, points[1:]):
        dr, dc = s.feed(text[a:b])
        assert text[a:b].startswith(dr)  # reasoning comes at once, in order
        r, c = r + dr, c + dc
    return r, c, s


def case(mode: str, leading_judge: bool) -> tuple[str, str]:
    """(text, prefix): the whole response, or the part after the pre-filled ``<judge>\n``."""
    full = RESPONSES[mode]
    return (full, "") if leading_judge else (full[len(GENERATION_PREFIX):], GENERATION_PREFIX)


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("leading_judge", [True, False])
def test_whole_text_split_both_modes(mode, leading_judge):
    text, prefix = case(mode, leading_judge)
    parts = split(text, prefix)
    reasoning, content = expected(text)
    assert (parts.reasoning, parts.content, parts.mode, parts.ended) == (reasoning, content, mode, True)
    assert parts.content == ANSWER and parts.closed and parts.dropped == ""
    assert parts.reasoning + parts.content + "\n</answer>" == text
    assert ("<think_on>" if mode == "on" else "<think_off>") in parts.reasoning  # the mode, readable


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("leading_judge", [True, False])
def test_every_split_point_of_every_marker(mode, leading_judge):
    text, prefix = case(mode, leading_judge)
    want = split(text, prefix)
    checked = 0
    for marker in MARKERS:
        start = text.find(marker)
        while start >= 0:
            end = start + len(marker) + (text[start + len(marker):].startswith("\n"))  # with its newline
            for cut in range(start, end + 1):
                r, c, s = stream(text, [cut], prefix)
                assert (r, c, s.mode) == (want.reasoning, want.content, mode), (marker, cut)
                checked += 1
            # the marker split at two points at once, and its last character fused with the newline
            for cut in range(start + 1, end):
                r, c, _ = stream(text, [start + 1, cut, end], prefix)
                assert (r, c) == (want.reasoning, want.content), (marker, cut)
            start = text.find(marker, start + 1)
    assert checked > 40
    r, c, _ = stream(text, range(len(text)), prefix)  # one character per delta
    assert (r, c) == (want.reasoning, want.content)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_truncated_at_every_length_is_reasoning_until_the_answer_opens(mode):
    text = RESPONSES[mode][len(GENERATION_PREFIX):]
    k = len(expected(text)[0])
    end = len(text) - len("\n</answer>")
    for n in range(len(text) + 1):
        part = text[:n]
        parts = split(part)
        if n < k:  # the opener is incomplete (or the character after <answer> has not come yet)
            assert (parts.reasoning, parts.content, parts.ended) == (part, "", False), n
        else:  # a cut inside the closing "\n</answer>" leaves the answer whole, never part of the tag
            assert (parts.reasoning, parts.content, parts.ended) == (text[:k], text[k:min(n, end)], True), n
            assert parts.closed == (n == len(text))
        r, c, _ = stream(part, range(0, n, 3))
        assert (r, c) == (parts.reasoning, parts.content)
        mode_tag = "<think_on>" if mode == "on" else "<think_off>"
        assert parts.mode == (mode if mode_tag in part else None)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_forced_mode_prefix(mode):
    """A pre-fill that forces the mode: the completion continues after it."""
    full = RESPONSES[mode]
    prefix = f"{GENERATION_PREFIX}{JUDGE}\n</judge>\n\n{FORCE_PREFIX[mode]}"
    assert full.startswith(prefix)
    completion = full[len(prefix):]
    parts = split(completion, prefix)
    assert parts.mode == mode and parts.ended
    if mode == "off":  # the pre-fill opened the answer already: all content
        assert (parts.reasoning, parts.content) == ("", ANSWER)
    else:
        assert parts.reasoning == THINK + "\n</think>\n<answer>\n"
        assert parts.content == ANSWER
    r, c, _ = stream(completion, range(len(completion)), prefix)
    assert (r, c) == (parts.reasoning, parts.content)


def test_tolerated_layouts():
    # a blank line before <answer>, an opener without its newline
    blank = f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\nx\n</think>\n\n<answer>\n42\n</answer>"
    assert split(blank).content == "42"
    tight = f"{JUDGE}\n</judge>\n\n<think_off>\n<answer>42"
    assert (split(tight).content, split(tight[:-2]).ended) == ("42", False)
    # <answer> inside the think block does not open the answer; in the judge neither
    inside = f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\nwrite <answer>\nlater\n</think>\n<answer>\n42"
    assert split(inside).content == "42"
    early = "Use <answer>\n tags.\n</judge>\n\n<think_off>\n<answer>\n42"
    assert split(early).content == "42"
    # no mode tag: the first <answer> after the judge still opens the answer (the mode stays unknown)
    assert (split(f"{JUDGE}\n</judge>\n\n<answer>\n42").content, split(f"{JUDGE}\n</judge>\n<answer>\n42").mode) == ("42", None)
    # no markers at all (a model that ignores the format): all reasoning
    assert split("Just an answer.") == Split("Just an answer.", "", None, False)
    # the prefix is not part of the result
    assert split("", GENERATION_PREFIX).reasoning == ""
    assert answer_text("42\n</answer>\n") == "42" and answer_text("42") == "42"
    assert answer_text("42</answer>more") == "42"


OFF_HEAD = f"{JUDGE}\n</judge>\n\n<think_off>\n<answer>\n"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def agree(text: str, prefix: str = GENERATION_PREFIX) -> Split:
    """The whole-text split, checked against one character per delta and against three-character deltas."""
    want = split(text, prefix)
    for step in (1, 3):
        r, c, s = stream(text, range(0, len(text), step), prefix)
        assert (r, c, s.dropped) == (want.reasoning, want.content, want.dropped), step
    return want


@pytest.mark.parametrize("answer", ["42", "", "line one\nline two\n\nend", "a < b and </answ is not a tag",
                                    "x\n", "ends with <"])
def test_content_is_the_answer_alone(answer):
    parts = agree(f"{OFF_HEAD}{answer}\n</answer>")
    assert (parts.content, parts.closed, parts.dropped) == (answer, True, "")
    assert "</answer>" not in parts.reasoning + parts.content
    # a close without its own newline: a newline right before </answer> still belongs to the tag
    assert agree(f"{OFF_HEAD}{answer}</answer>").content == answer.removesuffix("\n")


def test_text_after_the_answer_is_dropped_tool_calls_stay():
    parts = agree(f"{OFF_HEAD}42\n</answer>\nP.S. more text<|im_end|>")
    assert (parts.content, parts.dropped) == ("42", "\nP.S. more text<|im_end|>")
    # tool-call blocks right after the answer, as a hermes tool parser reads them (content before the first)
    parts = agree(f"{OFF_HEAD}Let me add.\n</answer>\n{CALL}\n{CALL}\ntrailing")
    assert parts.content == f"Let me add.{CALL}{CALL}"
    assert parts.dropped == "\n\n\ntrailing"
    # a call cut off mid-block: what has arrived is content (the tool parser handles partial blocks)
    parts = agree(f"{OFF_HEAD}ok\n</answer>\n{CALL[:20]}")
    assert (parts.content, parts.dropped) == ("ok" + CALL[:20], "\n")
    # a think-on reply with a call: reasoning keeps the think block and the mode
    on = f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\n{THINK}\n</think>\n<answer>\nCalling.\n</answer>\n{CALL}"
    parts = agree(on)
    assert parts.content == "Calling." + CALL and parts.mode == "on" and THINK in parts.reasoning


def test_cut_before_the_answer_has_empty_content():
    for text in (f"{JUDGE}\n</judge>\n\n<think_on>\n<think>\nstill thinking", f"{JUDGE}\n</judge>\n\n<think_off>\n<ans"):
        parts = agree(text)
        assert (parts.content, parts.ended, parts.reasoning) == ("", False, text)


def test_import_katdata_reasoning_loads_no_vllm():
    code = "import sys, katdata, katdata.reasoning; print(any(m.split('.')[0] in ('vllm', 'torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- the vLLM parser class, without a server
# (the same class in a real vLLM server: tests/test_serve.py)
JUDGE_ON = "The sum needs a short calculation, so a brief chain of thought helps."
JUDGE_OFF = "This recalls one well-known fact, so no reasoning is needed."
RECORDS = [("What is 17 + 25?", template.render("on", JUDGE_ON, "42", think="17 + 25 = 42."))]


@pytest.mark.vllm
def test_parser_class_on_token_ids(tokenizer):
    """The vLLM class on the real tokenizer: reasoning end found on the prompt's and the output's ids
    (markers are several tokens), forced modes read from the request, the stop added without tools."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from katdata.vllm_reasoning import ANSWER_STOP, KatReasoningParser

    parser = KatReasoningParser(tokenizer)
    query, response = RECORDS[0]
    msgs = [{"role": "user", "content": query}]
    prompt = tokenizer(render_chat(msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    output = tokenizer(response[len(GENERATION_PREFIX):], add_special_tokens=False)["input_ids"]
    assert not parser.is_reasoning_end(prompt)
    assert parser.is_reasoning_end(prompt + output)
    k = next(i for i in range(len(output) + 1) if parser.is_reasoning_end(prompt + output[:i]))
    assert tokenizer.decode(output[:k]).endswith("<answer>\n")  # ends right after the opener
    assert not parser.is_reasoning_end_streaming(prompt + output[:k - 1], output[k - 2:k - 1])
    assert parser.is_reasoning_end_streaming(prompt + output[:k], output[k - 1:k])
    forced = prompt[:-len(tokenizer("<judge>\n", add_special_tokens=False)["input_ids"])] + tokenizer(
        response[:response.index("<answer>\n") + 9], add_special_tokens=False)["input_ids"]
    assert parser.is_reasoning_end(forced)  # a pre-fill that opened the answer: all content
    assert parser.count_reasoning_tokens(output) == k
    request = ChatCompletionRequest(model="m", messages=msgs)
    assert parser.extract_reasoning(response[len(GENERATION_PREFIX):], request) == (
        response[len(GENERATION_PREFIX):response.index("<answer>\n") + 9], "42")  # the answer alone
    prefill_off = f"{GENERATION_PREFIX}{JUDGE_OFF}\n</judge>\n\n{FORCE_PREFIX['off']}"
    cont = ChatCompletionRequest(model="m", messages=msgs + [{"role": "assistant", "content": prefill_off}],
                                 continue_final_message=True, add_generation_prompt=False)
    assert parser.extract_reasoning("Paris", cont) == (None, "Paris")
    # the Qwen3-style switch, from the request or as vLLM hands the effective kwargs to the parser
    for kwargs in ({"enable_thinking": False}, {"think_mode": "off"}):
        off = ChatCompletionRequest(model="m", messages=msgs, chat_template_kwargs=kwargs)
        assert parser.extract_reasoning("Paris\n</answer>", off) == (None, "Paris")
        assert KatReasoningParser(tokenizer, chat_template_kwargs=kwargs).extract_reasoning("Paris", request) == (
            None, "Paris")
    on = ChatCompletionRequest(model="m", messages=msgs, chat_template_kwargs={"enable_thinking": True})
    assert parser.extract_reasoning("17 + 25 = 42.\n</think>\n<answer>\n42", on) == (
        "17 + 25 = 42.\n</think>\n<answer>\n", "42")
    assert ANSWER_STOP in parser.adjust_request(request).stop
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert not parser.adjust_request(ChatCompletionRequest(model="m", messages=msgs, tools=tools)).stop


@pytest.mark.vllm
def test_parser_class_streams_the_answer_alone(tokenizer):
    """Streamed token by token as vLLM's server calls it: the reasoning phase does not end at <answer>
    (vLLM would pass ``</answer>`` through unfiltered), content is the answer; a tool call after
    ``</answer>`` ends it so that the tool parser gets the block; other text there is dropped and logged."""
    from katdata import vllm_reasoning
    from katdata.vllm_reasoning import KatReasoningParser

    query, response = RECORDS[0]
    prompt = tokenizer(render_chat([{"role": "user", "content": query}], add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 17, "b": 25}}\n</tool_call>'
    for tail, content_want, ends in (("", "42", False), ("\nP.S. extra", "42", False),
                                     ("\n" + call, "42" + call, True)):
        parser = KatReasoningParser(tokenizer)
        parser.adjust_initial_state_from_prompt(prompt)
        ids = tokenizer(response[len(GENERATION_PREFIX):] + tail, add_special_tokens=False)["input_ids"]
        reasoning = content = previous = ""
        ended_at = None
        dropped_before = vllm_reasoning.DROPPED["chars"]
        for i in range(len(ids)):
            current = tokenizer.decode(ids[:i + 1])
            delta = parser.extract_reasoning_streaming(previous, current, current[len(previous):], ids[:i],
                                                       ids[:i + 1], ids[i:i + 1])
            previous = current
            if delta is not None:
                reasoning += delta.reasoning or ""
                content += delta.content or ""
            if parser.is_reasoning_end_streaming(prompt + ids[:i + 1], ids[i:i + 1]):
                ended_at = i
                break
        assert reasoning == response[len(GENERATION_PREFIX):response.index("<answer>\n") + 9]
        if ends:  # vLLM hands the rest to the tool parser from here on
            assert ended_at is not None and content.startswith("42<tool_call>") and content_want.startswith(content)
        else:
            assert ended_at is None and content == content_want and "</answer>" not in content
        assert vllm_reasoning.DROPPED["chars"] - dropped_before == (len("P.S.extra") if "P.S." in tail else 0)


@pytest.mark.vllm
def test_entry_point_registers_the_parser(tmp_path):
    """vLLM's general-plugin loader finds the `vllm.general_plugins` entry point and registers `kat`
    (a stand-in distribution carries pyproject's entry point, as an installed katdata would)."""
    dist = tmp_path / "katdata_entry_point_check-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: katdata-entry-point-check\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nkat = katdata.vllm_reasoning:register\n")
    code = ("from vllm.plugins import load_general_plugins\nfrom vllm.reasoning import ReasoningParserManager\n"
            "assert 'kat' not in ReasoningParserManager.list_registered()\nload_general_plugins()\n"
            "print(ReasoningParserManager.get_reasoning_parser('kat').__module__)")
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root, os.environ.get("PYTHONPATH", "")])}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "katdata.vllm_reasoning"


def test_serve_enables_hermes_tool_calls(tmp_path, monkeypatch):
    """`katdata serve` starts vLLM with --enable-auto-tool-choice --tool-call-parser hermes (the layout KAT's
    template writes tool calls in), or another parser, or none; checked on the flags, without vLLM."""
    args = servers.kat_args(tmp_path / "t.jinja")
    assert args[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert args[args.index("--reasoning-parser") + 1] == "kat" and (tmp_path / "t.jinja").read_text()
    assert "--enable-auto-tool-choice" not in servers.kat_args(tmp_path / "t.jinja", None)
    seen = []

    class Stop(Exception):
        pass

    def fake_start(model, port, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(servers, "start", fake_start)
    for argv, want in (([], "hermes"), (["--tool-call-parser", "none"], None),
                       (["--tool-call-parser", "pythonic"], "pythonic")):
        with pytest.raises(Stop):
            servers.main(argv)
        assert seen[-1]["tool_parser"] == want and seen[-1]["kat"] is True
