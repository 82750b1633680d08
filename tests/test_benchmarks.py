"""katdata eval over named benchmarks: items from the packaged sets and files, k samples per item with a seed
each, rows resumed after a crash, figures per benchmark x model x setting, contamination against the run's
training queries, the --benchmark flag and its one-line errors. Scripted engines here (the logic); the real
engine on the quickstart's run folder is the slow test at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from katdata.backends.scripted import ScriptedBackend
from katdata.benchmarks import BenchmarkConfig, card_section, contamination, copy_plot, item_seed, items, parse_flag
from katdata.errors import KatdataError
from katdata.evaluate import EvalConfig, run
from katdata.runfiles import RowWriter
from katdata.template import GENERATION_PREFIX
from katdata.train import split

from demo_data import demo_records


def make_run(tmp_path):
    recs = demo_records(4, 4, seed=7)
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(recs)
    train, held = split([{"id": r.id, "mode": r.mode} for r in recs], 2, seed=0)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "split.json").write_text(json.dumps(
        {"data": None, "train": [r["id"] for r in train], "heldout": [r["id"] for r in held]}))
    return {r.id: r for r in recs}, [r["id"] for r in train]


def answering(refs: dict[str, str], right_samples: set[int]):
    """A model that answers in the template: think-on with the reference on samples in ``right_samples`` (else a
    wrong number), under forced think-off always the wrong number."""
    def script(req, i):
        ref = refs.get(req.messages[-1]["content"], "0")
        answer = ref if i in right_samples else "123456"
        if req.prefix == GENERATION_PREFIX:
            return f"Needs steps.\n</judge>\n\n<think_on>\n<think>\nwork\n</think>\n<answer>\n#### {answer}\n</answer>"
        if req.prefix.endswith("<think>\n"):
            return f"a b c d e f g h\n</think>\n<answer>\n#### {answer}\n</answer>"
        return "#### 123456\n</answer>"
    return script


def test_flag_and_config_rules():
    assert parse_flag("gsm8k") == {"name": "gsm8k"}
    assert parse_flag("gsm8k:limit=8,k=2,settings=auto+on") == {"name": "gsm8k", "limit": "8", "k": "2",
                                                                 "settings": ["auto", "on"]}
    assert parse_flag("data/mine.jsonl:limit=5") == {"name": "mine", "path": "data/mine.jsonl", "limit": "5"}
    spec = BenchmarkConfig.model_validate(parse_flag("gsm8k:limit=3,k=2"))
    assert spec.k == 2 and spec.sampling_temperature == 0.6 and spec.settings == ["auto", "on", "off"]
    assert BenchmarkConfig(name="aime2025").sampling_temperature == 0.0
    for bad, says in ((dict(name="mmlu"), "unknown benchmark 'mmlu'"), (dict(name="gsm8k", k=2, temperature=0),
                      "same reply k times"), (dict(name="gsm8k", settings=["on", "on"]), "at most once")):
        with pytest.raises(ValueError, match=says):
            BenchmarkConfig(**bad)
    with pytest.raises(ValueError, match="given twice"):
        EvalConfig(benchmarks=[{"name": "gsm8k"}, {"name": "gsm8k", "k": 2}])
    # a seed per item and sample: stable, and apart for different items or benchmark seeds
    assert item_seed(spec, "a") == item_seed(BenchmarkConfig(name="gsm8k"), "a") != item_seed(spec, "b")
    assert item_seed(BenchmarkConfig(name="gsm8k", seed=1), "a") != item_seed(spec, "a")


def test_packaged_items_are_a_seeded_sample_with_their_references():
    a = items(BenchmarkConfig(name="gsm8k", limit=3, seed=2))
    assert [it.id for it in a] == [it.id for it in items(BenchmarkConfig(name="gsm8k", limit=3, seed=2))]
    assert [it.id for it in a] != [it.id for it in items(BenchmarkConfig(name="gsm8k", limit=3, seed=3))]
    assert all(it.kind == "numeric" and it.reference and it.messages[-1]["content"] == it.query for it in a)
    code = items(BenchmarkConfig(name="humaneval", limit=1))[0]
    assert code.kind == "code" and code.meta["prompt"] and code.domain == "code"
    assert len(items(BenchmarkConfig(name="aime2025"))) == 30


def test_eval_over_benchmarks_figures_resume_and_contamination(tmp_path, monkeypatch):
    from katdata import train_data

    recs, train_ids = make_run(tmp_path)
    loads = []  # the training data is read once: the held-out items and the training queries from one read
    monkeypatch.setattr(train_data, "load_examples", lambda *a, _f=train_data.load_examples: loads.append(a) or _f(*a))
    gsm = items(BenchmarkConfig(name="gsm8k", limit=3, seed=5))
    trained = [recs[i] for i in train_ids if recs[i].mode == "on"][:2]  # a file benchmark: two trained-on items
    bench_file = tmp_path / "mine.jsonl"
    bench_file.write_text("".join(json.dumps({"id": f"m{i}", "query": q, "reference": ref, "kind": "numeric"}) + "\n"
                                  for i, (q, ref) in enumerate([(r.query, r.reference) for r in trained]
                                                               + [("What is 2 + 2?", "4")])))
    refs = {it.query: it.reference for it in gsm} | {r.query: r.reference for r in recs.values()} | {
        "What is 2 + 2?": "4"}
    base = ScriptedBackend(script=answering(refs, right_samples=set()))
    adapted = ScriptedBackend(script=answering(refs, right_samples={0}))
    engines = {"default": base, "adapted": adapted}
    cfg = EvalConfig(adapted_engine="adapted", max_tokens=64, benchmarks=[
        {"name": "gsm8k", "limit": 3, "seed": 5, "k": 2}, {"name": "mine", "path": str(bench_file), "settings": ["auto"]}])
    result = run(cfg, tmp_path, engines.__getitem__)
    assert len(loads) == 1

    rows = [json.loads(x) for x in (tmp_path / "eval" / "benchmarks.jsonl").read_text().splitlines()]
    # gsm8k: 2 models x 3 settings x 3 items x k=2; mine: 2 models x auto x 3 items x 1
    assert len(rows) == 36 + 6 and len({r["key"] for r in rows}) == len(rows)
    assert {r["seed"] - item_seed(BenchmarkConfig(name="gsm8k", seed=5), r["id"]) for r in rows
            if r["benchmark"] == "gsm8k"} == {0, 1}
    g = result["benchmarks"]["gsm8k"]
    assert g["items"] == 3 and g["k"] == 2 and g["temperature"] == 0.6
    ad, bs = g["models"]["adapted"], g["models"]["base"]
    assert ad["auto"]["pass@1"] == 0.5 and ad["auto"]["pass@k"] == 1.0  # one of two samples right, on every item
    assert ad["off"]["pass@1"] == 0.0 and bs["auto"]["pass@k"] == 0.0
    assert ad["auto"]["think_on_rate"] == 1.0 and ad["auto"]["template_validity"] == 1.0
    assert g["token_saving"]["adapted"]["pass@1_on"] == 0.5
    assert g["contamination"]["in_training"] == 0  # seeded items the demo records don't hold
    m = result["benchmarks"]["mine"]
    assert m["contamination"]["in_training"] == 2 and m["contamination"]["ids"] == ["m0", "m1"]
    assert set(m["models"]["adapted"]) == {"auto"} and m["models"]["adapted"]["auto"]["pass@1"] == 1.0
    assert (tmp_path / "eval" / result["benchmark_plot"]).read_bytes()[:4] == b"\x89PNG"

    # a crash that lost the last rows: only those come again, with the same seeds, and the same eval.json
    calls = len(base.calls) + len(adapted.calls)
    path = tmp_path / "eval" / "benchmarks.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]) + lines[-3][:15])
    assert run(cfg, tmp_path, engines.__getitem__) == result
    assert len(base.calls) + len(adapted.calls) > calls
    assert sorted(json.loads(x)["key"] for x in path.read_text().splitlines()) == sorted(r["key"] for r in rows)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result
    # a benchmark file changed since is a changed input: refused, not mixed with the rows of the old one
    bench_file.write_text(bench_file.read_text().replace("What is 2 + 2?", "What is 3 + 3?"))
    with pytest.raises(KatdataError, match="mine.jsonl"):
        run(cfg, tmp_path, engines.__getitem__)
    bench_file.write_text(bench_file.read_text().replace("What is 3 + 3?", "What is 2 + 2?"))
    # an export written after eval shows the tables, the plot and the counts in its card
    card = "\n".join(card_section(tmp_path))
    assert "## Benchmarks" in card and "gsm8k: 3 items, k=2" in card and "mine: 2 of 3" in card
    assert "](benchmarks.png)" in card
    (tmp_path / "card").mkdir()
    copy_plot(tmp_path, tmp_path / "card")
    assert (tmp_path / "card" / "benchmarks.png").read_bytes() == (tmp_path / "eval" / "benchmarks.png").read_bytes()


def test_contamination_uses_the_decontaminate_matcher():
    its = items(BenchmarkConfig(name="gsm8k", limit=4, seed=1))
    edited = its[1].query.replace(".", " .", 1)  # the same item, spaced differently
    got = contamination("gsm8k", its, [its[0].query, edited, "An unrelated sentence about nothing at all here."])
    assert got["items"] == 4 and got["in_training"] == 2 and got["ids"] == sorted([its[0].id, its[1].id])


def test_contamination_counts_by_the_recipes_decontaminate_settings():
    """An item with a word in its middle changed is in training at the default threshold (0.5) and not under a recipe
    that asks for 0.95; the method line says which settings counted."""
    from katdata.decontaminate import DecontaminateConfig

    it = max(items(BenchmarkConfig(name="gsm8k", limit=8, seed=2)), key=lambda i: len(i.query.split()))
    words = it.query.split()
    assert len(words) >= 30  # so the 8 n-grams the change touches are under half of them
    mid = len(words) // 2
    changed = " ".join(words[:mid] + ["zebra"] + words[mid + 1:])  # the 8 n-grams holding that word change
    assert contamination("gsm8k", [it], [changed])["in_training"] == 1
    strict = contamination("gsm8k", [it], [changed], DecontaminateConfig(threshold=0.95))
    assert strict["in_training"] == 0 and "share >= 0.95" in strict["method"]


def test_bad_benchmark_flag_is_one_line(tmp_path, capsys):
    from katdata.cli import main

    make_run(tmp_path)
    assert main(["eval", str(tmp_path), "--benchmark", "mmlu:limit=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown benchmark 'mmlu'" in err[0] and "eval.benchmarks" in err[0]
    assert main(["eval", str(tmp_path), "--benchmark", "gsm8k:limit"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def _eval_cmd(run_dir) -> list[str]:
    return [sys.executable, "-m", "katdata", "eval", str(run_dir), "--limit", "2", "--max-tokens", "48",
            "--base-forced", "--benchmark", "gsm8k:limit=2,k=2", "--benchmark", "aime2025:limit=2,k=2"]


@pytest.mark.slow
def test_quickstart_run_over_two_benchmarks_and_a_kill_mid_eval(tmp_path):
    """The quickstart up to its adapter (the embedded model, every stage, about 8 minutes on 2 cores), then eval over
    GSM8K test and AIME 2025 with k=2 for base and adapter in all three settings: the tables, eval.json, the plot;
    a copy killed with SIGKILL mid-eval and run again writes the same eval.json as one never stopped."""
    import shutil

    from katdata.cli import main as cli

    run_dir = tmp_path / "run"
    assert cli(["run", "quickstart", "--run-dir", str(run_dir), "--until", "train"]) == 0
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)

    done = subprocess.run(_eval_cmd(run_dir), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    for name, items_in_training in (("gsm8k", None), ("aime2025", 0)):
        b = result["benchmarks"][name]
        assert b["items"] == 2 and b["k"] == 2 and f"{name}: 2 items, k=2" in done.stdout
        assert set(b["models"]) == {"base", "adapted"}
        for model in ("base", "adapted"):
            assert list(b["models"][model]) == ["auto", "on", "off"]
            assert all(c["samples"] == 4 for c in b["models"][model].values())
        if items_in_training is not None:  # the quickstart decontaminates against AIME: none of it was trained on
            assert b["contamination"]["in_training"] == items_in_training
    assert (run_dir / "eval" / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
    # the adapter keeps the template far better than the base model on benchmark items it never saw
    auto = {m: result["benchmarks"]["aime2025"]["models"][m]["auto"] for m in ("base", "adapted")}
    print(json.dumps({m: {k: v for k, v in c.items()} for m, c in auto.items()}))

    proc = subprocess.Popen(_eval_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = killed / "eval" / "benchmarks.jsonl"
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline and proc.poll() is None:
        if rows.is_file() and len(rows.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "eval ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "eval" / "eval.json").exists()
    again = subprocess.run(_eval_cmd(killed), capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((killed / "eval" / "eval.json").read_text()) == result


def test_samples_vote_by_answer_class_and_each_key_is_worked_out_once(monkeypatch):
    """maj@k counts answers the verifier calls the same as one (3 and 3.00000000001 within rel_tol), as the
    sample stage's classes do; the verdict reuses the key instead of extracting it again."""
    from types import SimpleNamespace

    from katdata.bench_figures import maj_at_k
    from katdata.benchmarks import answer_classes
    from katdata.eval_items import verdict
    from katdata.verify import Verifier

    v, calls = Verifier(), []
    monkeypatch.setattr(v, "key", lambda kind, answer, query=None, _f=v.key: calls.append(answer) or _f(kind, answer))
    it = SimpleNamespace(kind="numeric", reference="3")
    parsed = [SimpleNamespace(answer=a) for a in ("4", "3", "3.00000000001", None)]
    keys = answer_classes(v, it, parsed)
    assert keys == [("4", "4"), ("3", "3"), ("3.00000000001", "3"), (None, None)]
    rows = [{"sample": i, "answer_key": cls, "correct": verdict(v, it, p.answer, raw)}
            for i, (p, (raw, cls)) in enumerate(zip(parsed, keys))]
    assert [r["correct"] for r in rows] == [False, True, True, False]
    assert calls == ["4", "3", "3.00000000001"]  # once per answer (the reference's own key is last_number's)
    assert maj_at_k(rows) is True
    assert maj_at_k([dict(r, answer_key=raw) for r, (raw, _) in zip(rows, keys)]) is False  # raw keys: a 3-way tie
