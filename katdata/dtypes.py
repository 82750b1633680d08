"""Which dtype a model loads in: one rule for train, rl, eval and the transformers backend.

``auto`` means bf16 on a CUDA GPU that computes it (Ampere and later), fp16 on an older one, whatever dtype the
model folder was saved in (the embedded model's folder is float32: a 40B base in float32 is 160 GB of weights and
fits no single GPU; in bf16 it is 80 GB). On a CPU the caller says what ``auto`` is (``cpu_auto``): training keeps
float32 there, the transformers backend takes bf16 only on a CPU with native bf16. Any other value is used as
given (``bfloat16``, ``float16``, ``float32``).
"""

from __future__ import annotations

from typing import Optional

NAMES = ("auto", "bfloat16", "float16", "float32")


def on_gpu() -> bool:
    """True when torch sees a CUDA device (torch is imported here, never by ``import katdata``)."""
    import torch

    return torch.cuda.is_available()


def choose(requested: str = "auto", device: Optional[str] = None, cpu_auto: str = "float32") -> str:
    """The dtype name to load in: ``requested`` unless it is ``auto``; then bf16 / fp16 on CUDA, ``cpu_auto`` on a
    CPU. ``device``: "cuda", "cuda:N" or "cpu"; None = CUDA when torch sees a GPU."""
    if requested not in NAMES:
        raise ValueError(f"dtype '{requested}': expected one of {', '.join(NAMES)}")
    if requested != "auto":
        return requested
    cuda = on_gpu() if device is None else str(device).startswith("cuda")
    if not cuda:
        return cpu_auto
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def torch_dtype(name: str):
    """``torch.<name>`` for a dtype name from :func:`choose`."""
    import torch

    return getattr(torch, name)
