"""Scaling settings refused at recipe load with the supported way named (no engine starts)."""

import pytest

from katdata.errors import KatdataError
from katdata.recipe import load_recipe


def recipe(tmp_path, engine: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: s\nengines:\n  default: {engine}\n", "utf-8")
    return path


def test_data_parallel_in_process_is_refused_naming_katdata_serve(tmp_path):
    with pytest.raises(KatdataError, match=r"r.yaml:3: engines.default: .*katdata serve --data-parallel-size 4.*openai"):
        load_recipe(recipe(tmp_path, "{backend: vllm, data_parallel_size: 4}"))


def test_tensor_parallel_only_on_vllm(tmp_path):
    with pytest.raises(KatdataError, match="tensor_parallel_size applies to backend: vllm"):
        load_recipe(recipe(tmp_path, "{backend: transformers, tensor_parallel_size: 2}"))
    ok = load_recipe(recipe(tmp_path, "{backend: vllm, tensor_parallel_size: 2}"))
    assert ok.engines["default"].tensor_parallel_size == 2


def test_serve_passes_parallel_flags_to_vllm(monkeypatch):
    from katdata import servers

    seen = {}

    def start(model, port, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(servers, "start", start)
    with pytest.raises(SystemExit):
        servers.main(["--data-parallel-size", "8", "--tensor-parallel-size", "2", "--host", "0.0.0.0"])
    assert seen["data_parallel_size"] == 8
    assert seen["extra_args"] == ["--tensor-parallel-size", "2", "--host", "0.0.0.0"]


def test_engine_threads_reach_the_transformers_backend(tmp_path, monkeypatch):
    """``num_threads`` of an engine goes to the backend (torch threads while generating); unset, the backend
    picks (1 on a machine of two cores or fewer)."""
    import katdata.backends
    from katdata.pipeline import Engines

    built = []
    monkeypatch.setattr(katdata.backends, "get_backend", lambda name, config: built.append((name, config)) or object())
    for yaml_engine in ("{backend: transformers, num_threads: 2, cache: false}", "{backend: transformers, cache: false}"):
        Engines(load_recipe(recipe(tmp_path, yaml_engine)), tmp_path)("default")
    assert [(name, config.num_threads) for name, config in built] == [("transformers", 2), ("transformers", None)]
    with pytest.raises(KatdataError, match="num_threads"):
        load_recipe(recipe(tmp_path, "{backend: transformers, num_threads: 0}"))
