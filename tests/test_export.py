"""The export stage: real KatRecord rows (GSM8K think-on, FanOutQA hops think-off) to a Hub folder."""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from katdata import card, export, sources
from katdata.errors import InputError
from katdata.records import Attempt, Change, KatRecord, Query, Segment, Vote
from katdata.runfiles import RowWriter
from katdata.template import render

ROOT = Path(__file__).resolve().parents[1]
JUDGE_ON = "The question chains several dependent arithmetic steps, so working them out explicitly avoids slips."
JUDGE_OFF = "The question only asks to recall a single well-known fact, so no explicit reasoning is needed."
MODELS = {"solver": "SmolLM2-135M-Instruct", "judge": "SmolLM2-135M-Instruct", "sampler": "SmolLM2-135M-Instruct"}


def _vote(qid: str, label: str, rng: random.Random, answer: str) -> dict:
    p_on, p_off = (rng.choice([0.75, 1.0]), rng.choice([0.0, 0.25])) if label == "on" else (1.0, rng.choice([0.75, 1.0]))
    return Vote(id=qid, label=label, reason="pass rates", explored=rng.random() < 0.05, n_on=4, n_off=4,
                p_on=p_on, p_off=p_off, margin=p_on - p_off, delta=0.1, classes_on={answer: int(4 * p_on)},
                classes_off={answer: int(4 * p_off)}, tokens_on=rng.randint(80, 300), tokens_off=rng.randint(8, 60),
                samples_used=8, chosen_index=rng.randrange(4), chosen_source="vote").model_dump(mode="json")


def make_records(n_gsm: int = 30, n_hop: int = 40, seed: int = 0) -> list[KatRecord]:
    """GSM8K questions with their worked solutions as think-on records, FanOutQA hops as think-off."""
    rng = random.Random(seed)
    out = []
    for i, q in enumerate(sources.load("gsm8k", limit=n_gsm, seed=seed)):
        think = re.sub(r"<<[^>]*>>", "", q.meta["solution"].split("####")[0]).strip()
        mode = "off" if i % 6 == 5 else "on"  # a few easy ones answered directly
        judge = JUDGE_OFF.replace("recall a single well-known fact", "do one simple calculation") if mode == "off" else JUDGE_ON
        tags = {"domain": "math", "task_type": "word_problem", "difficulty": rng.randint(2, 5), "needs_reasoning": True,
                "p_reasoning": 0.9, "verifiability": "reference", "language": "en", "source": "combined",
                "rule": {"domain": "math"}, "llm_raw": '{"domain": "math"}'}
        out.append(KatRecord(id=q.id, query=q.query, mode=mode, judge=judge, think=think if mode == "on" else None,
                             answer=q.reference, response=render(mode, judge, q.reference, think if mode == "on" else None),
                             reference=q.reference, kind=q.kind, tags=tags, vote=_vote(q.id, mode, rng, q.reference),
                             provenance={"source": q.source, "models": MODELS, "stage": "vote"}))
    hops = [q for q in sources.load("fanoutqa-hop", limit=n_hop + 5, seed=seed) if q.reference.strip()][:n_hop]
    for i, q in enumerate(hops):
        system = "Answer briefly." if i % 4 == 0 else None
        tags = {"domain": "knowledge", "task_type": "fact_recall", "difficulty": rng.randint(1, 2),
                "needs_reasoning": False, "p_reasoning": 0.1, "verifiability": "reference", "language": "en",
                "think_off_candidate": True}
        changes = [Change(field="answer", old="?", new=q.reference, annotator="ann1", at="2025-01-01T00:00:00")] \
            if i % 10 == 3 else []
        vote, prov = _vote(q.id, "off", rng, q.reference), {"source": q.source, "models": MODELS}
        if i % 10 == 7:  # what the assemble stage writes, and values that fit no typed column
            prov |= {"content_source": "vote", "attempt_index": 0, "judge_tries": 1}
            tags |= {"p_reasoning": "low", "extra": {"note": "ü"}}
            vote |= {"tokens_off": None, "samples_saved": 2**40 if i == 17 else True}
        out.append(KatRecord(id=q.id, query=q.query, system=system, mode="off", judge=JUDGE_OFF, answer=q.reference,
                             response=render("off", JUDGE_OFF, q.reference), reference=q.reference, kind=q.kind,
                             tags=tags, vote=vote, provenance=prov, changes=changes))
    return out


