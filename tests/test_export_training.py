"""Exports train right in the tools users already use: the chat template ships with the data, the card's
TRL snippet (run here as the card prints it) trains on KAT's render with loss on the completion only, and
the LLaMA-Factory layout follows LLaMA-Factory's documented sharegpt dataset format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from demo_data import demo_records

from katdata import card_training, export
from katdata.chat_template import render_chat, template_text
from katdata.output_paths import MARKER
from katdata.runfiles import RowWriter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    recs = demo_records(12, 12)
    for i, r in enumerate(recs):  # a system prompt on some rows: both layouts must carry it
        if i % 3 == 0:
            r.system = "Answer as a careful tutor."
    run = tmp_path_factory.mktemp("run")
    with RowWriter(run / "records.jsonl") as w:
        w.write_all(recs)
    return run


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for fmt in ("hf", "trl", "llamafactory"):
        out[fmt] = tmp_path_factory.mktemp(fmt) / "export"
        export.run(export.ExportConfig(format=fmt, out=out[fmt], plot=False, test_size=0.25), run_dir)
    return out


def _block(readme: str, heading: str, lang: str) -> str:
    """The first ``lang`` code block after the card heading ``### heading``."""
    part = readme.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    m = re.search(rf"```{lang}\n(.*?)```", part, re.S)
    assert m, f"no {lang} block under {heading}"
    return m.group(1)


@pytest.mark.parametrize("fmt", ["hf", "trl", "llamafactory"])
def test_every_format_ships_the_template_listed_in_the_marker(exports, run_dir, fmt):
    folder = exports[fmt]
    assert (folder / "chat_template.jinja").read_text("utf-8") == template_text(training=False)
    assert "chat_template.jinja" in json.loads((folder / MARKER).read_text())["files"]
    readme = (folder / "README.md").read_text("utf-8")
    assert "## Train on this" in readme and "### TRL" in readme and "### LLaMA-Factory" in readme
    assert "### katdata" in readme
    assert _block(readme, "TRL", "python") == card_training.trl_snippet("path/to/export")
    # a rerun replaces the folder (its template listed as export's own), and nothing else is left behind
    export.run(export.ExportConfig(format=fmt, out=folder, plot=False, test_size=0.25), run_dir)
    assert (folder / "chat_template.jinja").is_file()


def test_push_uploads_the_template_with_data_and_card(exports, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            pass

        def create_repo(self, *a, **k):
            return None

        def upload_folder(self, *, repo_id, folder_path, repo_type, commit_message, ignore_patterns):
            root = Path(folder_path)
            seen["files"] = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
            seen["ignore"] = list(ignore_patterns)
            seen["template"] = (root / "chat_template.jinja").read_text("utf-8")
            return None

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    export.push(exports["trl"], "someone/kat-data")
    assert {"chat_template.jinja", "README.md"} <= seen["files"]
    assert any(f.startswith("data/") and f.endswith(".parquet") for f in seen["files"])
    assert not any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), "chat_template.jinja")
                   for p in seen["ignore"])
    assert seen["template"] == template_text(training=False)


@pytest.mark.parametrize("fmt", ["hf", "trl", "llamafactory"])
def test_card_trl_snippet_hands_trl_kat_template_and_prompt_completion_rows(exports, tmp_path, monkeypatch, fmt):
    """The card's TRL snippet up to the trainer (SFTTrainer stubbed; the slow test below trains for real)."""
    import datasets
    import trl

    from katdata.model import embedded_path

    folder = exports[fmt]
    code = _block((folder / "README.md").read_text("utf-8"), "TRL", "python")
    code = code.replace('DATA = "path/to/export"', f"DATA = {json.dumps(str(folder))}", 1)
    code = re.sub(r"^MODEL = [^#\n]*", f"MODEL = {json.dumps(str(embedded_path()))}  ", code, count=1, flags=re.M)
    made = {}

    class Trainer:
        def __init__(self, **kw):
            made.update(kw)

        def train(self):
            made["trained"] = True

    monkeypatch.setattr(trl, "SFTTrainer", Trainer)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "card-trl-snippet", "exec"), {})
    assert made["trained"] and made["args"].completion_only_loss is True
    assert made["processing_class"].chat_template == template_text(training=False)
    rows = made["train_dataset"]
    assert set(rows.column_names) >= {"prompt", "completion"} and "messages" not in rows.column_names
    base = {r["id"]: r for r in datasets.load_dataset(str(exports["hf"]), split="train")}
    for r in rows:
        assert r["completion"][0]["role"] == "assistant" and len(r["completion"]) == 1
        if "id" in r:
            assert r["prompt"] + r["completion"] == base[r["id"]]["messages"]
        else:
            assert r["prompt"] + r["completion"] in [b["messages"] for b in base.values()]


