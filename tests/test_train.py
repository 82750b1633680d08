"""katdata train: loss masks from token ids, the audit, data loading, and a real (tiny) LoRA run with resume.

The real run trains the embedded SmolLM2 for 2 + 1 steps on short think-off records (about a minute
on an idle 2-core CPU). The marker-token variant is marked slow: `pytest -m slow tests/test_train.py`.
"""

from __future__ import annotations

import json
import shutil

import pytest

from katdata.chat_template import template_text
from katdata.errors import InputError
from katdata.records import KatRecord
from katdata.runfiles import RowWriter
from katdata.train import SPANS, TrainConfig, audit, balance, encode, load_examples, main, prepare, run, split

from demo_data import demo_records


@pytest.fixture(scope="module")
def records():
    return demo_records(6, 6, seed=3)


def write_records(path, recs):
    with RowWriter(path) as w:
        w.write_all(recs)


def test_loss_covers_exactly_the_completion_after_the_prefilled_judge(tokenizer, records):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # why masks must never come from the pad id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for rec in records:
        enc = encode(tokenizer, rec.messages(), template_text(training=True))
        ids, labels = enc["input_ids"], enc["labels"]
        loss = [i for i, lab in zip(ids, labels) if lab != -100]
        assert tokenizer.decode(loss) == rec.response[len("<judge>\n"):] + "<|im_end|>"
        assert tokenizer.decode(ids[:enc["start"]]).endswith("<|im_start|>assistant\n<judge>\n")
        assert all(lab == -100 for lab in labels[:enc["start"]])
        assert loss[-1] == im_end and loss.count(im_end) == 1  # the end of turn is learned even though pad == eos
        assert enc["mask_agrees"]  # the template's {% generation %} mask says the same


def test_history_turns_carry_no_loss(tokenizer, records):
    first, last = records[0], records[-1]
    msgs = [{"role": "user", "content": first.query}, {"role": "assistant", "content": first.response},
            {"role": "user", "content": last.query}, {"role": "assistant", "content": last.response}]
    enc = encode(tokenizer, msgs, template_text(training=True))
    loss = tokenizer.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert loss == last.response[len("<judge>\n"):] + "<|im_end|>"
    prompt = tokenizer.decode(enc["input_ids"][:enc["start"]])
    assert first.answer in prompt and "<think" not in prompt  # history reduced to its answer, masked


