"""How train and rl load the base: the dtype rule (bf16 on a GPU whatever the folder's dtype, float32 on a CPU),
QLoRA's bitsandbytes settings, the refusal when bitsandbytes is missing, and the QLoRA path on this CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from katdata import model_load
from katdata.model_load import LoadSettings
from katdata.rl import RLConfig
from katdata.train import TrainConfig, run

from demo_data import demo_records
from test_train import write_records


class _Loaded(Exception):
    """Raised by the stand-in for from_pretrained: carries the keyword arguments the load asked for."""


def _asked(monkeypatch, settings: LoadSettings, *, cuda: bool, bf16: bool = True) -> dict:
    """The from_pretrained arguments ``model_load.load`` builds on a (pretended) device: only the choice is under
    test here, nothing is loaded."""
    import torch
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def capture(path, **kw):
        raise _Loaded(kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    with pytest.raises(_Loaded) as got:
        model_load.load("/models/base", settings, "train")
    return got.value.args[0]


def test_dtype_follows_the_device_not_the_folder(monkeypatch):
    import torch

    assert _asked(monkeypatch, TrainConfig(), cuda=True)["dtype"] is torch.bfloat16
    assert _asked(monkeypatch, TrainConfig(), cuda=True, bf16=False)["dtype"] is torch.float16
    assert _asked(monkeypatch, TrainConfig(), cuda=False)["dtype"] is torch.float32
    assert _asked(monkeypatch, RLConfig(dtype="float32"), cuda=True)["dtype"] is torch.float32  # a recipe's own


def test_qlora_asks_bitsandbytes_for_nf4_double_quant_bf16_compute(monkeypatch):
    import torch

    kw = _asked(monkeypatch, TrainConfig(quantization="4bit"), cuda=True)
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype is torch.bfloat16 and kw["device_map"] == {"": 0}
    assert _asked(monkeypatch, TrainConfig(quantization="8bit"), cuda=True)["quantization_config"].load_in_8bit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_load.trainer_args(TrainConfig(quantization="4bit"))["optim"] == "paged_adamw_8bit"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "optim" not in model_load.trainer_args(TrainConfig(quantization="4bit"))  # paged optimizers need CUDA


def test_quantization_without_bitsandbytes_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    import importlib.util

    from katdata.cli import main

    write_records(tmp_path / "records.jsonl", demo_records(0, 6, seed=5))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    assert main(["train", str(tmp_path), "--set", "quantization=4bit", "--set", "holdout=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.quantization: 4bit needs bitsandbytes" in err[0]
    assert not (tmp_path / "train").exists()


def test_train_json_says_how_the_base_loaded(tmp_path):
    write_records(tmp_path / "records.jsonl", demo_records(0, 6, seed=5))
    stats = run(TrainConfig(holdout=2, max_steps=1, batch_size=2, max_length=128, warmup_steps=0, num_threads=1,
                            gradient_checkpointing=True), tmp_path)
    saved = json.loads((tmp_path / "train" / "train.json").read_text())
    assert saved["dtype"] == stats["dtype"] == "float32" and saved["device"] == "cpu"
    assert saved["quantization"] is None and saved["gradient_checkpointing"] is True and saved["steps"] == 1


@pytest.mark.slow
def test_qlora_4bit_trains_on_this_cpu(tmp_path):
    """bitsandbytes' CPU backend: the embedded model in NF4, two LoRA steps, an adapter that changed."""
    pytest.importorskip("bitsandbytes")
    import torch
    from safetensors.torch import load_file

    write_records(tmp_path / "records.jsonl", demo_records(0, 6, seed=5))
    stats = run(TrainConfig(holdout=2, max_steps=2, batch_size=2, max_length=128, warmup_steps=0, num_threads=2,
                            quantization="4bit", learning_rate=5e-3), tmp_path)
    assert stats["quantization"] == "4bit" and stats["steps"] == 2
    weights = load_file(tmp_path / "train" / "adapter" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in weights.items() if "lora_B" in k)


def _big_model(tmp_path):
    """A folder with a KAT-V1-40B-shaped config.json, the embedded tokenizer and an empty weights file: the plan reads
    the config alone, so it must stop the run before the weights would load."""
    import shutil

    from katdata.model import resolve
    from test_memory_plan import KAT_40B

    folder = tmp_path / "kat40b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(KAT_40B))
    (folder / "model-00001-of-00017.safetensors").write_bytes(b"")
    for f in Path(resolve(None)).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    return folder


def test_train_plan_prints_without_training_and_a_setup_that_cannot_fit_stops_first(tmp_path, capsys):
    from katdata.cli import main

    run_dir = tmp_path / "run"
    write_records(run_dir / "records.jsonl", demo_records(0, 6, seed=5))
    assert main(["train", str(run_dir), "--plan", "--set", "holdout=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan (") and "total" in out and ": fits" in out
    assert not (run_dir / "train").exists()

    big = _big_model(tmp_path)  # 40B in float32 on this CPU's RAM: refused before a weight loads or a file is made
    assert main(["train", str(run_dir), "--set", f"model={big}", "--set", "holdout=2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB" in err[0] and "would fit" in err[0], err
    assert not (run_dir / "train").exists()
