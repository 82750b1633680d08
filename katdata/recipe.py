"""Recipes: YAML validated by pydantic (``extra="forbid"``, help text on every field).

A misspelt key is an error naming its path and the nearest valid key; ``--set a.b=value`` overrides
take YAML scalars. Stage sections are the stage modules' own config classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from katdata.backends.config import EngineConfig  # noqa: F401 (re-exported: recipe.EngineConfig)
from katdata.errors import KatdataError
from katdata.inputs import FieldMap
from katdata.redact import redact
from katdata.sandbox import SandboxConfig
from katdata.settings import Blame, describe, explain, parse_override, read_yaml, set_key  # noqa: F401 (re-exported)
from katdata import sources
from katdata.sources import SOURCES
from katdata.stages import all_stages


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


class RecipeBase(Strict):
    """The recipe's own keys; each stage's section is added below from its declaration (katdata.stages)."""

    name: str = Field("katdata", description="name of the run (used in dataset names)")
    seed: int = Field(0, description="seed for sampling, splits and exploration")
    run_dir: str = Field("runs/{name}", description="run folder; {name} is replaced; relative to the working directory")
    data: Optional[DataConfig] = Field(None, description="the input queries (needed by the load stage)")
    previous_round: Optional[str] = Field(
        None, description="a run folder whose queries, tags and solver traces this run copies in place of its own "
        "load, decontaminate, tag and solve stages: the next round of an iterated cold start, which samples and "
        "votes again with an engine that loads the previous round's adapter (the packaged recipe quickstart_round2)")
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"default": EngineConfig()}, description="named engines the stages refer to")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="isolation and limits of model-written "
                                   "code run by the code verifier (solve, sample and eval)")

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
        return self


def _section(stage) -> tuple:
    """A stage's recipe section: its config class, optional (absent: not run) or with its default."""
    if stage.optional:
        return Optional[stage.config], Field(None, description=f"{stage.help} (optional stage)")
    return stage.config, Field(default_factory=stage.when_absent or stage.config, description=stage.help)


Recipe = create_model("Recipe", __base__=RecipeBase, __doc__="A recipe: the run's keys and every stage's section.",
                      **{s.name: _section(s) for s in all_stages() if s.config is not None})


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
        raise explain(exc, blame, Recipe) from None
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
