"""The export's "Train on this" card section and the chat template file shipped next to the data.

Every export folder holds ``chat_template.jinja``: KAT's chat template (the inference variant, the text
`katdata template chat-template` prints). A trainer that renders the rows with the base model's own
template teaches a different layout (no ``<judge>\\n`` pre-fill, other history reduction), so the card
says, per tool, how to train with this one. The snippets are module constants: the card shows them and
the tests run them (tests/test_export_training.py), so the two cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_FILE = "chat_template.jinja"
DATA_LINE = 'DATA = "path/to/export"'  # the card writes the Hub repo (or this placeholder) into it

# TRL: prompt/completion rows, KAT's template on the tokenizer, loss on the completion only.
TRL_SNIPPET = f'''import os

import torch
from datasets import load_dataset
from huggingface_hub import hf_hub_download
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

{DATA_LINE}  # the Hub dataset repo or the export folder
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # the base model to fine-tune
STEPS = -1  # -1: one pass over the data

local = os.path.isdir(DATA)
template = (os.path.join(DATA, "{TEMPLATE_FILE}") if local
            else hf_hub_download(DATA, "{TEMPLATE_FILE}", repo_type="dataset"))
tokenizer = AutoTokenizer.from_pretrained(MODEL)
with open(template, encoding="utf-8") as f:
    tokenizer.chat_template = f.read()  # KAT's layout, not the base model's own

dataset = load_dataset(DATA)
if "prompt" not in dataset["train"].column_names:  # the hf and llamafactory layouts: split each chat
    dataset = dataset.map(lambda r: {{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}},
                          remove_columns=dataset["train"].column_names)
trainer = SFTTrainer(
    model=MODEL,
    processing_class=tokenizer,
    train_dataset=dataset["train"],
    args=SFTConfig(output_dir="kat-sft", completion_only_loss=True, max_steps=STEPS,
                   bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported()),  # TRL's bf16 fails on CPU
)
trainer.train()
'''

# LLaMA-Factory: KAT's layout as a registered template (ChatML, KAT's default system prompt).
LLAMAFACTORY_TEMPLATE = '''register_template(
    name="kat",
    format_user=StringFormatter(slots=["<|im_start|>user\\n{{content}}<|im_end|>\\n<|im_start|>assistant\\n"]),
    format_assistant=StringFormatter(slots=["{{content}}<|im_end|>\\n"]),
    format_system=StringFormatter(slots=["<|im_start|>system\\n{{content}}<|im_end|>\\n"]),
    default_system="You are a helpful assistant.",
    stop_words=["<|im_end|>"],
)
'''

LLAMAFACTORY_YAML = '''model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
dataset_dir: path/to/export  # a local copy of the export: LLaMA-Factory reads its dataset_info.json
dataset: katdata_train
template: kat
cutoff_len: 2048
output_dir: kat-sft
'''


def write_template(folder: Path) -> Path:
    """Write KAT's chat template (inference variant) into an export folder."""
    from katdata.chat_template import template_text

    path = Path(folder) / TEMPLATE_FILE
    path.write_text(template_text(training=False), encoding="utf-8")
    return path


def trl_snippet(data: str) -> str:
    """The TRL snippet with ``DATA`` set to a Hub repo id or a folder."""
    return TRL_SNIPPET.replace(DATA_LINE, f"DATA = {json.dumps(data)}", 1)


def section(fmt: str, data: str) -> list[str]:
    """The card's "Train on this" lines for an export of layout ``fmt`` found at ``data`` (repo or path)."""
    out = ["## Train on this", "",
           f"`{TEMPLATE_FILE}` next to the data is KAT's chat template (the one `katdata template chat-template` "
           "prints). Train with it, not with the base model's own template: KAT pre-fills `<judge>\\n` after "
           "`<|im_start|>assistant\\n` and reduces earlier assistant turns to their answers, and a model trained "
           "on another layout does not speak the KAT format. Serve the adapter with the same template "
           f"(vLLM: `--chat-template {TEMPLATE_FILE}`).", "",
           "### TRL", "",
           "`SFTTrainer` on prompt/completion rows, the tokenizer's `chat_template` read from the file, loss "
           "on the completion only (the judge rationale, the mode, the thinking, the answer and `<|im_end|>`). "
           + ("This layout holds the `prompt` and `completion` columns already." if fmt == "trl" else
              "This layout holds a `messages` column; the snippet splits it into prompt and completion."), "",
           f"```python\n{trl_snippet(data)}```", "",
           "### LLaMA-Factory", ""]
    if fmt == "llamafactory":
        info = json.dumps({"katdata_train": {"file_name": "data/train", "formatting": "sharegpt",
                                             "columns": {"messages": "messages"}, "tags": {
                                                 "role_tag": "role", "content_tag": "content", "user_tag": "user",
                                                 "assistant_tag": "assistant", "system_tag": "system"}}}, indent=2)
        out += ["This folder's `dataset_info.json` declares each split (sharegpt formatting, OpenAI-style role "
                "tags, the system prompt as the first message when there is one); its train entry:", "",
                f"```json\n{info}\n```", "",
                "Register KAT's layout as a template in LLaMA-Factory's `src/llamafactory/data/template.py`, "
                "next to the other `register_template` calls (the rows' responses start with `<judge>\\n`, so "
                "the model learns to write it; KAT's template pre-fills it at serving, which gives the same "
                "text):", "",
                f"```python\n{LLAMAFACTORY_TEMPLATE}```", "",
                "Then train with `llamafactory-cli train kat_sft.yaml`, where `kat_sft.yaml` is:", "",
                f"```yaml\n{LLAMAFACTORY_YAML}```", ""]
    else:
        out += ["Export with `katdata export RUN_DIR --format llamafactory`: that layout ships the "
                "`dataset_info.json` LLaMA-Factory reads and the card shows how to register KAT's template.", ""]
    out += ["### katdata", "",
            "`katdata train RUN_DIR` fine-tunes a LoRA adapter with KAT's template and the loss on the final "
            "completion (it reads `RUN_DIR/export` when present, else `RUN_DIR/records.jsonl`)."
            + (" `--set data=path/to/export` trains on this folder." if fmt != "trl" else
               " It needs the `messages` column of the hf or llamafactory layout, so for this trl layout point it "
               "at the run folder's records."), ""]
    return out