def hf_row(rec: KatRecord) -> dict:
    """The row-wise reference of the hf layout, built without arrow: what the columnar export must match."""
    source, models, extra = export._provenance(rec.provenance)
    return {
        "id": rec.id, "query": rec.query, "system": rec.system, "messages": rec.messages(),
        "response": rec.response, "mode": rec.mode, "judge": rec.judge, "think": rec.think,
        "answer": rec.answer, "reference": rec.reference, "kind": rec.kind,
        "label_source": rec.label_source, "content_source": rec.content_source,
        "tags": card.typed(rec.tags, card.TAG_TYPES), "vote": card.typed(rec.vote, card.VOTE_TYPES),
        "provenance": {"source": source, "models": [{"role": r, "model": m} for r, m in models.items()],
                       "changes": [{"field": c.field, "old": json.dumps(c.old, separators=(",", ":"), ensure_ascii=False),
                                    "new": json.dumps(c.new, separators=(",", ":"), ensure_ascii=False), "annotator": c.annotator,
                                    "at": c.at} for c in rec.changes], "extra": extra},
    }


def _strip(rec: KatRecord) -> dict:
    d = rec.model_dump(mode="json")
    d["tags"] = {k: v for k, v in d["tags"].items() if v is not None}
    d["vote"] = {k: v for k, v in d["vote"].items() if v is not None}
    return d


@pytest.fixture(scope="module")
def records() -> list[KatRecord]:
    return make_records()


def make_run(path: Path, records: list[KatRecord], extras: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with RowWriter(path / "records.jsonl") as w:
        w.write_all(records)
    if extras:
        (path / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "engines": {
            "default": {"backend": "transformers", "model": "embedded", "api_key": "sk-secret"},
            "judge": {"backend": "openai", "model": "Qwen2.5-72B-Instruct"}},
            "solve": {"solver_engine": "default", "critic_engine": "big"}, "judge": {"engine": "judge"},
            "vote": {"n": 4, "delta": 0.1}}))
        with RowWriter(path / "queries.jsonl") as w:
            w.write_all(Query(id=r.id, query=r.query, source=r.provenance["source"]) for r in records)
        (path / "summary.json").write_text(json.dumps({"stages": {"vote": {"rows_in": 70, "rows_out": 70}}}))
        with RowWriter(path / "rejects.jsonl") as w:
            w.write({"id": "x1", "stage": "vote", "reason": "no_correct_sample", "raw": "..."})
            w.write({"id": "x2", "stage": "solve", "reason": "truncated", "raw": "..."})
        with RowWriter(path / "samples.jsonl") as w:
            for r in records[:10]:
                for m in ("on", "off"):
                    w.write(Attempt(id=r.id, mode=m, text="...", ok=m == "on", correct=m == "on",
                                    finish_reason="length" if m == "off" else "stop",
                                    errors=[] if m == "on" else ["truncated"],
                                    segments=[Segment(role="solver", model="SmolLM2-135M-Instruct")]))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, records):
    run = make_run(tmp_path_factory.mktemp("run"), records)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text("utf-8"))  # as the stage passes it
    stats = export.run(export.ExportConfig(), run, None, recipe=recipe)
    return run, stats


def test_rows_round_trip(records):
    for rec in records:
        assert _strip(export.from_hf_row(hf_row(rec))) == _strip(rec)
    # values of unexpected types survive in the structs' extra fields; so does the assemble stage's provenance
    odd = records[0].model_copy(update={"tags": {"difficulty": "hard", "weird": [1, 2], "extra": 1},
                                        "provenance": {"source": None, "models": {}, "content_source": "vote",
                                                       "attempt_index": 2, "review": False}})
    row = hf_row(odd)
    assert row["tags"]["difficulty"] is None and row["provenance"]["source"] is None
    back = export.from_hf_row(row)
    assert back.tags == odd.tags and back.provenance == odd.provenance