def test_span_types_and_audit_counts(tokenizer, records):
    encs = [encode(tokenizer, r.messages(), template_text(training=True)) for r in records]
    for rec, enc in zip(records, encs):
        assert enc["spans"][-1] == "eot" and enc["spans"].count("eot") == 1
        assert ("think" in enc["spans"]) == (rec.mode == "on")
        mode_ids = [i for i, s in zip(enc["input_ids"][enc["start"]:], enc["spans"]) if s == "mode"]
        assert tokenizer.decode(mode_ids) == ("<think_on>\n" if rec.mode == "on" else "<think_off>\n")
        ans_ids = [i for i, s in zip(enc["input_ids"][enc["start"]:], enc["spans"]) if s == "answer"]
        assert tokenizer.decode(ans_ids) == f"<answer>\n{rec.answer}\n</answer>"
    rows = [{"id": r.id, "mode": r.mode} for r in records]
    text = audit(tokenizer, rows, encs, 2)
    assert text.count("⟦judge|") == 2 and text.count("⟦eot|<|im_end|>⟧") == 2
    counts = {line.split()[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith("  ")}
    for span in SPANS:
        assert counts[span] == sum(e["spans"].count(span) for e in encs)
    assert counts["eot"] == len(records) and counts["total"] == sum(len(e["spans"]) for e in encs)


def test_split_is_seeded_stratified_and_disjoint(records):
    rows = [{"id": r.id, "mode": r.mode} for r in records]
    train, held = split(rows, 4, seed=0)
    assert split(rows, 4, seed=0) == (train, held)
    assert {r["mode"] for r in held} == {"on", "off"} and len(held) == 4
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert split(rows, 4, seed=1)[1] != held


def test_balance_repeats_the_rarer_mode_until_even():
    rows = [{"id": f"on{i}", "mode": "on"} for i in range(2)] + [{"id": f"off{i}", "mode": "off"} for i in range(5)]
    encs = [{"n": r["id"]} for r in rows]
    out, out_encs, added = balance(rows, encs)
    assert added == 3 and [r["mode"] for r in out].count("on") == [r["mode"] for r in out].count("off") == 5
    assert [e["n"] for e in out_encs] == [r["id"] for r in out]  # encodings stay paired with their rows
    assert {r["id"] for r in out} == {r["id"] for r in rows}  # only repeats, nothing new
    assert balance(rows[2:], encs[2:])[2] == 0  # one mode only: nothing to balance


def test_bad_rows_are_named_by_file_line_and_field(tmp_path, records):
    write_records(tmp_path / "records.jsonl", records[:2])
    with open(tmp_path / "records.jsonl", "a") as f:
        bad = records[2].model_dump() | {"response": "<judge>\nno mode tag here\n</judge>"}
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(InputError) as err:
        load_examples(None, tmp_path)
    assert ":3" in str(err.value) and "messages" in str(err.value) and "no_mode_tag" in str(err.value)


def test_export_folder_gives_train_and_test_splits(tmp_path, records, tokenizer):
    from katdata.export import ExportConfig
    from katdata.export import run as export_run

    write_records(tmp_path / "records.jsonl", records)
    export_run(ExportConfig(test_size=0.25, plot=False), tmp_path, None)
    train, test = load_examples(None, tmp_path)
    assert test and len(train) + len(test) == len(records)
    by_id = {r.id: r for r in records}
    for row in train + test:
        assert row["messages"] == by_id[row["id"]].messages()
        assert row["tags"]["domain"] == by_id[row["id"]].tags["domain"]
    kept, encs, held, stats = prepare(TrainConfig(), tmp_path, tokenizer)
    assert {r["id"] for r in held} == {r["id"] for r in test} and stats["mask_disagreements"] == 0


def test_split_rows_follow_the_run_folder_when_it_moves_or_the_cwd_changes(tmp_path, records, monkeypatch):
    """split.json names the run's own data relative to the run folder; a split.json written by an older
    katdata with a cwd-relative path ("runs/quickstart/export") still resolves from another directory."""
    from katdata.export import ExportConfig
    from katdata.export import run as export_run
    from katdata.train import _split_record, split_rows

    run_dir = tmp_path / "runs" / "quickstart"
    run_dir.mkdir(parents=True)
    write_records(run_dir / "records.jsonl", records)
    export_run(ExportConfig(test_size=0.25, plot=False), run_dir, None)
    train, test = load_examples(None, run_dir)
    assert _split_record(run_dir / "export", run_dir) == "export"
    (run_dir / "train").mkdir()
    monkeypatch.chdir(tmp_path)
    for data in ("export", "runs/quickstart/export"):
        (run_dir / "train" / "split.json").write_text(json.dumps(
            {"data": data, "train": [r["id"] for r in train], "heldout": [r["id"] for r in test]}))
        moved = tmp_path / "elsewhere" / data.replace("/", "_")
        shutil.copytree(run_dir, moved)
        monkeypatch.chdir(moved.parent)  # the old cwd-relative path does not exist from here
        assert [r["id"] for r in split_rows(moved, "heldout", "eval")] == [r["id"] for r in test]
        assert len(split_rows(moved, "train", "rl")) == len(train)


def test_audit_command_prints_spans(tmp_path, records, capsys):
    write_records(tmp_path / "records.jsonl", records)
    assert main([str(tmp_path), "--audit", "1", "--set", "holdout=2"]) == 0
    out = capsys.readouterr().out
    assert "⟦mode|" in out and "loss tokens per span type over 10 examples" in out
    assert not (tmp_path / "train").exists()  # auditing trains nothing


def short_records(n: int) -> list[KatRecord]:
    """Think-off records only: the shortest real examples, to keep the CPU run short."""
    return demo_records(0, n, seed=5)


def test_tiny_lora_run_writes_adapter_and_resumes_from_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    write_records(tmp_path / "records.jsonl", short_records(10))
    cfg = TrainConfig(holdout=2, max_steps=3, batch_size=2, save_steps=1, logging_steps=1, max_length=128,
                      warmup_steps=0, num_threads=1)
    stats = run(cfg, tmp_path)
    out = tmp_path / "train"
    assert stats["steps"] == 3 and stats["resumed_from"] is None and stats["train"] == 8
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "log.jsonl").is_file()
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(torch.count_nonzero(v) for v in lora_b)  # B starts at zero: it trained
    assert "{% generation %}" not in (out / "adapter" / "chat_template.jinja").read_text()
    assert run(cfg, tmp_path) == json.loads((out / "train.json").read_text())  # finished: not trained again

    # a crash after checkpoint 2: no adapter, no train.json; the rerun (same settings) continues from step 2
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    (out / "train.json").unlink()
    again = run(cfg, tmp_path)
    assert again["resumed_from"].endswith("checkpoint-2") and again["steps"] == 3


@pytest.mark.slow
def test_marker_tokens_are_added_and_trained(tmp_path, caplog):
    from safetensors.torch import load_file

    write_records(tmp_path / "records.jsonl", short_records(6))
    cfg = TrainConfig(holdout=2, max_steps=1, batch_size=2, max_length=128, add_marker_tokens=True,
                      warmup_steps=0, num_threads=1)
    run(cfg, tmp_path)
    assert "must be merged" in caplog.text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "train" / "adapter")
    assert len(tok("<think_on>", add_special_tokens=False)["input_ids"]) == 1
    weights = load_file(tmp_path / "train" / "adapter" / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in weights)


def test_data_parallel_launch_trains_once_and_writes_once(tmp_path):
    """The multi-process path of `accelerate launch` / torchrun, run for real on the CPU (2 processes,
    gloo): both ranks train on their share, only rank 0 writes the outputs."""
    import subprocess
    import sys

    write_records(tmp_path / "records.jsonl", short_records(12))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "katdata.train",
           str(tmp_path), "--set", "max_steps=2", "--set", "batch_size=2", "--set", "holdout=2",
           "--set", "num_threads=1", "--set", "max_length=128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count('"processes"') == 1  # one rank reports
    stats = json.loads((tmp_path / "train" / "train.json").read_text())
    assert stats["processes"] == 2 and stats["steps"] == 2 and stats["train"] == 10
    log = [json.loads(x) for x in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    # 10 rows over 2 ranks x batch 2 = 3 steps per epoch (vs 5 in one process): 2 steps = 2/3 epoch
    assert log[-1]["epoch"] == pytest.approx(2 / 3, abs=0.01)
    assert (tmp_path / "train" / "adapter" / "adapter_model.safetensors").is_file()
