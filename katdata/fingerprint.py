"""Fingerprints: the settings and input files that made a stage's output, so reruns never mix configurations.

A fingerprint is ``{"settings": {key.path: value}, "inputs": {file: sha256}}``. The settings of a
pipeline stage are its recipe section plus the engines that section names (``engine``, ``*_engine``)
and, for the load stage, the ``data`` section and the recipe ``seed``. Knobs that change speed but
not the rows are left out, so changing them never blocks a rerun: torch threads, logging and
checkpoint intervals, and per engine the batch size, parallelism, GPU memory share, eager mode,
server URL, key variable, concurrency, timeout, retries and the cache switch.

``compare`` names what changed (``sample.n: 2 -> 4``, ``input tags.jsonl changed``); the pipeline keeps
fingerprints in summary.json, ``katdata train``, ``katdata rl`` and ``katdata eval`` in ``fingerprint.json`` of
their folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from katdata.errors import KatdataError
from katdata.redact import redact

log = logging.getLogger(__name__)

RUNTIME_KEYS = {"num_threads", "logging_steps", "save_steps"}
ENGINE_RUNTIME_KEYS = {"batch_size", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization",
                       "enforce_eager", "base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "cache",
                       "num_threads"}
# in a folder input, files that describe the data rather than hold it (the card embeds timings)
_NOT_DATA = {".md", ".png"}
_UNSET = object()


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty mappings stay values)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def hash_path(path: Path) -> str:
    """SHA-256 of a file, or of a folder's data files (names and contents); ``missing`` when absent."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and p.suffix not in _NOT_DATA and not p.name.startswith("."))
    else:
        return "missing"
    for name, p in files:
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def hash_inputs(paths: Iterable[Path], run_dir: Optional[Path] = None, memo: Optional[dict] = None) -> dict[str, str]:
    """``{name: sha256}`` for input files; names are relative to ``run_dir`` when inside it."""
    out = {}
    for p in paths:
        p = Path(p)
        try:
            name = p.relative_to(run_dir).as_posix() if run_dir is not None else str(p)
        except ValueError:
            name = str(p.resolve())
        key = str(p.resolve())
        digest = memo[key] if memo is not None and key in memo else hash_path(p)
        if memo is not None:
            memo[key] = digest
        out[name] = digest
    return out


def section_settings(name: str, section: Any) -> dict[str, Any]:
    """A config section (pydantic model or dict) as flat settings under ``name``, runtime knobs left out."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in RUNTIME_KEYS}
    return flatten({name: redact(data)})


def engine_settings(engine_cfg: Any) -> dict[str, Any]:
    """An engine's settings that change its outputs (model, backend, dtype, LoRA, template...)."""
    data = engine_cfg.model_dump(mode="json") if hasattr(engine_cfg, "model_dump") else dict(engine_cfg)
    return {k: v for k, v in data.items() if k not in ENGINE_RUNTIME_KEYS}


def engine_names(section: Any) -> list[str]:
    """The engines a stage section names (its ``engine`` and ``*_engine`` fields)."""
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else (section or {})
    return sorted({v for k, v in data.items() if (k == "engine" or k.endswith("_engine")) and isinstance(v, str)})


def stage_settings(recipe: Any, decl: Any) -> dict[str, Any]:
    """The settings of one pipeline stage (its declaration, katdata.stage.Stage; see the module doc): its
    section, the sections it declares (``data`` with its path made absolute), and the engines its own
    section names."""
    stage = decl.name
    out: dict[str, Any] = {}
    for name in ((stage,) if decl.config is not None else ()) + decl.sections:
        value = getattr(recipe, name)
        if name == "engines":
            value = {k: engine_settings(v) for k, v in value.items()}
        elif name == "data" and value is not None:
            value = value.model_dump(mode="json")
            value["path"] = str(Path(value["path"]).resolve()) if value.get("path") else value.get("path")
        out.update(section_settings(name, value) if hasattr(value, "model_dump") or isinstance(value, dict)
                   else flatten({name: value}))
    section = getattr(recipe, stage) if decl.config is not None else None
    for name in engine_names(section) if section is not None else []:
        if name in recipe.engines:
            out.update(flatten({"engines": {name: redact(engine_settings(recipe.engines[name]))}}))
    return out


def stage_input_paths(recipe: Any, decl: Any, run_dir: Path) -> list[Path]:
    """The files a pipeline stage (its declaration) reads: its fingerprint hashes them."""
    run_dir = Path(run_dir)
    if decl.name == "load":
        return [Path(recipe.data.path)] if recipe.data is not None and recipe.data.path else []
    if decl.inputs is not None:
        return [Path(p) for p in decl.inputs(recipe, run_dir)] if getattr(recipe, decl.name, None) is not None else []
    return [run_dir / name for name in decl.files(decl.reads + decl.may_read)]


def stage_fingerprint(recipe: Any, decl: Any, run_dir: Path, memo: Optional[dict] = None) -> dict[str, Any]:
    return {"settings": stage_settings(recipe, decl),
            "inputs": hash_inputs(stage_input_paths(recipe, decl, run_dir), run_dir, memo)}


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def compare(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints: ``key: old -> new`` and ``input NAME changed``.

    A key the old fingerprint lacks whose new value is off (None, False, 0, empty) is no change: it is a
    setting katdata gained after the old run was made, at the value that keeps the old behaviour; so is a
    whole section the old fingerprint did not cover (a stage declared it later)."""
    out = []
    old_s, new_s = old.get("settings", {}), new.get("settings", {})
    recorded = {key.split(".")[0] for key in old_s}  # sections the old fingerprint covered
    for key in list(new_s) + [k for k in old_s if k not in new_s]:
        a, b = old_s.get(key, _UNSET), new_s.get(key, _UNSET)
        if a is _UNSET and (b in (None, False, 0, 0.0, "", [], {}) or key.split(".")[0] not in recorded):
            continue  # a setting, or a whole section, that the katdata which made the output did not record
        if a != b:
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    old_i, new_i = old.get("inputs", {}), new.get("inputs", {})
    for name in list(new_i) + [k for k in old_i if k not in new_i]:
        if name not in old_i and new_i[name] == "missing":
            continue  # an optional input that is not there, and was not looked at before
        if old_i.get(name) != new_i.get(name):
            out.append(f"input {name} changed")
    return out


def check_folder(folder: Path, current: dict, remedy: str) -> None:
    """Stop when ``folder`` (train/, eval/) was made with another fingerprint; before any model loads."""
    path = Path(folder) / "fingerprint.json"
    if not path.is_file():
        if Path(folder).is_dir() and any(Path(folder).iterdir()):
            log.warning("%s has no fingerprint.json (made by an older katdata): its settings cannot be checked", folder)
        return
    diff = compare(json.loads(path.read_text("utf-8")), current)
    if diff:
        raise KatdataError(f"{folder} was made with other settings ({'; '.join(diff)}): {remedy}")


def write_folder(folder: Path, current: dict) -> None:
    """Record ``current`` as the fingerprint of ``folder`` (atomically)."""
    path = Path(folder) / "fingerprint.json"
    tmp = path.with_name(".fingerprint.json.tmp")
    tmp.write_text(json.dumps(current, indent=1, default=str), "utf-8")
    os.replace(tmp, path)
