"""The KAT chat template: exact strings, through jinja and through a real tokenizer."""

import pytest

from katdata.chat_template import render_chat, template_text
from katdata.template import render

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
    transformers = pytest.importorskip("transformers")
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