@pytest.mark.slow  # about 2 minutes on 2 shared CPU cores (full fine-tuning steps of the embedded model)
def test_card_trl_snippet_trains_on_kat_render_with_completion_only_loss(tmp_path, monkeypatch):
    import datasets
    import trl
    from transformers import AutoTokenizer

    from katdata.model import embedded_path

    recs = demo_records(1, 3)  # few, short rows: one small batch per step on CPU
    recs[0].system = "Answer as a careful tutor."
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(recs)
    folder, model = tmp_path / "export", str(embedded_path())
    export.run(export.ExportConfig(format="trl", out=folder, plot=False, test_size=0.2), tmp_path)
    code = _block((folder / "README.md").read_text("utf-8"), "TRL", "python")
    for name, value in (("DATA", json.dumps(str(folder))), ("MODEL", json.dumps(model)), ("STEPS", "2")):
        code, n = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value}  ", code, count=1, flags=re.M)
        assert n == 1, f"the card's TRL snippet has no {name} line"

    batches = []
    real = trl.SFTTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        batches.append({k: inputs[k].detach().cpu().tolist() for k in ("input_ids", "labels", "attention_mask")
                        if k in inputs})
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", spy)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    ns: dict = {}
    exec(compile(code, "card-trl-snippet", "exec"), ns)  # the card's text, with only the settings block filled in
    assert ns["trainer"].state.global_step == 2 and len(batches) == 2

    tok = AutoTokenizer.from_pretrained(model)  # the base model's tokenizer, with its own template untouched
    rows = datasets.load_dataset(str(folder), split="train")
    want = {}
    for r in rows:
        msgs = r["prompt"] + r["completion"]
        full = render_chat(msgs)
        prompt = render_chat(r["prompt"], add_generation_prompt=True)
        assert full.startswith(prompt)
        want[full] = full[len(prompt):]
    plain = next(r for r in rows if r["prompt"][0]["role"] != "system")  # the base template differs on these
    assert tok.apply_chat_template(plain["prompt"] + plain["completion"], tokenize=False) not in want
    assert any(not text.startswith("<|im_start|>system\nAnswer as") for text in want)
    seen = 0
    for b in batches:
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            real_ids = [i for i, m in zip(ids, mask) if m]
            real_labels = [lab for lab, m in zip(labels, mask) if m]
            text = tok.decode(real_ids, clean_up_tokenization_spaces=False)
            assert text in want, f"TRL trained on a text that is not KAT's render: {text[:200]!r}"
            first = next(i for i, lab in enumerate(real_labels) if lab != -100)
            assert all(lab != -100 for lab in real_labels[first:])  # the loss covers one suffix: the completion
            assert real_labels[first:] == real_ids[first:]
            assert tok.decode(real_ids[first:], clean_up_tokenization_spaces=False) == want[text]
            assert want[text].endswith("<|im_end|>\n") and not want[text].startswith("<judge>")
            seen += 1
    assert seen >= 2


def _lf_allowed() -> tuple[set, set, set]:
    """LLaMA-Factory's documented dataset_info.json vocabulary (data/README.md of LLaMA-Factory)."""
    entry = {"hf_hub_url", "ms_hub_url", "script_url", "file_name", "formatting", "ranking", "subset", "split",
             "folder", "num_samples", "columns", "tags"}
    columns = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
               "audios", "chosen", "rejected", "kto_tag"}
    tags = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}
    return entry, columns, tags


def test_llamafactory_entry_and_rows_follow_the_sharegpt_format(exports):
    import datasets

    folder = exports["llamafactory"]
    info = json.loads((folder / "dataset_info.json").read_text("utf-8"))
    readme = (folder / "README.md").read_text("utf-8")
    assert json.loads(_block(readme, "LLaMA-Factory", "json"))["katdata_train"] == info["katdata_train"]
    entry_keys, column_keys, tag_keys = _lf_allowed()
    assert set(info) == {"katdata_train", "katdata_test"}
    by_id = {}
    for name, entry in info.items():
        assert set(entry) <= entry_keys and entry["formatting"] == "sharegpt"
        assert set(entry["columns"]) <= column_keys and entry["columns"]["messages"] == "messages"
        tags = entry["tags"]
        assert set(tags) <= tag_keys
        assert (tags["role_tag"], tags["content_tag"]) == ("role", "content")
        assert (tags["user_tag"], tags["assistant_tag"], tags["system_tag"]) == ("user", "assistant", "system")
        files = sorted((folder / entry["file_name"]).iterdir())  # a folder: every file of one supported type
        assert files and {p.suffix for p in files} == {".parquet"}
        part = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")
        assert entry["columns"]["messages"] in part.column_names
        for row in part:
            msgs = row["messages"]
            assert all(set(m) == {tags["role_tag"], tags["content_tag"]} for m in msgs)
            body = msgs[1:] if msgs[0]["role"] == tags["system_tag"] else msgs  # system only as the first turn
            assert body and len(body) % 2 == 0  # LLaMA-Factory drops rows that do not pair up
            assert [m["role"] for m in body[0::2]] == [tags["user_tag"]] * (len(body) // 2)
            assert [m["role"] for m in body[1::2]] == [tags["assistant_tag"]] * (len(body) // 2)
            by_id[row["id"]] = msgs
    assert any(m[0]["role"] == "system" for m in by_id.values()) and any(m[0]["role"] == "user" for m in by_id.values())

    # the card's template registration, rendered the way LLaMA-Factory fills its slots, is KAT's render
    class StringFormatter:
        def __init__(self, slots):
            self.slots = slots

        def apply(self, **kw):
            text = "".join(self.slots)
            for k, v in kw.items():
                text = text.replace("{{" + k + "}}", v)
            return text

    registered = {}
    exec(_block(readme, "LLaMA-Factory", "python"),
         {"StringFormatter": StringFormatter, "register_template": lambda **kw: registered.update(kw)})
    assert registered["name"] == "kat" and registered["stop_words"] == ["<|im_end|>"]
    for msgs in by_id.values():
        system, body = (msgs[0]["content"], msgs[1:]) if msgs[0]["role"] == "system" else (None, msgs)
        text = registered["format_system"].apply(content=system or registered["default_system"])
        for user, assistant in zip(body[0::2], body[1::2]):
            text += registered["format_user"].apply(content=user["content"])
            label = registered["format_assistant"].apply(content=assistant["content"])
            text += label
        kat = render_chat(msgs)
        assert text == kat
        completion = kat[len(render_chat(msgs[:-1], add_generation_prompt=True)):]
        assert label == "<judge>\n" + completion  # the loss span: KAT's completion plus the pre-filled judge line