def test_allocate_is_exact_and_stratified():
    rng = random.Random(1)
    for _ in range(200):
        counts = {f"s{i}": rng.randint(1, 50) for i in range(rng.randint(1, 8))}
        p = rng.choice([0.05, 0.1, 0.33, 0.5])
        alloc = export.allocate(counts, p)
        assert sum(alloc.values()) == round(sum(counts.values()) * p)
        assert all(abs(alloc[s] - counts[s] * p) < 1 and 0 <= alloc[s] <= counts[s] for s in counts)


def test_export_loads_back_with_same_rows_and_features(exported, records):
    import datasets

    run, stats = exported
    out = run / "export"
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "test"}
    want = {r.id: hf_row(r) for r in records}
    got = [row for split in ds.values() for row in split]
    assert len(got) == len(records) == stats["rows_out"] and {r["id"] for r in got} == set(want)
    for split in ds.values():
        assert split.features == export.features("hf")
    for row in got:
        assert row == want[row["id"]]
        assert export.from_hf_row(row).response == row["messages"][-1]["content"]
    # stratified: every (mode, domain) stratum has its share of test rows, within one row
    strata = Counter((r.mode, r.tags["domain"]) for r in records)
    test = Counter((row["mode"], row["tags"]["domain"]) for row in ds["test"])
    assert len(ds["test"]) == round(len(records) * 0.1)
    assert all(abs(test[s] - n * 0.1) < 1 for s, n in strata.items())
    assert not list(run.glob(".export*")), "temporary folders left behind"


def test_card_header_body_and_plot(exported, records):
    run, _ = exported
    text = (run / "export" / "README.md").read_text()
    head = yaml.safe_load(text.split("---\n")[1])
    assert head["license"] == "other" and head["task_categories"] == ["text-generation"]
    assert head["size_categories"] == ["n<1K"] and head["language"] == ["en"]
    assert {d["split"] for d in head["configs"][0]["data_files"]} == {"train", "test"}
    assert sum(s["num_examples"] for s in head["dataset_info"]["splits"]) == len(records)
    n_on = sum(r.mode == "on" for r in records)
    assert f"think-on {n_on} ({100 * n_on / len(records):.1f}%)" in text
    assert "### Mode ratio by domain" in text and "| knowledge | 40 | 0 | 40 | 0.0% |" in text
    assert "| samples.jsonl | off | 10 | 0.0% | 10 | 0.0% | 100.0% |" in text  # pass rate and truncation
    assert "| vote | no_correct_sample | 1 |" in text and "| solver | SmolLM2-135M-Instruct | 70 |" in text
    assert "| judge | judge | openai | Qwen2.5-72B-Instruct |" in text
    assert "| solve (critic) | big -> default | transformers | embedded" in text
    assert "| solver | SmolLM2-135M-Instruct | 20 |" in text  # agent segments of the samples
    assert "| gsm8k | 30 | MIT |" in text
    assert "sk-secret" not in text and "api_key: <redacted>" in text
    assert '"rows_in": 70' in text and "## Human review" in text and "| fanoutqa-hop | 40 | CC-BY-SA-4.0 |" in text
    png = run / "export" / export.card.PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({export.card.PLOT})" in text


def test_split_is_seeded(tmp_path, records):
    run = make_run(tmp_path / "run", records, extras=False)
    ids = {}
    for seed, out in ((0, "a"), (0, "b"), (7, "c")):
        export.run(export.ExportConfig(seed=seed, out=tmp_path / out, plot=False), run)
        ids[out] = sorted(pq_ids(tmp_path / out / "data", "test"))
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert "No rejects.jsonl" in (tmp_path / "a" / "README.md").read_text()  # missing optional files degrade


