"""The dtype rule (katdata.dtypes.choose) on a CPU and on a CUDA GPU with and without bf16, the GPU faked by
monkeypatching torch.cuda, and the dtype the transformers backend reports on this CPU."""

from __future__ import annotations

import pytest

from katdata import dtypes


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA GPU that computes bf16 unless the test says otherwise (``fake_cuda(bf16=False)``)."""
    torch = pytest.importorskip("torch")

    def make(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return make


def test_cpu_auto_is_the_callers_choice(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dtypes.choose("auto", "cpu") == "float32"
    assert dtypes.choose("auto", "cpu", cpu_auto="bfloat16") == "bfloat16"
    assert dtypes.choose("auto", None, cpu_auto="bfloat16") == "bfloat16"  # no GPU seen: the CPU rule
    assert dtypes.choose("float16", "cpu") == "float16"  # an explicit dtype is kept


def test_cuda_with_bf16(fake_cuda):
    fake_cuda(bf16=True)
    assert dtypes.choose("auto", "cuda") == "bfloat16"
    assert dtypes.choose("auto", "cuda:1", cpu_auto="float32") == "bfloat16"
    assert dtypes.choose("auto", None) == "bfloat16"  # device None: CUDA when torch sees a GPU
    assert dtypes.choose("float32", "cuda") == "float32"
    assert dtypes.choose("auto", "cpu") == "float32"  # a CPU stays a CPU on a GPU machine


def test_cuda_without_bf16(fake_cuda):
    fake_cuda(bf16=False)
    assert dtypes.choose("auto", "cuda") == "float16"
    assert dtypes.choose("auto", None, cpu_auto="bfloat16") == "float16"
    assert dtypes.choose("bfloat16", "cuda") == "bfloat16"


def test_unknown_dtype_and_torch_names():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="float8"):
        dtypes.choose("float8", "cpu")
    assert dtypes.torch_dtype("bfloat16") is torch.bfloat16
    assert dtypes.torch_dtype("float32") is torch.float32


def test_backend_reports_its_dtype(hf_backend):
    """On this CPU ``auto`` is bf16 where the CPU computes it natively, else fp32; the weights are in it."""
    from katdata.backends.hf import native_bf16_cpu

    expected = "bfloat16" if native_bf16_cpu() else "float32"
    assert hf_backend.device == "cpu"
    assert hf_backend.dtype_name == expected
    assert str(next(hf_backend.model.parameters()).dtype) == f"torch.{expected}"
