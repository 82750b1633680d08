"""Sharded LoRA training with the packaged accelerate configs, run for real on the CPU: 2 processes over gloo, the
embedded SmolLM2, 2 optimizer steps of batch 1.

- ``accelerate/fsdp_lora``: FSDP2, full shard, one unit per decoder layer;
- ``accelerate/deepspeed_zero3``: DeepSpeed ZeRO stage 3 (needs the ``deepspeed`` package; skipped without it).

accelerate (1.16) switches FSDP and DeepSpeed on only for GPU-type launches. katdata.train sets ``use_cpu`` where
there is no CUDA, and under it the state stays MULTI_CPU: the model is silently wrapped in plain DDP instead. So
that the sharded code paths (FSDP2's fully_shard, DeepSpeed's ZeRO-3 engine, the gather before the adapter is
saved) really run here, this file is also the launched script: run as ``__main__`` it lets accelerate's state take
the FSDP or DeepSpeed plugin on a MULTI_CPU launch (``_shard_on_cpu``), then calls katdata.train's ``main`` just as ``accelerate launch -m katdata.train`` does.

Under FSDP or ZeRO-3 no rank holds a whole weight, so katdata.train must gather the adapter (a collective every rank
joins) before rank 0 writes it (``katdata.train._gathered_state``).

Measured on the shared 2-core CPU: FSDP 107-143 s, ZeRO-3 147-273 s, so both are marked slow:
``pytest -m slow tests/test_accelerate_sharded.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "katdata" / "recipes" / "accelerate"


def _shard_on_cpu() -> None:
    """Let AcceleratorState keep the FSDP / DeepSpeed plugin it is given on a CPU launch (MULTI_CPU, gloo), doing
    what accelerate does for a GPU launch of the same config."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def sharded_init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None:
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = sharded_init


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, run_dir: Path) -> subprocess.CompletedProcess:
    from katdata.runfiles import RowWriter

    from demo_data import demo_records

    with RowWriter(run_dir / "records.jsonl") as w:
        w.write_all(demo_records(0, 12, seed=5))  # think-off only: the shortest real examples
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           __file__, str(run_dir), "--set", "max_steps=2", "--set", "batch_size=1", "--set", "holdout=2",
           "--set", "max_length=128", "--set", "num_threads=1", "--set", "bf16=false"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def _check_trained_once(run_dir: Path, done: subprocess.CompletedProcess) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from katdata.model import embedded_path

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"processes"') == 1  # one rank reports
    out = run_dir / "train"
    stats = json.loads((out / "train.json").read_text())
    assert stats["processes"] == 2 and stats["steps"] == 2 and stats["train"] == 10
    # saved once, by one rank: one adapter folder, no half-written one beside it
    assert sorted(p.name for p in out.iterdir() if "adapter" in p.name) == ["adapter"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    # whole weights, not one rank's shard: they load onto the base with peft
    base = AutoModelForCausalLM.from_pretrained(embedded_path(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    params = dict(model.named_parameters())
    for key, value in saved.items():
        loaded = params[key.replace(".weight", ".default.weight")]
        assert loaded.shape == value.shape and torch.equal(loaded.detach(), value), key
    # peft starts every lora_B at zero: a non-zero one means the two steps trained
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


@pytest.mark.slow
def test_fsdp_full_shard_lora_trains_on_two_cpu_processes(tmp_path):
    done = _launch("fsdp_lora", tmp_path)
    _check_trained_once(tmp_path, done)
    # the trainer ran under FSDP (its checkpoint holds FSDP's model file), not DDP
    assert (tmp_path / "train" / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()


@pytest.mark.slow
def test_deepspeed_zero3_lora_trains_on_two_cpu_processes(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; tested with 0.19.8)")
    done = _launch("deepspeed_zero3", tmp_path)
    _check_trained_once(tmp_path, done)
    # the trainer ran a ZeRO-3 engine: each rank wrote its own partition of the model states
    step = tmp_path / "train" / "checkpoints" / "checkpoint-2" / "global_step2"
    assert {p.name for p in step.glob("zero_pp_rank_*_model_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}


def test_packaged_sharded_configs_are_listed_and_shard_fully():
    import yaml

    from katdata.recipe_registry import packaged

    files = packaged(everything=True)
    fsdp = yaml.safe_load(files["accelerate/fsdp_lora"].read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["num_processes"] == 8 and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    ds = yaml.safe_load(files["accelerate/deepspeed_zero3"].read_text())
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_processes"] == 8 and ds["mixed_precision"] == "bf16"
    assert ds["deepspeed_config"]["zero_stage"] == 3 and ds["deepspeed_config"]["zero3_save_16bit_model"] is True


if __name__ == "__main__":  # the script `accelerate launch` runs in each process (see the module docstring)
    _shard_on_cpu()
    from katdata.train import main

    raise SystemExit(main())