def pq_ids(folder: Path, split: str) -> list[str]:
    import pyarrow.parquet as pq

    return [i for f in sorted(folder.glob(f"**/{split}-*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def test_shards_and_row_groups(tmp_path, records):
    import datasets
    import pyarrow.parquet as pq

    run = make_run(tmp_path / "run", records, extras=False)
    export.run(export.ExportConfig(shard_rows=20, batch_rows=6, plot=False), run)
    files = sorted((run / "export" / "data").glob("train-*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]  # 63 rows
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [20, 20, 20, 3]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 4  # 6 + 6 + 6 + 2
    ds = datasets.load_dataset(str(run / "export"))
    assert len(ds["train"]) == 63 and len(ds["test"]) == 7


def test_merged_review_file_is_preferred(tmp_path, records):
    run = make_run(tmp_path / "run", records, extras=False)
    fixed = records[-1].model_copy(update={"answer": "Left", "response": render("off", JUDGE_OFF, "Left"),
                                           "changes": [Change(field="answer", old=records[-1].answer, new="Left")]})
    with RowWriter(run / "review" / "merged.jsonl") as w:
        w.write_all(records[:-1] + [fixed])
    stats = export.run(export.ExportConfig(plot=False), run)
    assert stats["input"].endswith("review/merged.jsonl")
    rows = {r["id"]: r for f in (run / "export" / "data").glob("*.parquet") for r in _pq_rows(f)}
    assert rows[fixed.id]["answer"] == "Left" and rows[fixed.id]["provenance"]["changes"][0]["new"] == '"Left"'


def _pq_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_trl_and_llamafactory_layouts(tmp_path, records):
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational
    from transformers import AutoTokenizer

    from katdata.chat_template import render_chat, template_text
    from katdata.model import embedded_path

    run = make_run(tmp_path / "run", records, extras=False)
    export.run(export.ExportConfig(format="trl", out=tmp_path / "trl", plot=False), run)
    trl = datasets.load_dataset(str(tmp_path / "trl"))
    assert trl["train"].features == export.features("trl")
    tok = AutoTokenizer.from_pretrained(embedded_path())
    tok.chat_template = template_text()
    by_id = {r.id: r for r in records}
    for row in list(trl["train"])[:10] + list(trl["test"]):
        assert is_conversational(row) and row["prompt"] + row["completion"] == by_id[row["id"]].messages()
        text = apply_chat_template({"prompt": row["prompt"], "completion": row["completion"]}, tok)
        assert text["prompt"] + text["completion"] == render_chat(by_id[row["id"]].messages())

    export.run(export.ExportConfig(format="llamafactory", out=tmp_path / "lf", plot=False), run)
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert set(info) == {"katdata_train", "katdata_test"}
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt" and entry["tags"]["system_tag"] == "system"
        part = datasets.load_dataset("parquet", split="train",
                                     data_files=str(tmp_path / "lf" / entry["file_name"] / "*.parquet"))
        assert all(r["messages"] == by_id[r["id"]].messages() for r in part)
    assert sum(len(s) for s in datasets.load_dataset(str(tmp_path / "lf")).values()) == len(records)


@pytest.mark.parametrize("line,bad,msg", [
    (3, "{not json", "records.jsonl:3: broken JSON"),
    (2, '{"id": "x", "query": "q", "mode": "maybe", "judge": "j", "answer": "a", "response": "r"}',
     "records.jsonl:2 field 'mode'"),
])
def test_bad_records_name_file_line_and_leave_no_folder(tmp_path, records, line, bad, msg):
    run = make_run(tmp_path / "run", records, extras=False)
    export.run(export.ExportConfig(plot=False), run)
    before = sorted(p.name for p in (run / "export" / "data").iterdir())
    lines = (run / "records.jsonl").read_text().splitlines()
    lines[line - 1] = bad
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=re.escape(msg)):
        export.run(export.ExportConfig(plot=False), run)
    assert sorted(p.name for p in (run / "export" / "data").iterdir()) == before  # old export untouched
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_missing_and_corrupt_stage_files(tmp_path, records):
    with pytest.raises(InputError, match="records.jsonl: file not found"):
        export.run(export.ExportConfig(), tmp_path / "empty")
    run = make_run(tmp_path / "run", records)
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"id": "q", "mode": "on"}\n')
    with pytest.raises(InputError, match=r"samples.jsonl:21 field 'text'"):
        export.run(export.ExportConfig(), run)
    (run / "samples.jsonl").unlink()
    (run / "summary.json").write_text('{"stages": \n{oops}')
    with pytest.raises(InputError, match=r"summary.json:2: broken JSON"):
        export.run(export.ExportConfig(), run)
    assert not (run / "export").exists() and [p for p in run.iterdir() if p.name.startswith(".")] == []


def test_unreachable_hub_gives_clear_error_and_keeps_folder(tmp_path, records, monkeypatch, capsys):
    import datasets

    run = make_run(tmp_path / "run", records, extras=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    rc = export.main([str(run), "--push-to-hub", "someone/kat-data", "--private"])
    err = capsys.readouterr().err
    assert rc == 4  # a server problem (katdata.errors exit codes)
    assert f"upload to the Hub at http://127.0.0.1:{port} failed" in err and "is complete and unchanged" in err
    ds = datasets.load_dataset(str(run / "export"))
    assert sum(len(s) for s in ds.values()) == len(records)


def test_main_prints_stats_and_checks_flags(tmp_path, records, capsys):
    run = make_run(tmp_path / "run", records, extras=False)
    assert export.main([str(run), "--out", str(tmp_path / "o"), "--test-size", "0.2", "--seed", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"] == {"train": 56, "test": 14} and stats["on"] + stats["off"] == len(records)
    assert export.main([str(run), "--private"]) == 2
    assert capsys.readouterr().err.strip() == "katdata export: error: --private needs --push-to-hub REPO"


def test_import_stays_light():
    code = ("import sys, katdata.export, katdata.card; "
            "print([m for m in ('torch', 'transformers', 'vllm', 'datasets', 'argilla', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_runs_small(tmp_path):
    """The bench runs in a work folder that does not exist yet, and prints its rates, memory ratios, the floor
    (export's C++ parts alone) and the column-wise bound per count, with export's ratio to each, and the CPU of
    export's own threads."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "export_scale.py"), "--counts", "300", "600",
                          "--dir", str(tmp_path / "new")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "records/s" in out.stdout and "peak RSS ratio" in out.stdout
    floors = re.findall(r"^floor +n= +(\d+) .*: +([\d,]+) records/CPU-s .*export at x([\d.]+) of it", out.stdout, re.M)
    assert [n for n, _, _ in floors] == ["300", "600"] and all(float(x) > 0 for _, _, x in floors), out.stdout
    bounds = re.findall(r"^bound +n= +(\d+) .* ([\d,]+) records/s .*export at x([\d.]+) of it.*: ([\d.]+) CPU-s$",
                        out.stdout, re.M)
    assert [b[0] for b in bounds] == ["300", "600"] and all(float(b[2]) > 0 for b in bounds), out.stdout
    caps = re.findall(r"^ +export's threads: main ([\d.]+) CPU-s, .* caps export at ([\d,]+) records/s", out.stdout, re.M)
    assert len(caps) == 2 and all(float(main) > 0 for main, _ in caps), out.stdout  # the main thread did the export
    assert list((tmp_path / "new").iterdir()) == []  # its own temporary folder removed


def test_card_licences_come_from_the_sources_table(tmp_path):
    """Every packaged source's licence on the card is the one in katdata.sources (gsm8k-calc's sums are GSM8K's:
    MIT); a source that is not packaged says unknown."""
    names = [*sources.SOURCES, "my-file"]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "source": s}) + "\n"
                                                    for i, s in enumerate(names)), encoding="utf-8")
    text = "\n".join(card._sources(tmp_path, card.CardStats(), export.ExportConfig()))
    assert "| gsm8k-calc | 1 | MIT |" in text and "| fanoutqa-multihop | 1 | CC-BY-SA-4.0 |" in text
    for name, src in sources.TABLE.items():
        assert f"| {name} | 1 | {src.licence} |" in text
    assert "| my-file | 1 | unknown |" in text
