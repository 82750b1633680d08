"""Where a record came from: the engines and models of the roles that shaped it, and the prompts' hashes.

The assemble stage builds one `RunInfo` from the run's recipe (the sections it declares: engines, tag,
solve, sample, judge) and asks it, per record, for the provenance of the roles that chose the label, wrote
the content and wrote the judge rationale. A model is named with a short fingerprint: for a local
folder a hash of its config.json and of its weight files' names, sizes and modification times (cheap:
no weight is read); for a hub id or a server's model id the id itself.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def folder_fingerprint(folder: Path) -> Optional[str]:
    """sha256[:12] over config.json and the weight files' names, sizes and mtimes; None when no config.json."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    h = hashlib.sha256(config.read_bytes())
    for f in sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


@lru_cache(maxsize=64)
def model_identity(model: Optional[str], backend: str = "transformers", revision: Optional[str] = None) -> str:
    """The model as a record names it: "name@hash" for a local folder, the id itself otherwise (with
    "@revision" for a hub id pinned to one)."""
    from katdata.model import EMBEDDED, EMBEDDED_NAME, embedded_path

    if model in (None, "", EMBEDDED):
        fp = folder_fingerprint(embedded_path(convert=False))
        return f"{EMBEDDED_NAME}@{fp}" if fp else EMBEDDED_NAME
    if backend != "openai" and Path(model).is_dir():
        fp = folder_fingerprint(Path(model))
        return f"{Path(model).resolve().name}@{fp}" if fp else model
    return f"{model}@{revision}" if revision else model  # a hub id, or the model id a server serves


@lru_cache(maxsize=64)
def prompt_hash(name: str) -> Optional[str]:
    """sha256[:12] of a prompt file under katdata/prompts; None when there is no such file."""
    try:
        return short_hash(resources.files("katdata").joinpath("prompts", name).read_bytes())
    except (FileNotFoundError, IsADirectoryError, OSError):
        return None


class RunInfo:
    """The recipe facts provenance needs: which engine plays which role, and which prompt files it used."""

    def __init__(self, recipe: Optional[dict]):
        r = recipe if isinstance(recipe, dict) else {}
        sec = {k: (r.get(k) if isinstance(r.get(k), dict) else {}) for k in ("tag", "solve", "sample", "judge")}
        self.engines: dict = r.get("engines") if isinstance(r.get("engines"), dict) else {}
        self.role_engine = {
            "sampler": sec["sample"].get("engine", "default"), "tagger": sec["tag"].get("engine", "default"),
            "solver": sec["solve"].get("solver_engine", "default"), "thinker": sec["solve"].get("thinker_engine", "default"),
            "critic": sec["solve"].get("critic_engine", "default"), "judge": sec["judge"].get("engine", "default")}
        self.prompts = {
            "sampler": [sec["sample"].get("neutral_judge", "judge_neutral.txt")], "tagger": ["tag.txt"],
            "solver": ["solver.txt"], "thinker": ["thinker.txt"], "critic": ["critic.txt"],
            "judge": [sec["judge"].get("prompt", "judge_rationale.txt"), sec["judge"].get("rationale_check_prompt", "rationale_check.txt")]}
        self.judge_writer = sec["judge"].get("writer", "llm")
        self.known = bool(r)

    def engine(self, role: str) -> tuple[str, str, str]:
        """(engine name, backend, model identity) of a role."""
        name = self.role_engine.get(role, "default")
        e = self.engines.get(name) if isinstance(self.engines.get(name), dict) else {}
        backend = e.get("backend", "transformers")
        return name, backend, model_identity(e.get("model"), backend, e.get("revision"))

    def record(self, label_source: str, content_source: str, agents: list[str], tags_source: Optional[str]) -> dict:
        """models {role: model}, engines {role: "name (backend)"}, agents and prompts {file: hash} of one record."""
        roles = []
        if label_source in ("vote", "exploration") or content_source == "sample":
            roles.append("sampler")
        if label_source == "prior" and tags_source in ("llm", "combined"):
            roles.append("tagger")
        roles += [a for a in agents if a in ("solver", "thinker", "critic")]
        if self.judge_writer == "llm":
            roles.append("judge")
        out: dict[str, Any] = {"agents": agents}
        prompts = {p: prompt_hash(p) for role in roles for p in self.prompts.get(role, [])}
        if self.judge_writer == "tags":
            prompts["judge_tags.yaml"] = prompt_hash("judge_tags.yaml")
        out["prompts"] = {k: v for k, v in prompts.items() if v}
        if self.known:
            engines = {role: self.engine(role) for role in dict.fromkeys(roles)}
            out["models"] = {role: model for role, (_, _, model) in engines.items()}
            out["engines"] = {role: f"{name} ({backend})" for role, (name, backend, _) in engines.items()}
        return out
