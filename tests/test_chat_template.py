"""The KAT chat template: exact strings, through jinja and through a real tokenizer.

Expected strings are written by hand from /work/shared/kat-format.md sections 1, 1b, 2 and 3.
"""

import pytest

from katdata.chat_template import (GENERATION_PROMPT, NEUTRAL_JUDGE_PROMPT, chat_template_kwargs, render_chat,
                                   template_text, think_mode_of)
from katdata.prompt_files import read_prompt
from katdata.sample import SampleConfig, mode_prefix
from katdata.template import history_answer, parse, render

ON = render("on", "Needs steps.", "4", think="2+2=4")
OFF = render("off", "Recall only.", "Paris")
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

CHATS = {
    "single-turn prompt": (
        [{"role": "user", "content": "2+2?"}], True,
        SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<judge>\n",
    ),
    "single-turn with system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<judge>\n",
    ),
    "training sample": (
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ON}], False,
        SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" + ON + "<|im_end|>\n",
    ),
    "multi-turn: on and off history reduced to answers, last turn full": (
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ON},
         {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": OFF},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": ON.replace("4", "6")}], False,
        SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n" + ON.replace("4", "6") + "<|im_end|>\n",
    ),
    "history without answer tags, then a generation prompt": (
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<judge>\nx\n</judge>\n\n<think_off>\n\nA1"},
         {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nB1"},
         {"role": "user", "content": "c"}], True,
        SYS + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\nB1<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<judge>\n",
    ),
}


@pytest.mark.parametrize("name", sorted(CHATS))
def test_render_chat_exact(name):
    messages, gen, expected = CHATS[name]
    assert render_chat(messages, add_generation_prompt=gen) == expected


def test_plain_turn_has_no_judge_prefill():
    text = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True, prefill_judge=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_training_variant_only_adds_generation_markers():
    train, infer = template_text(training=True), template_text(training=False)
    assert "{%- generation -%}" in train and "{%- endgeneration -%}" in train
    assert "{%- generation" not in infer and "endgeneration" not in infer
    assert len(train.splitlines()) - len(infer.splitlines()) == 4


@pytest.fixture(scope="module")
def tokenizer():
    import transformers
    from katdata.model import embedded_path

    return transformers.AutoTokenizer.from_pretrained(str(embedded_path()))


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("training", [False, True])
def test_tokenizer_renders_the_same(tokenizer, name, training):
    messages, gen, expected = CHATS[name]
    text = tokenizer.apply_chat_template(messages, chat_template=template_text(training), tokenize=False,
                                         add_generation_prompt=gen)
    assert text == expected


def test_training_mask_covers_the_completion_after_the_prefill(tokenizer):
    messages = CHATS["training sample"][0]
    out = tokenizer.apply_chat_template(messages, chat_template=template_text(training=True), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    unmasked_prefix = tokenizer.decode(ids[: mask.index(1)])
    assert unmasked_prefix.endswith("<|im_start|>assistant\n<judge>\n")
    assert masked == ON[len("<judge>\n"):] + "<|im_end|>"


# --- request-level mode control (think_mode) ------------------------------------------------------

NEUTRAL = "The response mode for this query is fixed in advance."
FORCED = {
    "on": "<|im_start|>assistant\n<judge>\n" + NEUTRAL + "\n</judge>\n\n<think_on>\n<think>\n",
    "off": "<|im_start|>assistant\n<judge>\n" + NEUTRAL + "\n</judge>\n\n<think_off>\n<answer>\n",
}
ASK = [{"role": "user", "content": "Capital of France?"}]
ASK_TEXT = SYS + "<|im_start|>user\nCapital of France?<|im_end|>\n"


@pytest.mark.parametrize("mode", ["on", "off"])
def test_think_mode_prefills_the_neutral_judge_and_the_mode_tag(mode):
    text = render_chat(ASK, add_generation_prompt=True, think_mode=mode)
    assert text == ASK_TEXT + FORCED[mode]
    # what the model then writes completes a well-formed response of that mode
    completion = "Paris\n</answer>" if mode == "off" else "Recall.\n</think>\n<answer>\nParis\n</answer>"
    parsed = parse(text.split("<|im_start|>assistant\n")[-1] + completion)
    assert parsed.ok and parsed.mode == mode and parsed.answer == "Paris"


def test_think_mode_auto_is_the_default_render():
    assert render_chat(ASK, add_generation_prompt=True, think_mode="auto") == ASK_TEXT + GENERATION_PROMPT
    assert render_chat(ASK, add_generation_prompt=True) == ASK_TEXT + GENERATION_PROMPT


@pytest.mark.parametrize("mode", ["on", "off"])
def test_think_mode_prefix_is_the_samplers_forced_prefix(mode):
    neutral = read_prompt(SampleConfig().neutral_judge)
    assert neutral.strip() == NEUTRAL == read_prompt(NEUTRAL_JUDGE_PROMPT).strip()
    text = render_chat(ASK, add_generation_prompt=True, think_mode=mode)
    assert text == ASK_TEXT + "<|im_start|>assistant\n" + mode_prefix(mode, neutral)


def test_think_mode_leaves_a_rendered_conversation_alone():
    messages = CHATS["training sample"][0]
    for mode in ("on", "off"):
        assert render_chat(messages, think_mode=mode) == CHATS["training sample"][2]


def test_think_mode_errors():
    with pytest.raises(ValueError, match="think_mode"):
        render_chat(ASK, add_generation_prompt=True, think_mode="fast")
    with pytest.raises(ValueError, match="prefill_judge"):
        render_chat(ASK, add_generation_prompt=True, prefill_judge=False, think_mode="off")
    with pytest.raises(ValueError, match="think_mode"):
        chat_template_kwargs("yes")


def test_chat_template_kwargs_is_what_a_client_sends():
    assert chat_template_kwargs("off") == {"think_mode": "off"}
    assert chat_template_kwargs() == {"think_mode": "auto"}


def test_vllm_keeps_think_mode_among_the_request_kwargs():
    """vLLM drops request chat_template_kwargs the template does not read (jinja2.meta undeclared names)."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    names = meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template_text()))
    assert {"think_mode", "enable_thinking", "tools", "messages", "add_generation_prompt"} <= names


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
@pytest.mark.parametrize("training", [False, True])
def test_tokenizer_takes_think_mode(tokenizer, mode, training):
    text = tokenizer.apply_chat_template(ASK, chat_template=template_text(training), tokenize=False,
                                         add_generation_prompt=True, think_mode=mode)
    assert text == ASK_TEXT + FORCED.get(mode, GENERATION_PROMPT)
    assert text == render_chat(ASK, add_generation_prompt=True, think_mode=mode)


ENABLE_THINKING = {True: "on", False: "off", None: "auto"}  # Qwen3-style switch -> KAT mode


@pytest.mark.parametrize("thinking", [True, False, None])
@pytest.mark.parametrize("training", [False, True])
def test_enable_thinking_is_accepted_like_think_mode(tokenizer, thinking, training):
    """chat_template_kwargs={"enable_thinking": false} (Qwen3-style clients): true -> on, false -> off,
    absent -> auto, in the template as a tokenizer (and vLLM) renders it and in render_chat."""
    mode = ENABLE_THINKING[thinking]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    text = tokenizer.apply_chat_template(ASK, chat_template=template_text(training), tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    assert text == ASK_TEXT + FORCED.get(mode, GENERATION_PROMPT)
    assert render_chat(ASK, add_generation_prompt=True, enable_thinking=thinking) == text
    assert think_mode_of(kwargs) == mode


def test_think_mode_wins_over_enable_thinking_and_bad_values_are_refused(tokenizer):
    import jinja2

    both = {"think_mode": "on", "enable_thinking": False}
    assert think_mode_of(both) == "on" and think_mode_of({"think_mode": None, "enable_thinking": False}) == "off"
    assert render_chat(ASK, add_generation_prompt=True, **both) == ASK_TEXT + FORCED["on"]
    assert tokenizer.apply_chat_template(ASK, chat_template=template_text(), tokenize=False,
                                         add_generation_prompt=True, **both) == ASK_TEXT + FORCED["on"]
    for bad in ("false", 0):
        with pytest.raises(ValueError, match="enable_thinking"):
            think_mode_of({"enable_thinking": bad})
        with pytest.raises(ValueError, match="enable_thinking"):
            render_chat(ASK, add_generation_prompt=True, enable_thinking=bad)
        with pytest.raises((jinja2.TemplateError, ValueError), match="enable_thinking"):
            tokenizer.apply_chat_template(ASK, chat_template=template_text(), tokenize=False,
                                          add_generation_prompt=True, enable_thinking=bad)


def test_tokenizer_refuses_an_unknown_think_mode(tokenizer):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="think_mode"):
        tokenizer.apply_chat_template(ASK, chat_template=template_text(), tokenize=False,
                                      add_generation_prompt=True, think_mode="fast")


# --- tools (kat-format.md section 1b), expected bytes written from the spec -----------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville <nom> & date, en °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "day": {"type": "integer"}},
                   "required": ["city"]}}}
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
                '"Météo d\'une ville <nom> & date, en °C", "parameters": {"type": "object", "properties": '
                '{"city": {"type": "string"}, "day": {"type": "integer"}}, "required": ["city"]}}}')
ADD = {"name": "add", "description": "Add two numbers.",
       "parameters": {"type": "object", "properties": {"b": {"type": "number"}, "a": {"type": "number"}}}}
ADD_JSON = ('{"name": "add", "description": "Add two numbers.", "parameters": {"type": "object", '
            '"properties": {"b": {"type": "number"}, "a": {"type": "number"}}}}')
TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
TOOLS_SYS = "<|im_start|>system\n" + TOOLS_INTRO + "\n" + WEATHER_JSON + "\n" + ADD_JSON + TOOLS_OUTRO
CALL_PARIS = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "day": 2}}}
CALL_PARIS_TEXT = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "day": 2}}\n</tool_call>'
CALL_ADD = {"name": "add", "arguments": '{"a":1,"b":2}'}  # bare call, arguments already a JSON string: kept
CALL_ADD_TEXT = '\n<tool_call>\n{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call>'
U = [{"role": "user", "content": "Weather in Zürich?"}]
U_TEXT = "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
FINAL = render("off", "A tool result to pass on.", "Sunny, 21 °C.")

TOOL_CHATS = {
    "tools without a system message: empty system text, several tools in order, non-ASCII kept": (
        U, [WEATHER, ADD], True,
        TOOLS_SYS + U_TEXT + "<|im_start|>assistant\n<judge>\n",
    ),
    "tools with a system message": (
        [{"role": "system", "content": "Be brief."}] + U, [WEATHER], True,
        "<|im_start|>system\nBe brief." + TOOLS_INTRO + "\n" + WEATHER_JSON + TOOLS_OUTRO + U_TEXT
        + "<|im_start|>assistant\n<judge>\n",
    ),
    "assistant with content and calls, no content, consecutive tool messages merged": (
        U + [{"role": "assistant", "content": "Checking.", "tool_calls": [CALL_PARIS]},
             {"role": "tool", "content": '{"sky": "sunny"}'},
             {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS, CALL_ADD]},
             {"role": "tool", "content": "21"}, {"role": "tool", "content": "3"},
             {"role": "assistant", "content": "", "tool_calls": [CALL_ADD]},
             {"role": "tool", "content": "3"},
             {"role": "user", "content": "Thanks"}], [WEATHER, ADD], True,
        TOOLS_SYS + U_TEXT
        + "<|im_start|>assistant\nChecking." + CALL_PARIS_TEXT + "<|im_end|>\n"
        + '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>\n'
        + "<|im_start|>assistant" + CALL_PARIS_TEXT + CALL_ADD_TEXT + "<|im_end|>\n"
        + "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant" + CALL_ADD_TEXT + "<|im_end|>\n"
        + "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        + "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<judge>\n",
    ),
    "earlier KAT response with a call is reduced to its answer; final turn in full": (
        U + [{"role": "assistant", "content": render("off", "Needs live data.", "Let me look it up."),
              "tool_calls": [CALL_PARIS]},
             {"role": "tool", "content": "sunny, 21"},
             {"role": "assistant", "content": FINAL}], [WEATHER], False,
        "<|im_start|>system\n" + TOOLS_INTRO + "\n" + WEATHER_JSON + TOOLS_OUTRO + U_TEXT
        + "<|im_start|>assistant\nLet me look it up." + CALL_PARIS_TEXT + "<|im_end|>\n"
        + "<|im_start|>user\n<tool_response>\nsunny, 21\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\n" + FINAL + "<|im_end|>\n",
    ),
    "a final assistant turn that calls a tool is rendered in full": (
        U + [{"role": "assistant", "content": render("off", "Needs live data.", "Looking."),
              "tool_calls": [CALL_PARIS]}], [WEATHER], False,
        "<|im_start|>system\n" + TOOLS_INTRO + "\n" + WEATHER_JSON + TOOLS_OUTRO + U_TEXT
        + "<|im_start|>assistant\n" + render("off", "Needs live data.", "Looking.") + CALL_PARIS_TEXT
        + "<|im_end|>\n",
    ),
    "earlier turn reduced to nothing: no newline before its calls; leading newlines stripped before them": (
        U + [{"role": "assistant", "content": "<judge>\nNeeds live data.\n</judge>\n\n<think_off>\n",
              "tool_calls": [CALL_PARIS]},
             {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "\nOne more.", "tool_calls": [CALL_ADD]},
             {"role": "tool", "content": "3"}], [WEATHER, ADD], True,
        TOOLS_SYS + U_TEXT
        + "<|im_start|>assistant" + CALL_PARIS_TEXT + "<|im_end|>\n"
        + "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\nOne more." + CALL_ADD_TEXT + "<|im_end|>\n"  # section 3: "\nOne more." -> "One more."
        + "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\n<judge>\n",
    ),
    "empty tool list renders as no tools": (
        U, [], True, SYS + U_TEXT + "<|im_start|>assistant\n<judge>\n",
    ),
}


@pytest.mark.parametrize("name", sorted(TOOL_CHATS))
def test_render_chat_tools_exact(name):
    messages, tools, gen, expected = TOOL_CHATS[name]
    assert render_chat(messages, add_generation_prompt=gen, tools=tools) == expected


@pytest.mark.parametrize("name", sorted(TOOL_CHATS))
@pytest.mark.parametrize("training", [False, True])
def test_tokenizer_renders_tools_the_same(tokenizer, name, training):
    messages, tools, gen, expected = TOOL_CHATS[name]
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template_text(training),
                                         tokenize=False, add_generation_prompt=gen)
    assert text == expected


def test_tools_and_think_mode_together(tokenizer):
    expected = TOOLS_SYS + U_TEXT + FORCED["off"]
    assert render_chat(U, add_generation_prompt=True, tools=[WEATHER, ADD], think_mode="off") == expected
    assert tokenizer.apply_chat_template(U, tools=[WEATHER, ADD], chat_template=template_text(), tokenize=False,
                                         add_generation_prompt=True, think_mode="off") == expected


def test_training_mask_of_a_final_tool_call_turn(tokenizer):
    messages, tools, _, _ = TOOL_CHATS["a final assistant turn that calls a tool is rendered in full"]
    out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template_text(training=True),
                                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert tokenizer.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant\n<judge>\n")
    assert masked == render("off", "Needs live data.", "Looking.")[len("<judge>\n"):] + CALL_PARIS_TEXT + "<|im_end|>"


@pytest.mark.parametrize("messages, tools, match", [
    ([{"role": "assistant", "content": None}], None, "string content"),
    ([{"role": "tool", "content": {"x": 1}}], None, "string content"),
    ([{"role": "function", "content": "x"}], None, "role"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}], None, "tool call 0"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], None,
     "tool call 0"),
    ([{"role": "assistant", "content": "x", "tool_calls": {"name": "f"}}], None, "must be a list"),
    ([{"role": "user", "content": "x"}], {"name": "f"}, "tools must be a list"),
])
def test_bad_messages_and_tools_are_refused(messages, tools, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages, tools=tools)


# --- history reduction and leading whitespace (kat-format.md section 3) ---------------------------

# an earlier assistant turn -> what the history keeps of it, written by hand from section 3 (not from
# katdata.template.history_answer, which must agree with both); every reduction ends by stripping
# leading newlines, a turn without markers included
PAST = {
    "\nSure, here it is.": "Sure, here it is.",  # no markers: the whole text, leading newline stripped
    "\n\nTwo blank lines first.\n": "Two blank lines first.\n",  # trailing newlines stay
    "\n": "",
    "  indented": "  indented",
    "": "",
    "<think_off>\n\n\nAfter the mode tag": "After the mode tag",  # after <think_off>: leading newlines stripped
    "<think>\nsteps\n</think>\n\n\nAfter think": "After think",  # after </think>: leading newlines stripped
    "<judge>\nj\n</judge>\n\n<think_off>\n<answer>\n\nAnswer starting with a newline\n</answer>":
        "Answer starting with a newline",  # between the tags, then leading newlines stripped too
    "\n<answer>\nfirst\n</answer> and <answer>\nsecond\n</answer>": "second",  # the last <answer>
    "<answer>\nnever closed": "<answer>\nnever closed",  # no closing tag, no mode tag: kept
    "\n<answer>\nnever closed": "<answer>\nnever closed",  # ... and its leading newline stripped
    "<think_off>\n  spaces stay": "  spaces stay",  # only newlines are stripped
    "<think_off>\n<think>\nx\n</think>\n\ny": "y",  # both reductions in turn
}


@pytest.mark.parametrize("content", list(PAST))
def test_past_turn_is_reduced_alike_by_python_and_the_template(tokenizer, content):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "b"}]
    expected = (SYS + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n" + PAST[content]
                + "<|im_end|>\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<judge>\n")
    assert history_answer(content) == PAST[content]
    assert render_chat(messages, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, chat_template=template_text(), tokenize=False,
                                         add_generation_prompt=True) == expected


@pytest.mark.parametrize("training", [False, True])
def test_final_turn_without_markers_is_rendered_as_written(tokenizer, training):
    """The last assistant turn is never reduced: a leading newline and markers without a judge stay."""
    for content in ("\nSure.", "<think_off>\n\nSure.", "  Sure.\n"):
        messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": content}]
        expected = SYS + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n" + content + "<|im_end|>\n"
        assert render_chat(messages) == expected
        assert tokenizer.apply_chat_template(messages, chat_template=template_text(training), tokenize=False) == expected


def test_past_turn_without_markers_loses_its_leading_newlines():
    """kat-format.md section 3: ``"\\nHello"`` in the history renders as ``Hello``."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\nHello"},
                {"role": "user", "content": "b"}]
    assert history_answer("\nHello") == "Hello"
    assert history_answer("<think_off>\n\nHello") == "Hello"
    text = render_chat(messages, add_generation_prompt=True)
    assert "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nb" in text
    assert "assistant\n\nHello" not in text
    # a past turn with tool calls and a marker-less content: the content's leading newlines go too
    calls = [{"name": "f", "arguments": {}}]
    messages[1] = {"role": "assistant", "content": "\n\nHello", "tool_calls": calls}
    assert ('<|im_start|>assistant\nHello\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
            in render_chat(messages + [{"role": "assistant", "content": "<judge>\nx"}]))
